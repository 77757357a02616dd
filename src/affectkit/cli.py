"""The ``affectkit`` command line: parses arguments, then calls the library. Errors print one line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from affectkit.errors import AffectkitError, ConfigError, DataError
from affectkit.metrics import format_number

if TYPE_CHECKING:
    from affectkit.stream import Prediction, Stream

log = logging.getLogger("affectkit")




def metric_table(rows: dict[str, dict[str, object]]) -> str:
    """A small text table: one column per split, one row per scalar metric."""
    names = [k for k, v in next(iter(rows.values())).items() if isinstance(v, float | int) or v is None]
    width = max(len(n) for n in names) + 2
    lines = ["metric".ljust(width) + "".join(s.rjust(10) for s in rows)]
    lines += [n.ljust(width) + "".join(format_number(r.get(n)).rjust(10) for r in rows.values()) for n in names]
    return "\n".join(lines)


def cmd_make_synthetic(args: argparse.Namespace) -> None:
    import shlex

    command = ["affectkit", "make-synthetic", args.kind, str(args.out), "--seed", str(args.seed)]
    if args.kind == "mosi":
        from affectkit.data.synthetic_mosi import write_synthetic_mosi

        sizes = None
        if args.small:
            sizes = {"train": 240, "valid": 60, "test": 120}
        write_synthetic_mosi(args.out, seed=args.seed, sizes=sizes,
                             command=shlex.join(command + (["--small"] if args.small else [])))
    elif args.kind == "spoken":
        from affectkit.audio.synthetic import write_spoken_corpus

        sizes = {"train": 8, "dev": 2, "test": 2} if args.small else None
        write_spoken_corpus(args.out, sizes, seed=args.seed,
                            command=shlex.join(command + (["--small"] if args.small else [])))
    else:
        from affectkit.data.synthetic_conversation import write_synthetic_conversations

        write_synthetic_conversations(args.out, preset=args.preset, seed=args.seed,
                                      command=shlex.join(command + ["--preset", args.preset]))
    print(f"wrote {args.out}")


def _train_and_report(config: str | Path | None, data: str | None, overrides: list[str]) -> None:
    from affectkit.config import load_config
    from affectkit.train import train

    cfg = load_config(config, overrides)
    result = train(cfg, data_path=data)
    print(metric_table({"valid": result.valid, "test": result.test}))
    stop = f" (early stop after {result.epochs_run})" if result.stopped_early else ""
    print(f"selected epoch {result.best_epoch} of {result.max_epochs}{stop} on valid {result.select}; "
          f"{result.train_seconds:.1f}s training, {result.n_params} parameters")
    print(f"run folder: {result.run_dir}  (tensorboard --logdir {result.run_dir / 'tb'})")


def cmd_train(args: argparse.Namespace) -> None:
    _train_and_report(args.config, args.data, args.set or [])


def cmd_demo(args: argparse.Namespace) -> None:
    from affectkit.data.synthetic_mosi import write_synthetic_mosi

    out = Path(args.out)
    data = out / "synthetic_mosi.pkl"
    if not data.exists():
        print(f"writing a synthetic MOSI file (real layout and shapes) to {data}")
        write_synthetic_mosi(data, seed=0)
    # The dataclass defaults are the lab recipe (configs/mosi_lab.yaml spells them out; a test keeps them equal).
    _train_and_report(None, str(data), [f"train.epochs={args.epochs}", f"out_dir={out / 'runs'}", "name=demo"])


def cmd_eval(args: argparse.Namespace) -> None:
    from affectkit.evaluate import evaluate_checkpoint

    results = evaluate_checkpoint(args.checkpoint, args.data, args.split, device=args.device)
    print(metric_table(results))
    if args.json:
        from affectkit.train import json_safe

        Path(args.json).write_text(json.dumps(json_safe(results), indent=2))


def format_prediction(pred: Prediction, speaker: str, names: Sequence[str]) -> str:
    """``position<TAB>speaker<TAB>label<TAB>prob<TAB>name=p name=p ...`` (one line)."""
    probs = " ".join(f"{name}={p:.3f}" for name, p in zip(names, pred.probs))
    return f"{pred.position}\t{speaker}\t{pred.label}\t{pred.prob:.3f}\t{probs}"


def input_lines(path: str | Path | None = None) -> Iterator[str]:
    """Lines of stdin as they arrive, or of the file ``path`` (DataError now if it does not exist)."""
    if path is None:
        return iter(sys.stdin.readline, "")
    if not Path(path).is_file():
        raise DataError(f"{path}: input file not found")
    return _file_lines(Path(path))


def _file_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        yield from f


def run_lines(session: Stream, lines: Iterable[str], out: TextIO | None = None,
              err: TextIO | None = None) -> tuple[int, int]:
    """Classify ``speaker<TAB>sentence`` lines as they come, printing (and flushing) one prediction per
    line to ``out``; a malformed line prints an error line to ``err`` and the stream goes on.  Blank
    lines are skipped.  Returns (predictions, errors)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if session.modalities != ("text",):
        raise ConfigError(f"affectkit stream reads text lines only; this checkpoint reads "
                          f"{', '.join(session.modalities)}: use Stream.push with features")
    session.engine.check_text_encoder()
    session.engine.embed_sentences(["warm up"])  # load the encoder before the first line arrives
    done = failed = 0
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        speaker, tab, sentence = line.partition("\t")
        try:
            if not tab:
                raise DataError("expected 'speaker<TAB>sentence'")
            pred = session.push_text(speaker.strip(), sentence.strip())
        except DataError as exc:
            failed += 1
            print(f"line {lineno}: error: {exc}", file=err, flush=True)
            continue
        done += 1
        print(format_prediction(pred, speaker.strip(), session.label_names), file=out, flush=True)
    return done, failed


def cmd_stream(args: argparse.Namespace) -> None:
    """Classify ``speaker<TAB>sentence`` lines live (stdin or --input), one prediction line each."""
    from affectkit.stream import Stream

    session = Stream(args.checkpoint)
    log.info("streaming %s: per line: position, speaker, label, prob, all probs", args.checkpoint)
    run_lines(session, input_lines(args.input))


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a causal checkpoint over HTTP + WebSocket (affectkit.serve); binds 127.0.0.1 by default."""
    from affectkit.serve.audio_ws import AudioSettings
    from affectkit.serve.run import serve

    audio = AudioSettings(pause_ms=args.pause_ms, max_utterance_s=args.max_utterance, store_audio=args.store_audio,
                          asr_threads=args.asr_threads, asr_batch=args.asr_batch)
    serve(args.checkpoint, host=args.host, port=args.port, store=args.store, max_batch=args.max_batch,
          max_wait_ms=args.batch_wait_ms, max_queue=args.max_queue, idle_evict_s=args.idle_evict,
          threads=args.threads, audio=audio, api_key=args.api_key, create_per_min=args.create_rate,
          create_burst=args.create_burst, connect_per_min=args.connect_rate,
          refusal_delay_s=args.refusal_delay,
          max_sessions=args.max_sessions, max_utterances=args.max_utterances, max_store_mb=args.max_store_mb,
          retain_days=args.retain, rate_per_s=args.rate, max_live_sessions=args.max_live,
          idle_timeout_s=args.idle_timeout, engine_batch=not args.no_engine_batch,
          allowed_hosts=tuple(args.allowed_host) if args.allowed_host else None,
          allowed_origins=tuple(args.allowed_origin) if args.allowed_origin else None,
          rate_burst=2 * args.rate, text_runtime=args.text_runtime, ssl_certfile=args.ssl_certfile,
          ssl_keyfile=args.ssl_keyfile,
          proxy_headers=args.forwarded_allow_ips is not None, forwarded_allow_ips=args.forwarded_allow_ips)


def cmd_study(args: argparse.Namespace) -> None:
    """Run a study (variants x seeds, resumable), then write results.csv, summary.md and plots."""
    from affectkit.studies import run_study

    result = run_study(args.config, data=args.data, seeds=args.seeds, workers=args.workers, out=args.out,
                       overrides=args.set or [], threads=args.threads, engine=args.engine, address=args.address,
                       devices=args.devices, gpus_per_run=args.gpus_per_run)
    print(result.report())
    if result.failures:
        raise AffectkitError(f"{len(result.failures)} run(s) failed; rerun the same command to retry them")


def cmd_sweep(args: argparse.Namespace) -> None:
    """Search a sweep file's ranges (resumable), write its tables and plots, test the best config once."""
    from affectkit.sweep import run_sweep

    result = run_sweep(args.config, data=args.data, trials=args.trials, out=args.out, storage=args.storage,
                       overrides=args.set or [], engine=args.engine, address=args.address, workers=args.workers,
                       threads=args.threads, heartbeat_s=args.heartbeat, grace_s=args.grace)
    print(result.report())


def cmd_features(args: argparse.Namespace) -> None:
    if args.kind == "audio":
        cmd_features_audio(args)
        return
    if not args.dataset:
        raise ConfigError("features text needs --dataset (iemocap, iemocap4 or meld)")
    from affectkit.features.text import build_text_features

    summary = build_text_features(args.dataset, Path(args.source), Path(args.out), cache_dir=args.cache,
                                  batch_size=args.batch_size, progress=True, encoder=args.encoder,
                                  crossfit=args.crossfit, base=args.encoder_base)
    print(f"wrote {summary['out']} ({summary['encoder']}): dialogues {summary['dialogues']}, "
          f"utterances {summary['utterances']}; "
          f"{summary['embedded']} sentences embedded, {summary['cached']} from the cache "
          f"({summary['seconds']:.1f}s)")
    print(summary["notes"])


def cmd_features_audio(args: argparse.Namespace) -> None:
    """eGeMAPS prosody of a labelled corpus of utterance audio -> the conversation layout (audio modality)."""
    from affectkit.audio.features import build_audio_features

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    s = build_audio_features(args.source, args.out, classes=classes, seed=args.seed, progress=not args.quiet)
    tag = " (SYNTHETIC)" if s["synthetic"] else ""
    print(f"wrote {s['out']}{tag}: {s['utterances']} utterances, {s['seconds']:.0f}s of audio; dialogues "
          + ", ".join(f"{k} {v}" for k, v in s["dialogues"].items()) + f"; classes {', '.join(s['classes'])}")


def _tracks(specs: list[str]) -> dict[str, str]:
    tracks: dict[str, str] = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq:
            name, path = Path(spec).stem, spec
        if not name.strip() or not path:
            raise DataError(f"--audio {spec!r}: expected NAME=FILE.wav")
        if name in tracks:
            raise DataError(f"--audio: participant {name!r} given twice")
        tracks[name.strip()] = path
    return tracks


def cmd_transcribe(args: argparse.Namespace) -> None:
    """Recordings (one WAV per participant) -> the timeline of transcript and emotion per utterance."""
    from affectkit.audio.recordings import timeline, write_timeline
    from affectkit.audio.segmenter import SegmenterConfig

    tracks = _tracks(args.audio)
    out = Path(args.out)
    if out.suffix not in (".csv", ".jsonl"):
        raise DataError(f"{out}: the timeline is written as .csv or .jsonl")
    config = SegmenterConfig(pause_ms=args.pause_ms, max_utterance_s=args.max_utterance)
    rows, labels = timeline(args.checkpoint, tracks, config, progress=not args.quiet)
    write_timeline(rows, out, labels)
    done = sum(r["label"] is not None for r in rows)
    print(f"wrote {out}: {len(rows)} utterances ({done} classified) from {len(tracks)} track(s)")


def cmd_finetune_text(args: argparse.Namespace) -> None:
    """Fine-tune the sentence encoder on a train split; print the classifier's dev/test scores."""
    from affectkit.features.encoder_ref import SUMMARY_FILE
    from affectkit.features.finetune import FinetuneConfig, finetune_crossfit, finetune_text

    cfg = FinetuneConfig(context=args.context, speaker=args.speaker, class_weights=args.class_weights,
                         epochs=args.epochs, seed=args.seed, max_length=args.max_length,
                         batch_size=args.batch_size, lr=args.lr)
    base = args.base
    if args.encoder_base is not None:
        from affectkit.features.packaged import base_dir

        if args.base is not None:
            raise ConfigError("give --base DIR or --encoder-base NAME, not both")
        base = base_dir(args.encoder_base)
    run = dict(cfg=cfg, progress=not args.quiet, base=base, threads=args.threads)
    if args.crossfit and (Path(args.out) / SUMMARY_FILE).is_file():  # main encoder done: resume the folds
        s = json.loads((Path(args.out) / SUMMARY_FILE).read_text())
    else:
        s = finetune_text(args.dataset, args.source, args.out, **run)
    print(f"wrote encoder {args.out} (sha256 {s['encoder_sha256'][:12]}); best epoch {s['best_epoch']} of "
          f"{cfg.epochs} on dev; classifier weighted F1 dev {s['dev']['F1_weighted']:.4f} "
          f"test {s['test']['F1_weighted']:.4f}; {s['seconds']:.0f}s")
    if args.crossfit:
        folds = finetune_crossfit(args.dataset, args.source, args.out, args.crossfit, **run)
        print(f"wrote {len(folds)} cross-fitting fold encoders under {Path(args.out) / 'folds'}")


def cmd_distil_text(args: argparse.Namespace) -> None:
    """Distil a fine-tuned encoder into the shipped MiniLM; print how closely the student follows it."""
    from affectkit.features.distil import DistilConfig, distil_encoder

    cfg = DistilConfig(epochs=args.epochs, seed=args.seed, max_length=args.max_length, batch_size=args.batch_size,
                       lr=args.lr)
    s = distil_encoder(args.teacher, args.dataset, args.source, args.out, cfg, progress=not args.quiet,
                       student=args.student, threads=args.threads)
    print(f"wrote encoder {args.out} (sha256 {s['encoder_sha256'][:12]}), distilled from "
          f"{s['distilled_from']['name']}; "
          f"best epoch {s['best_epoch']} of {cfg.epochs} on dev; agreement with the teacher's top "
          f"{s['dim']} directions ({100 * s['teacher_variance_kept']:.1f}% of its variance): dev R^2 "
          f"{s['dev']['r2']:.3f} cosine {s['dev']['cosine']:.3f}, test R^2 {s['test']['r2']:.3f} cosine "
          f"{s['test']['cosine']:.3f}; {s['seconds']:.0f}s")


def _encoder_training_options(s: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    """The options finetune-text and distil-text share (the Trainer's settings)."""
    s.add_argument("--epochs", type=int, default=epochs)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-length", type=int, default=128, help="tokens per input (context cut from the left)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=lr)
    s.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """``["field=name", ...]`` -> {field: name}; ConfigError for an item without '='."""
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"{what}: expected FIELD=NAME, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def cmd_import(args: argparse.Namespace) -> None:
    """A table of utterances (CSV/TSV/JSONL or a folder) -> a conversation feature file."""
    from affectkit.features.table import import_table

    classes = [c for c in args.classes.split(",")] if args.classes else None
    summary = import_table(args.source, args.out, columns=_pairs(args.column, "--column"), classes=classes,
                           labelled=False if args.unlabelled else None, encoding=args.encoding,
                           fractions=args.split_fractions, seed=args.seed, audio=not args.no_audio,
                           cache_dir=args.cache, encoder=args.encoder, batch_size=args.batch_size,
                           progress=not args.quiet)
    classes_note = ", ".join(summary["classes"]) if summary["labelled"] else "none (unlabelled: predict only)"
    print(f"wrote {summary['out']}: dialogues {summary['dialogues']}, utterances {summary['utterances']}; "
          f"classes: {classes_note}; {summary['speakers']} speakers; modalities {', '.join(summary['modalities'])}; "
          f"{summary['embedded']} sentences embedded, {summary['cached']} from the cache ({summary['seconds']:.1f}s)")
    print(summary["notes"])


def cmd_predict(args: argparse.Namespace) -> None:
    """Labels and class probabilities for every utterance of a conversation file (labels not needed)."""
    from affectkit.predict import FORMATS, format_predictions, predict_checkpoint, write_predictions

    if args.out and Path(args.out).suffix.lower() not in FORMATS:
        raise ConfigError(f"--out {args.out}: use a .csv or .jsonl file")
    names, rows = predict_checkpoint(args.checkpoint, args.data, args.split, device=args.device)
    if args.out:
        write_predictions(names, rows, args.out)
        log.info("wrote %d predictions (%s) to %s", len(rows), ", ".join(names), args.out)
    else:
        sys.stdout.write(format_predictions(names, rows, ".csv"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="affectkit", description="Multimodal affect recognition toolkit.")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="write a synthetic MOSI file, train the lab baseline, print metrics")
    s.add_argument("--out", default="affectkit-demo", help="folder for the data and the run (default %(default)s)")
    s.add_argument("--epochs", type=int, default=3)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("make-synthetic", help="write a synthetic data file in a real on-disk format")
    s.add_argument("kind", choices=["mosi", "conversation", "spoken"],
                   help="spoken: a folder of espeak-ng dialogues (WAVs + manifest.csv; needs espeak-ng)")
    s.add_argument("out")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--small", action="store_true", help="mosi: 240/60/120 clips instead of the real 1284/229/686; "
                                                         "spoken: 8/2/2 dialogues instead of 24/6/6")
    s.add_argument("--preset", default="iemocap6", choices=["iemocap6", "iemocap4", "mosei2"],
                   help="conversation: which dataset's layout and classes")
    s.set_defaults(func=cmd_make_synthetic)

    s = sub.add_parser("train", help="train a config preset")
    s.add_argument("config", help="YAML preset, e.g. configs/mosi_lab.yaml")
    s.add_argument("--data", help="data file (overrides data.path)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.epochs=5")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="rebuild a model from its checkpoint alone and evaluate it")
    s.add_argument("checkpoint")
    s.add_argument("data")
    s.add_argument("--split", action="append", help="split(s) to evaluate (default: all)")
    s.add_argument("--json", help="also write the metrics to this JSON file")
    s.add_argument("--device", default="auto", help="auto (cuda, mps, else cpu) | cpu | cuda | cuda:N | mps")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("stream", help="classify 'speaker<TAB>sentence' lines live (causal text checkpoint)")
    s.add_argument("checkpoint", help="a causal, text-only CORECT checkpoint (best.pt)")
    s.add_argument("--input", help="read lines from this file instead of stdin")
    s.set_defaults(func=cmd_stream)

    s = sub.add_parser("serve", help="live emotion service: WebSocket API + browser view (causal checkpoint)")
    s.add_argument("checkpoint", help="a causal CORECT checkpoint (best.pt)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free one; default %(default)s)")
    s.add_argument("--store", default="affectkit-sessions.db",
                   help="log of sessions: a SQLite file (default %(default)s) or postgresql://user@host:port/dbname, "
                        "shared by several replicas")
    s.add_argument("--max-batch", type=int, default=32, help="utterances per batch; 1 turns batching off")
    s.add_argument("--batch-wait-ms", type=float, default=2.0, help="wait this long to fill a batch")
    s.add_argument("--max-queue", type=int, default=256,
                   help="waiting utterances beyond which new ones are refused as 'overloaded'")
    s.add_argument("--idle-evict", type=float, default=600.0, help="seconds before an idle session leaves memory")
    s.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of the model and the text encoder (default %(default)s; more only on a "
                        "machine with nothing else to run)")
    s.add_argument("--max-live", type=int, default=1024, help="sessions kept in memory at most")
    s.add_argument("--idle-timeout", type=float, default=300.0, help="seconds before a silent WebSocket is closed")
    s.add_argument("--rate", type=float, default=20.0, help="frames per second per session, valid or not (burst 2x)")
    s.add_argument("--no-engine-batch", action="store_true",
                   help="push each session on its own (encoder-only batching; the bench's baseline)")
    s.add_argument("--text-runtime", choices=["torch", "onnx", "onnx-int8"], default="onnx",
                   help="what runs the sentence encoder: onnx (default; ONNX Runtime, the same vectors as torch, "
                        "about 2x faster), torch, or onnx-int8 (faster again; vectors move slightly: bench/README)")
    s.add_argument("--api-key", help="operator key needed to create sessions (or $AFFECTKIT_API_KEY); "
                                     "required to bind beyond localhost")
    s.add_argument("--create-rate", type=float, default=30.0, help="new sessions per minute per client address")
    s.add_argument("--create-burst", type=float, default=10.0, help="new sessions at once per client address")
    s.add_argument("--connect-rate", type=float, default=60.0, help="WebSocket connects per minute per session")
    s.add_argument("--refusal-delay", type=float, default=1.0, metavar="SECONDS",
                   help="answer a rate-limit refusal after its Retry-After, at most this long (0: at once), so "
                        "a client looping on refusals costs the server a few answers a second")
    s.add_argument("--max-sessions", type=int, default=10_000, help="sessions kept in the log at most")
    s.add_argument("--max-utterances", type=int, default=10_000, help="utterances per session at most")
    s.add_argument("--max-store-mb", type=float, default=4096.0, help="log size beyond which nothing new is stored")
    s.add_argument("--retain", type=float, metavar="DAYS",
                   help="delete sessions unused for DAYS days, with their log (default: keep)")
    s.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="Host header to serve (repeat; *.example.com for subdomains; default: this machine's "
                        "names and --host)")
    s.add_argument("--allowed-origin", action="append", metavar="URL",
                   help="browser origin besides the page's own that may open sessions (repeat)")
    s.add_argument("--ssl-certfile", help="TLS certificate (PEM); with --ssl-keyfile, uvicorn serves https/wss")
    s.add_argument("--ssl-keyfile", help="TLS private key (PEM)")
    s.add_argument("--forwarded-allow-ips", metavar="IPS",
                   help="trust X-Forwarded-For/-Proto from these proxy addresses (comma-separated)")
    s.add_argument("--pause-ms", type=int, default=500, help="audio: silence that ends an utterance")
    s.add_argument("--max-utterance", type=float, default=15.0, help="audio: seconds at which an utterance is cut")
    s.add_argument("--asr-threads", type=int, default=1, help="audio: CPU threads of one Whisper decode")
    s.add_argument("--asr-batch", type=int, default=8, help="audio: utterances (of all sessions) decoded together")
    s.add_argument("--store-audio", action="store_true",
                   help="audio: keep each utterance's PCM in the log (off: a voice is personal data)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("study", help="run a study (variants x seeds) and summarise it against its baseline")
    s.add_argument("config", help="study file, e.g. configs/studies/ablations.yaml")
    s.add_argument("--data", help="data file (default: the base preset's data.path)")
    s.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="seeds (default: the study's)")
    s.add_argument("--workers", type=int, default=1, help="parallel runs (processes); default %(default)s")
    s.add_argument("--out", help="study folder (default studies/NAME); finished runs there are skipped")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for all runs")
    s.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this machine's process pool (default); ray: each run a Ray task")
    s.add_argument("--address", help="ray: the cluster (auto or HOST:PORT; default: start a local instance)")
    s.add_argument("--threads", type=int, help="torch threads (local) or CPUs (ray) per run")
    s.add_argument("--devices", nargs="+", metavar="DEV", help="local: one device per worker, e.g. cuda:0 cuda:1")
    s.add_argument("--gpus-per-run", type=float, default=1.0, help="ray: GPUs per cuda run (a fraction shares one)")
    s.set_defaults(func=cmd_study)

    s = sub.add_parser("sweep", help="search hyper-parameters with Optuna (TPE, pruning), then test the best once")
    s.add_argument("config", help="sweep file, e.g. configs/sweeps/mosi_baseline.yaml")
    s.add_argument("--data", help="data file (default: the base preset's data.path)")
    s.add_argument("--trials", type=int, help="total trials (default: the sweep file's)")
    s.add_argument("--out", help="sweep folder (default sweeps/NAME); the study there resumes")
    s.add_argument("--storage", help="Optuna storage, any SQLAlchemy URL (default sqlite:///OUT/optuna.db); "
                   "postgresql://user@host/db lets processes on several machines share the study")
    s.add_argument("--heartbeat", type=int, default=30, help="seconds between a running trial's heartbeats")
    s.add_argument("--grace", type=int, default=120,
                   help="seconds of silence after which a running trial is stale: failed and queued again")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for all trials")
    s.add_argument("--engine", choices=["local", "ray"], default="local")
    s.add_argument("--address", help="ray: the cluster (auto or HOST:PORT; default: start a local instance)")
    s.add_argument("--workers", type=int, help="ray: trials at a time (default: the cluster's CPUs / CPUs per trial)")
    s.add_argument("--threads", type=int, help="torch threads (local) or CPUs (ray) per trial")
    s.set_defaults(func=cmd_sweep)
    s = sub.add_parser("features", help="turn transcripts (text) or utterance audio (audio) into the conversation "
                                        "feature layout")
    s.add_argument("kind", choices=["text", "audio"])
    s.add_argument("--dataset", choices=["iemocap", "iemocap4", "meld"], help="text: which transcript set")
    s.add_argument("--source", required=True, help="text: folder (or .pkl) of the COSMIC transcripts; audio: a "
                                                   "manifest CSV or a folder holding manifest.csv")
    s.add_argument("--classes", help="audio: class names in order, comma-separated (default: the corpus's)")
    s.add_argument("--seed", type=int, default=0, help="audio: seed of the split when the manifest has none")
    s.add_argument("out", help="output pickle (conversation layout, text only)")
    s.add_argument("--cache", help="embedding cache folder (default $AFFECTKIT_CACHE or ~/.cache/affectkit)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--encoder", metavar="DIR", help="a finetune-text output folder instead of the shipped encoder")
    s.add_argument("--encoder-base", metavar="NAME",
                   help="frozen base encoder: minilm (all-MiniLM-L6-v2, 384-d; the default) or mpnet "
                        "(all-mpnet-base-v2, 768-d, assembled once from its packages); with --encoder, its base")
    s.add_argument("--crossfit", action="store_true",
                   help="train-split vectors from the encoder's fold encoders (finetune-text --crossfit K)")
    s.set_defaults(func=cmd_features)

    s = sub.add_parser("transcribe", help="recordings (a WAV per participant) -> transcript + emotion timeline")
    s.add_argument("checkpoint", help="a causal CORECT checkpoint (text, or 88-d eGeMAPS audio, or both)")
    s.add_argument("--audio", action="append", required=True, metavar="NAME=FILE.wav",
                   help="one participant's track (repeat per participant; any PCM WAV, resampled to 16 kHz)")
    s.add_argument("--out", default="timeline.csv", help="timeline file, .csv or .jsonl (default %(default)s)")
    s.add_argument("--pause-ms", type=int, default=500, help="silence that ends an utterance (default %(default)s)")
    s.add_argument("--max-utterance", type=float, default=15.0, help="seconds at which an utterance is cut")
    s.set_defaults(func=cmd_transcribe)

    s = sub.add_parser("finetune-text", help="fine-tune the sentence encoder as an utterance emotion classifier")
    s.add_argument("--dataset", required=True, choices=["iemocap", "iemocap4", "meld"])
    s.add_argument("--source", required=True, help="folder (or .pkl) of the COSMIC transcripts")
    s.add_argument("out", help="output folder (the encoder); rerun the same command to resume")
    s.add_argument("--context", type=int, default=0, metavar="K", help="past utterances in the input (default 0)")
    s.add_argument("--speaker", action="store_true", help="prefix each turn with its speaker tag")
    s.add_argument("--class-weights", action="store_true", help="inverse-frequency class weights (MELD)")
    _encoder_training_options(s, epochs=4, lr=5e-5)
    s.add_argument("--base", help="base encoder folder (default: the shipped all-MiniLM-L6-v2)")
    s.add_argument("--encoder-base", metavar="NAME",
                   help="base encoder by name instead of --base: minilm (the default) or mpnet (all-mpnet-base-v2)")
    s.add_argument("--crossfit", type=int, default=0, metavar="K",
                   help="also train K fold encoders, each without one train fold (for features --crossfit)")
    s.set_defaults(func=cmd_finetune_text)

    s = sub.add_parser("distil-text", help="distil a fine-tuned encoder (e.g. mpnet) into MiniLM for live speed")
    s.add_argument("--teacher", required=True, metavar="DIR", help="a finetune-text output folder")
    s.add_argument("--dataset", required=True, choices=["iemocap", "iemocap4", "meld"])
    s.add_argument("--source", required=True, help="folder (or .pkl) of the COSMIC transcripts")
    s.add_argument("out", help="output folder (the student encoder); rerun the same command to resume")
    _encoder_training_options(s, epochs=3, lr=1e-4)
    s.add_argument("--student", help="student encoder folder (default: the shipped all-MiniLM-L6-v2)")
    s.set_defaults(func=cmd_distil_text)

    s = sub.add_parser("import", help="your own conversations: a CSV/TSV/JSONL table (or folder) -> feature file")
    s.add_argument("source", help="table file (.csv .tsv .jsonl) or a folder of them; one row per utterance")
    s.add_argument("out", help="output pickle (conversation layout)")
    s.add_argument("--column", action="append", metavar="FIELD=NAME",
                   help="map a field (dialogue order speaker text label split audio start end) to your column")
    s.add_argument("--classes", help="class names in label order, comma-separated (default: the labels found, sorted)")
    s.add_argument("--unlabelled", action="store_true", help="ignore any label column (for predict only)")
    s.add_argument("--encoding", default="auto", choices=["auto", "utf-8", "cp1252"],
                   help="auto: UTF-8, or cp1252 for a file with no UTF-8 text (default %(default)s)")
    s.add_argument("--split-fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "DEV", "TEST"),
                   help="seeded split by dialogue when there is no split column (default 0.8 0.1 0.1)")
    s.add_argument("--seed", type=int, default=0, help="seed of that split (default %(default)s)")
    s.add_argument("--no-audio", action="store_true", help="ignore an audio column")
    s.add_argument("--cache", help="embedding cache folder (default $AFFECTKIT_CACHE or ~/.cache/affectkit)")
    s.add_argument("--encoder", metavar="DIR", help="a finetune-text output folder instead of the shipped encoder")
    s.add_argument("--batch-size", type=int, default=64)
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("predict", help="labels and class probabilities for every utterance (labels not needed)")
    s.add_argument("checkpoint", help="a conversation checkpoint (best.pt); causal ones predict as the live service")
    s.add_argument("data", help="a conversation file, e.g. from affectkit import (labelled or not)")
    s.add_argument("--out", help="predictions.csv or predictions.jsonl (default: CSV on stdout)")
    s.add_argument("--split", action="append", help="split(s) to predict (default: all)")
    s.add_argument("--device", default="auto", help="auto (cuda, mps, else cpu) | cpu | cuda | cuda:N | mps")
    s.set_defaults(func=cmd_predict)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    try:
        args.func(args)
    except AffectkitError as exc:
        print(f"affectkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("affectkit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
