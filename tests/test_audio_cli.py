"""The audio path end to end on the SYNTHETIC spoken corpus: `features audio` -> a causal model trained on
the 88 eGeMAPS numbers -> `affectkit transcribe` over one WAV per participant; and the one-line errors."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("silero_vad")
pytest.importorskip("faster_whisper")
pytest.importorskip("opensmile")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (.ci/run installs it)", allow_module_level=True)

from affectkit.audio.frontend import word_errors  # noqa: E402
from affectkit.audio.synthetic import write_spoken_corpus  # noqa: E402
from affectkit.cli import main  # noqa: E402
from affectkit.config import load_config  # noqa: E402
from affectkit.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spoken")
    write_spoken_corpus(out, {"train": 6, "dev": 2, "test": 1}, turns=(4, 6), seed=3)
    return out


@pytest.fixture(scope="module")
def audio_checkpoint(corpus) -> Path:
    assert main(["-q", "features", "audio", "--source", str(corpus), str(corpus / "audio.pkl")]) == 0
    cfg = load_config(ROOT / "configs" / "corect_iemocap4_causal.yaml", [
        "model.modalities=[audio]", "model.hidden=16", "model.graph_heads=2", "train.epochs=8", "train.lr=0.003",
        "train.batch_size=2", "train.progress=false", "train.tensorboard=false", f"out_dir={corpus / 'runs'}"])
    return train(cfg, data_path=corpus / "audio.pkl").run_dir / "best.pt"


def test_features_audio_writes_standardised_egemaps(corpus, audio_checkpoint, capsys):
    raw = pickle.loads((corpus / "audio.pkl").read_bytes())
    assert raw["label_names"] == ["hap", "sad", "neu", "ang"] and raw["affectkit_provenance"]["synthetic"] is True
    train_rows = np.concatenate([d["audio"] for d in raw["train"]])
    assert train_rows.shape[1] == 88
    np.testing.assert_allclose(train_rows.mean(0), 0, atol=1e-4)  # standardised on the train split
    meta = raw["meta"]["audio_features"]
    assert meta["kind"] == "eGeMAPSv02-functionals" and len(meta["mean"]) == len(meta["std"]) == 88
    import torch

    info = torch.load(audio_checkpoint, weights_only=True)["info"]
    assert info["audio_features"]["mean"] == meta["mean"]  # the transform rides into the checkpoint


def test_transcribe_writes_the_timeline(corpus, audio_checkpoint, tmp_path, capsys):
    script = json.loads((corpus / "corpus.json").read_text())["dialogues"]
    test = next(d for d in script if d["split"] == "test")
    vid = test["dialogue"]
    out = tmp_path / "timeline.csv"
    assert main(["-q", "transcribe", str(audio_checkpoint), "--audio", f"A={corpus / 'tracks' / f'{vid}_A.wav'}",
                 "--audio", f"B={corpus / 'tracks' / f'{vid}_B.wav'}", "--out", str(out)]) == 0
    assert f"{len(test['turns'])} utterances" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(test["turns"])
    assert [r["position"] for r in rows] == [str(k) for k in range(len(rows))]
    errors = 0
    for r, turn in zip(rows, test["turns"]):
        assert r["speaker"] == turn["speaker"]  # conversation order = the script's order
        assert abs(float(r["start"]) - turn["track_start"]) < 0.3 and abs(float(r["end"]) - turn["track_end"]) < 0.4
        assert r["label"] in ("hap", "sad", "neu", "ang")
        assert sum(float(r[f"p_{c}"]) for c in ("hap", "sad", "neu", "ang")) == pytest.approx(1, abs=1e-4)
        errors += word_errors(turn["text"], r["text"])[0]
    assert errors <= 0.3 * sum(len(t["text"].split()) for t in test["turns"])
    jl = tmp_path / "timeline.jsonl"
    assert main(["-q", "transcribe", str(audio_checkpoint), "--audio", f"A={corpus / 'tracks' / f'{vid}_A.wav'}",
                 "--out", str(jl)]) == 0
    first = json.loads(jl.read_text().splitlines()[0])
    assert first["speaker"] == "A" and len(first["prosody"]) == 88 and set(first["probs"]) == {"hap", "sad", "neu",
                                                                                             "ang"}


def _wav(path: Path, rate: int, n: int = 8000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00" * 2 * n)
    return path


def _float_wav(path: Path) -> Path:
    """A 32-bit float WAV (format 3), which the reader refuses."""
    import struct

    data = np.zeros(1600, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE" + b"fmt "
                     + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)
    return path


def test_transcribe_errors_are_one_line(audio_checkpoint, tmp_path, capsys):
    cases = [
        (["--audio", f"A={tmp_path / 'missing.wav'}"], "audio file not found"),
        (["--audio", f"A={_wav(tmp_path / 'slow.wav', 4000)}"], "sample rate 4000 Hz"),
        (["--audio", f"A={_float_wav(tmp_path / 'f32.wav')}"], "not a readable PCM WAV"),
        (["--audio", "=x.wav"], "expected NAME=FILE.wav"),
        (["--audio", f"A={_wav(tmp_path / 'a.wav', 16000)}", "--audio", f"A={tmp_path / 'a.wav'}"], "given twice"),
        (["--audio", f"A={tmp_path / 'a.wav'}", "--out", str(tmp_path / "t.txt")], ".csv or .jsonl"),
        (["--audio", f"A={tmp_path / 'a.wav'}", "--pause-ms", "5"], "pause_ms"),
    ]
    for extra, message in cases:
        assert main(["-q", "transcribe", str(audio_checkpoint), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("affectkit: error:") and message in err and "\n" not in err, (extra, err)
    silent = tmp_path / "silent.csv"  # silence: a timeline with no utterance
    assert main(["-q", "transcribe", str(audio_checkpoint), "--audio", f"A={tmp_path / 'a.wav'}",
                 "--out", str(silent)]) == 0
    assert silent.read_text().splitlines()[1:] == []


def test_a_checkpoint_speech_cannot_feed_is_refused(tmp_path, capsys):
    from affectkit.models import build_model

    info = {"dims": {"audio": 100}, "n_classes": 2, "label_names": ["a", "b"], "n_speakers": 2, "speakers": ["A", "B"]}
    model = build_model("corect", {"hidden": 8, "graph_heads": 2, "wp": 3, "wf": 0, "causal": True,
                                   "modalities": ["audio"]}, info).eval()
    from affectkit.audio.recordings import timeline
    from affectkit.errors import ConfigError

    with pytest.raises(ConfigError, match="100-d, not the 88 eGeMAPS"):
        timeline((model, info), {"A": _wav(tmp_path / "a.wav", 16000)}, progress=False)


def test_features_audio_refuses_bad_manifests(corpus, tmp_path, capsys):
    lines = (corpus / "manifest.csv").read_text().splitlines()
    cases = {
        "no_label.csv": (lines[0].replace("label", "mood"), "missing column(s) label"),
        "gone.csv": (lines[1].replace("utterances/", "nowhere/"), "not found"),
        "split.csv": (lines[1].replace(",train,", ",holdout,"), "split 'holdout'"),
        "empty.csv": (lines[1].replace(",A,", ",,").replace(",B,", ",,"), "column speaker is empty"),
    }
    for name, (line, message) in cases.items():
        body = [line] if name == "no_label.csv" else [lines[0], line]
        (corpus / name).write_text("\n".join(body + lines[2:3]) + "\n")
        assert main(["-q", "features", "audio", "--source", str(corpus / name), str(tmp_path / "x.pkl")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("affectkit: error:") and message in err and "\n" not in err, (name, err)
        assert not (tmp_path / "x.pkl").exists()
    assert main(["-q", "features", "text", "--source", str(corpus), str(tmp_path / "x.pkl")]) == 2
    assert "needs --dataset" in capsys.readouterr().err


def test_no_network_needed(corpus, audio_checkpoint, tmp_path):
    """Every weight comes from an installed package: transcribe runs with the hub offline and every proxy
    pointing at a closed port (a download attempt would fail)."""
    import os
    import subprocess
    import sys

    vid = next(d for d in json.loads((corpus / "corpus.json").read_text())["dialogues"] if d["split"] == "test")
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HTTP_PROXY": dead, "HTTPS_PROXY": dead,
           "http_proxy": dead, "https_proxy": dead, "NO_PROXY": "", "no_proxy": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "t.jsonl"
    done = subprocess.run([sys.executable, "-m", "affectkit.cli", "-q", "transcribe", str(audio_checkpoint),
                           "--audio", f"A={corpus / 'tracks' / (vid['dialogue'] + '_A.wav')}", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_text().strip()
