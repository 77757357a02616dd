"""Exploratory: a conversation file whose text vectors are two files' vectors side by side.

    python tools/concat_text_features.py feats/iemocap.pkl feats/iemocap_ft_utt.pkl feats/iemocap_frozen+utt.pkl

Both files must hold the same dialogues and utterances (same transcripts); the output keeps the first file's
layout and metadata and records both sources.  The service cannot embed raw text for such a file (no single
encoder makes its vectors), so this only tests whether CORECT gains from keeping the frozen vectors next to
the fine-tuned ones.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np

from affectkit.safe_pickle import safe_load


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    first, second, out = (Path(a) for a in sys.argv[1:])
    a, b = (safe_load(p) for p in (first, second))
    for split in ("train", "dev", "test"):
        if [d["vid"] for d in a[split]] != [d["vid"] for d in b[split]]:
            sys.exit(f"{first} and {second} hold different {split} dialogues")
        for da, db in zip(a[split], b[split]):
            if len(da["text"]) != len(db["text"]):
                sys.exit(f"dialogue {da['vid']}: {len(da['text'])} vs {len(db['text'])} utterances")
            da["text"] = np.ascontiguousarray(np.concatenate([da["text"], db["text"]], axis=1), dtype=np.float32)
    meta = dict(a.get("meta", {}))
    meta.pop("encoder_ref", None)
    meta["dim"] = int(a["train"][0]["text"].shape[1])
    meta["encoder"] = f"{meta.get('encoder', first.name)} + {b.get('meta', {}).get('encoder', second.name)}"
    meta["concatenated"] = [str(first), str(second)]
    a["meta"] = meta
    with out.open("wb") as f:
        pickle.dump(a, f, protocol=4)
    print(f"wrote {out}: text dim {meta['dim']}")


if __name__ == "__main__":
    main()
