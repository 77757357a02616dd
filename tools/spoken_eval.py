"""Score a checkpoint on a SYNTHETIC spoken corpus from raw audio: every test conversation's tracks go
through ``affectkit transcribe``'s path (segmenter, Whisper, prosody, causal model); prints the label
accuracy against the script and the word error rate of the transcripts.  Synthetic speech only: it says
the pipeline works end to end, not how it does on real meetings.

    python tools/spoken_eval.py CORPUS_DIR CHECKPOINT [--split test]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from affectkit.audio.frontend import word_errors  # noqa: E402
from affectkit.audio.recordings import timeline  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test")
    args = p.parse_args()
    root = Path(args.corpus)
    script = [d for d in json.loads((root / "corpus.json").read_text())["dialogues"] if d["split"] == args.split]
    right = total = errors = words = lost = 0
    for d in script:
        tracks = {s: root / "tracks" / f"{d['dialogue']}_{s}.wav" for s in ("A", "B")}
        rows, _labels = timeline(args.checkpoint, tracks, progress=False)
        lost += abs(len(rows) - len(d["turns"]))
        for r, t in zip(rows, d["turns"]):
            total += 1
            right += r["label"] == t["label"] and r["speaker"] == t["speaker"]
            e, n = word_errors(t["text"], r["text"])
            errors, words = errors + e, words + n
    print(f"{args.split}: {len(script)} conversations, {total} utterances ({lost} missing or extra); label accuracy "
          f"{right / max(total, 1):.3f}; WER {errors / max(words, 1):.3f}  (SYNTHETIC espeak-ng speech)")


if __name__ == "__main__":
    main()
