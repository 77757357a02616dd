"""Speech in, emotion out: how fast and how well, on SYNTHETIC spoken conversations (espeak-ng).

Two parts, one run, bounded (it stops by itself):

1. **Stages, offline** (``--dialogues`` test conversations, each participant's track through the
   segmenter, the transcriber, prosody and the causal model in this process): word error rate of the
   transcripts against the script, real-time factor of each stage (seconds of work per second of audio,
   one thread each), utterances lost by the segmenter.  ``--compare-full`` also decodes every utterance
   with faster-whisper's own 30 s window (``mode="full"``).
2. **Live** (``affectkit serve`` as a child process): N sessions at once, each replaying one
   conversation in real time with both participants on their own WebSocket (100 ms PCM frames), for
   each N of ``--sessions``; prints p50/p99 latency from the detected end of speech to the prediction
   (the server's ``latency_ms``), p50/p99 from the true end of speech in the audio (what a user waits:
   the pause that ends an utterance plus the former), lost utterances, and the server's CPU per second
   of audio.

The model is a randomly initialised causal CORECT reading text (the shipped sentence encoder) and 88-d
eGeMAPS prosody: speed does not depend on the weights.  The speech is espeak-ng's, so the WER says how
the pipeline does on clear synthetic speech, not on real meetings.

    python bench/audio.py                                  # the full run (about 5 minutes)
    python bench/audio.py --dialogues 2 --sessions 1      # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from server_proc import ServeProcess  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from affectkit.audio import SAMPLE_RATE  # noqa: E402
from affectkit.audio.frontend import Track, word_errors  # noqa: E402
from affectkit.audio.pcm import float_to_pcm, read_wav  # noqa: E402
from affectkit.audio.segmenter import Segment  # noqa: E402

FRAME = SAMPLE_RATE // 10  # 100 ms


def make_checkpoint(folder: Path) -> Path:
    import torch

    from affectkit.audio.prosody import Standardiser
    from affectkit.checkpoint import save_checkpoint
    from affectkit.config import load_config
    from affectkit.models import build_model

    cfg = load_config(ROOT / "configs" / "corect_iemocap4_causal.yaml", ["model.modalities=[text,audio]"])
    info = {"dims": {"text": 384, "audio": 88}, "n_classes": 4, "label_names": ["hap", "sad", "neu", "ang"],
            "n_speakers": 2, "speakers": ["F", "M"],
            "audio_features": Standardiser(np.zeros(88), np.ones(88)).to_meta()}
    torch.manual_seed(0)
    model = build_model(cfg.model_name, cfg.model_params, info)
    path = folder / "causal_text_audio.pt"
    save_checkpoint(path, cfg, info, model)
    return path


def corpus(folder: Path, dialogues: int, seed: int) -> list[dict]:
    from affectkit.audio.synthetic import write_spoken_corpus

    meta = write_spoken_corpus(folder, {"train": 0, "dev": 0, "test": dialogues}, turns=(4, 8), seed=seed)
    return meta["dialogues"]


def _match(segments: list[Segment], turns: list[dict]) -> list[tuple[dict, int | None]]:
    """Each script turn and the index of the segment overlapping it most (None: lost)."""
    out = []
    for t in turns:
        best, overlap = None, 0.0
        for i, s in enumerate(segments):
            o = min(s.end, t["track_end"]) - max(s.start, t["track_start"])
            if o > overlap:
                best, overlap = i, o
        out.append((t, best))
    return out


def stages(folder: Path, script: list[dict], checkpoint: Path, compare_full: bool) -> dict:
    import torch

    from affectkit.audio.frontend import Utterance
    from affectkit.audio.inputs import plan_inputs
    from affectkit.audio.prosody import prosody
    from affectkit.audio.transcriber import Transcriber
    from affectkit.stream import Stream

    torch.set_num_threads(1)
    tr = Transcriber(cpu_threads=1)
    full = Transcriber(cpu_threads=1, mode="full") if compare_full else None
    stream = Stream(checkpoint)
    plan = plan_inputs(stream.modalities, stream.engine.dims, True, stream.engine.info.get("audio_features"))
    stream.push_text("F", "warm up", audio=np.zeros(88, dtype=np.float32))
    tr.transcribe(np.zeros(SAMPLE_RATE, dtype=np.float32))
    t = {"vad": 0.0, "asr": 0.0, "asr_full": 0.0, "prosody": 0.0, "model": 0.0}
    audio_s = errors = words = errors_full = lost = turns_n = 0
    for d in script:
        session = stream.new_session()
        utts = []
        for speaker in ("A", "B"):
            x = read_wav(folder / "tracks" / f"{d['dialogue']}_{speaker}.wav")
            audio_s += len(x) / SAMPLE_RATE
            track, segs = Track(speaker), []
            start = time.process_time()
            for k in range(0, len(x), FRAME):
                segs += [e for e in track.push(x[k:k + FRAME]) if isinstance(e, Segment)]
            segs += [e for e in track.flush() if isinstance(e, Segment)]
            t["vad"] += time.process_time() - start
            start = time.process_time()
            texts = tr.transcribe_batch([s.audio for s in segs])
            t["asr"] += time.process_time() - start
            if full is not None:
                start = time.process_time()
                texts_full = full.transcribe_batch([s.audio for s in segs])
                t["asr_full"] += time.process_time() - start
            start = time.process_time()
            numbers = [prosody(s.audio) for s in segs]
            t["prosody"] += time.process_time() - start
            mine = [turn for turn in d["turns"] if turn["speaker"] == speaker]
            for turn, i in _match(segs, mine):
                turns_n += 1
                n = len(turn["text"].split())
                if i is None:
                    lost += 1
                    errors += n
                    errors_full += n
                    words += n
                    continue
                e, n = word_errors(turn["text"], texts[i].text)
                errors, words = errors + e, words + n
                if full is not None:
                    errors_full += word_errors(turn["text"], texts_full[i].text)[0]
            utts += [Utterance(speaker, s.start, s.end, x.text, x.confidence, p)
                     for s, x, p in zip(segs, texts, numbers)]
        utts.sort(key=lambda u: u.end)
        start = time.process_time()
        for u in utts:
            text, feats = plan.inputs(u)
            session.push_text("F" if u.speaker == "A" else "M", text or "...", **feats)
        t["model"] += time.process_time() - start
    out = {"audio_s": round(audio_s, 1), "turns": turns_n, "lost": lost, "wer": round(errors / max(words, 1), 4),
           "rtf": {k: round(v / audio_s, 4) for k, v in t.items() if v or k != "asr_full"}}
    if full is not None:
        out["wer_full"] = round(errors_full / max(words, 1), 4)
    return out


class Server(ServeProcess):
    def __init__(self, checkpoint: Path, store: Path, asr_threads: int, asr_batch: int) -> None:
        super().__init__(checkpoint, store, ["--threads", "1", "--asr-threads", str(asr_threads),
                                             "--asr-batch", str(asr_batch),
                                             # one address stands for every participant here
                                             "--create-rate", "600", "--create-burst", "100"])


async def participant(ws_url: str, speaker: str, pcm: bytes, turns: list[dict], results: list, t0: float,
                      drain_s: float) -> None:
    """Stream ``pcm`` in real time from ``t0`` on; collect predictions with the client-side delay from the
    true end of speech (the script's track_end) to their arrival."""
    import websockets

    url, token = ws_url.split("#")  # the token goes in a header, never in the URL
    async with websockets.connect(url, max_size=2**22, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(json.dumps({"type": "audio", "speaker": speaker,
                                  "format": {"encoding": "s16le", "sample_rate": 16000, "channels": 1}}))
        ready = json.loads(await ws.recv())
        assert ready["type"] == "audio_ready", ready
        start = time.perf_counter()

        async def reader() -> None:
            async for raw in ws:
                m = json.loads(raw)
                if m["type"] == "prediction":
                    now = time.perf_counter() - start
                    true_end = min((t["track_end"] for t in turns if abs(t["track_end"] - m["end"]) < 1.0),
                                   default=m["end"], key=lambda e: abs(e - m["end"]))
                    results.append({"speaker": speaker, "server_ms": m["latency_ms"], "stages": m["stages_ms"],
                                    "user_ms": (now - true_end) * 1000, "text": m["text"]})
                elif m["type"] == "error":
                    results.append({"speaker": speaker, "error": m["error"]})

        task = asyncio.create_task(reader())
        step = FRAME * 2
        late = 0.0
        for k, off in enumerate(range(0, len(pcm), step)):
            delay = start + k * 0.1 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            late = max(late, -delay)
            await ws.send(pcm[off:off + step])
        results.append({"speaker": speaker, "send_late_s": late})
        await asyncio.sleep(drain_s)
        task.cancel()


async def live(url: str, folder: Path, script: list[dict], n: int, drain_s: float) -> tuple[list[dict], int, float]:
    import httpx

    sessions = []
    async with httpx.AsyncClient() as client:
        for i in range(n):
            s = (await client.post(url + "/v1/sessions")).json()
            sessions.append((s, script[i % len(script)]))
    jobs, results, expected, audio_s = [], [], 0, 0.0
    t0 = time.perf_counter()
    for s, d in sessions:
        ws_url = url.replace("http://", "ws://") + s["stream"] + f"#{s['token']}"
        for speaker in ("A", "B"):
            x = read_wav(folder / "tracks" / f"{d['dialogue']}_{speaker}.wav")
            audio_s += len(x) / SAMPLE_RATE
            turns = [t for t in d["turns"] if t["speaker"] == speaker]
            expected += len(turns)
            jobs.append(participant(ws_url, speaker, float_to_pcm(x), turns, results, t0, drain_s))
    await asyncio.gather(*jobs)
    return results, expected, audio_s


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dialogues", type=int, default=8, help="test conversations spoken (default %(default)s)")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 8], help="concurrent sessions, each N in turn")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--drain", type=float, default=8.0, help="seconds to wait for answers after a track ends")
    p.add_argument("--compare-full", action="store_true", help="also decode with Whisper's 30 s window")
    p.add_argument("--skip-stages", action="store_true")
    p.add_argument("--asr-threads", type=int, default=1, help="the server's threads per Whisper decode")
    p.add_argument("--asr-batch", type=int, default=8, help="the server's utterances per Whisper batch")
    args = p.parse_args()
    print(f"# bench/audio.py {' '.join(sys.argv[1:])}  ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        script = corpus(folder / "corpus", args.dialogues, args.seed)
        checkpoint = make_checkpoint(folder)
        if not args.skip_stages:
            s = stages(folder / "corpus", script, checkpoint, args.compare_full)
            print(f"stages: {s['audio_s']} s of audio (both tracks of {len(script)} conversations), "
                  f"{s['turns']} utterances, lost by the segmenter {s['lost']}")
            print(f"  WER {100 * s['wer']:.1f}%" + (f" (faster-whisper's 30 s window: {100 * s['wer_full']:.1f}%)"
                                                  if "wer_full" in s else ""))
            print("  real-time factor per stage (CPU s per audio s, 1 thread): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in s["rtf"].items()))
        for n in args.sessions:
            server = Server(checkpoint, folder / f"s{n}.db", args.asr_threads, args.asr_batch)
            try:
                cpu0 = server.cpu()
                results, expected, audio_s = asyncio.run(live(server.url, folder / "corpus", script, n, args.drain))
                cpu = server.cpu() - cpu0
            finally:
                server.stop()
            preds = [r for r in results if "server_ms" in r]
            late = max((r["send_late_s"] for r in results if "send_late_s" in r), default=0.0)
            print(f"  (the client sent its frames at most {late:.2f} s behind real time; client CPU "
                  f"{time.process_time():.0f} s so far)")
            errs = [r["error"] for r in results if "error" in r]
            server_ms = [r["server_ms"] for r in preds]
            user_ms = [r["user_ms"] for r in preds]
            print(f"live, {n} session(s) x 2 participants: {len(preds)}/{expected} predictions, lost "
                  f"{expected - len(preds)}, errors {dict((e, errs.count(e)) for e in set(errs)) or 0}; "
                  f"end of speech detected -> prediction p50 {pct(server_ms, 50):.0f} ms p99 {pct(server_ms, 99):.0f} "
                  f"ms; true end of speech -> prediction p50 {pct(user_ms, 50):.0f} ms p99 {pct(user_ms, 99):.0f} ms; "
                  f"server CPU {cpu / audio_s:.3f} s per audio s ({audio_s:.0f} s of audio)")
            if preds:
                names = sorted({k for r in preds for k in r["stages"]})
                print("  where the time goes (p50/p99 ms, waits included): " + ", ".join(
                    f"{k} {pct([r['stages'].get(k, 0) for r in preds], 50):.0f}/"
                    f"{pct([r['stages'].get(k, 0) for r in preds], 99):.0f}" for k in names))


if __name__ == "__main__":
    main()
