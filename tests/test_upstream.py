"""The field's standard feature files, read through the restricted unpickler: DialogueGCN/MMGCN
``IEMOCAP_features.pkl`` (9-tuple) and ``MELD_features_raw1.pkl`` (10-tuple), MMSA's aligned and unaligned
pickles.  The real files cannot be obtained here: these files are written in exactly those layouts by the
writers in affectkit.data.upstream / affectkit.data.mmsa, and read back (round trips)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from affectkit.data.conversation import load_conversations
from affectkit.data.cosmic import IEMOCAP_LABELS, MELD_LABELS
from affectkit.data.mmsa import write_mmsa
from affectkit.data.mosi import load_mosi
from affectkit.data.synthetic_mosi import make_synthetic_mosi
from affectkit.data.upstream import IEMOCAP_ITEMS, MELD_ITEMS, write_iemocap_features, write_meld_features
from affectkit.errors import DataError


def _ours(n: dict[str, int], n_classes: int, tags: list[str], dims=(6, 5, 4), seed: int = 0) -> dict:
    """A small dataset in our conversation layout."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in n.items():
        out[split] = []
        for k in range(count):
            length = int(rng.integers(2, 7))
            out[split].append({
                "vid": f"{split}{k:02d}", "speakers": [tags[i] for i in rng.integers(0, len(tags), length)],
                "labels": rng.integers(0, n_classes, length).tolist(),
                "text": rng.standard_normal((length, dims[0])).astype(np.float32),
                "audio": rng.standard_normal((length, dims[1])).astype(np.float32),
                "visual": rng.standard_normal((length, dims[2])).astype(np.float32),
                "sentence": [f"utterance {i} of {split}{k} \u2019" for i in range(length)]})
    return out


def _same(ours: dict, data, split_of: dict[str, str]) -> None:
    got = {d.vid: (split, d) for split, ds in data.splits.items() for d in ds}
    want = {d["vid"]: d for split in ("train", "dev", "test") for d in ours[split]}
    assert set(got) == set(want)
    for vid, (split, d) in got.items():
        w = want[vid]
        assert split == split_of.get(vid, split)
        for m in ("text", "audio", "visual"):
            np.testing.assert_array_equal(d.features[m], w[m])
        assert d.labels.tolist() == w["labels"] and d.sentences == w["sentence"]
        assert [data.speakers[i] for i in d.speakers] == w["speakers"]


def test_iemocap_features_round_trip(tmp_path):
    ours = _ours({"train": 18, "dev": 2, "test": 4}, 6, ["M", "F"])
    path = tmp_path / "IEMOCAP_features.pkl"
    write_iemocap_features(ours, path)
    raw = pickle.loads(path.read_bytes(), encoding="latin1")  # the layout the upstream loaders unpack
    assert isinstance(raw, tuple) and len(raw) == len(IEMOCAP_ITEMS) == 9
    vids, speakers, labels, text, audio, visual, sentences, train_vid, test_vid = raw
    assert len(train_vid) == 20 and test_vid == [d["vid"] for d in ours["test"]]
    assert speakers["train00"] == ours["train"][0]["speakers"] and text["test01"].shape == (len(labels["test01"]), 6)
    data = load_conversations(path, classes=IEMOCAP_LABELS)
    assert data.label_names == IEMOCAP_LABELS and data.dims == {"text": 6, "audio": 5, "visual": 4}
    assert data.speakers == ["F", "M"]
    # no dev split upstream: dev = the first int(0.1 * 20) = 2 train ids, which the writer put first
    _same(ours, data, {d["vid"]: s for s in ("train", "dev", "test") for d in ours[s]})
    assert "dev = the first 2 of 20 trainVid ids" in data.meta["notes"]


def test_iemocap_features_with_set_ids_and_protocol_2_are_read(tmp_path):
    ours = _ours({"train": 9, "dev": 1, "test": 2}, 6, ["M", "F"])
    path = tmp_path / "f.pkl"
    write_iemocap_features(ours, path)
    raw = list(pickle.loads(path.read_bytes(), encoding="latin1"))
    raw[7] = set(raw[7])  # some releases store the id lists as sets: sorted, so dev is reproducible
    path.write_bytes(pickle.dumps(tuple(raw), protocol=2))
    data = load_conversations(path)
    assert [d.vid for d in data.splits["dev"]] == ["dev00"]
    assert [d.vid for d in data.splits["train"]] == [f"train{k:02d}" for k in range(9)]


def test_meld_features_raw1_round_trip(tmp_path):
    ours = _ours({"train": 10, "dev": 1, "test": 3}, 7, ["0", "1", "2"], dims=(8, 3, 2), seed=1)
    path = tmp_path / "MELD_features_raw1.pkl"
    write_meld_features(ours, path)
    raw = pickle.loads(path.read_bytes())
    assert len(raw) == len(MELD_ITEMS) == 10
    assert np.asarray(raw[1]["train00"][0]).shape == (9,)  # one-hot speakers of 9
    data = load_conversations(path)
    assert data.label_names == MELD_LABELS
    _same(ours, data, {d["vid"]: s for s in ("train", "dev", "test") for d in ours[s]})


def test_upstream_files_with_bad_contents_are_one_line_errors(tmp_path):
    ours = _ours({"train": 9, "dev": 1, "test": 2}, 6, ["M", "F"])
    path = tmp_path / "f.pkl"
    write_iemocap_features(ours, path)
    raw = list(pickle.loads(path.read_bytes(), encoding="latin1"))
    del raw[3]["test01"]
    path.write_bytes(pickle.dumps(tuple(raw), protocol=2))
    with pytest.raises(DataError, match=r"dialogue 'test01' is listed in a split but has no videoText"):
        load_conversations(path)
    raw = list(pickle.loads((tmp_path / "f.pkl").read_bytes(), encoding="latin1"))
    write_meld_features(ours, tmp_path / "m.pkl")
    meld = list(pickle.loads((tmp_path / "m.pkl").read_bytes()))
    meld[1]["train03"][0] = [0.5] * 9
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(tuple(meld)))
    with pytest.raises(DataError, match=r"dialogue 'train03': speaker .* is not a one-hot vector of 9"):
        load_conversations(tmp_path / "m.pkl")


@pytest.fixture(scope="module")
def mosi_small(tmp_path_factory) -> tuple[dict, Path]:
    raw = make_synthetic_mosi(seed=0, sizes={"train": 24, "valid": 8, "test": 8},
                              dims={"vision": 4, "text": 6, "audio": 3}, seq_len=10)
    path = tmp_path_factory.mktemp("mmsa") / "ours.pkl"
    path.write_bytes(pickle.dumps(raw))
    return raw, path


@pytest.mark.parametrize("unaligned", [None, {"audio": 3, "vision": 2}])
def test_mmsa_round_trip_for_the_mosi_task(mosi_small, tmp_path, unaligned):
    raw, ours = mosi_small
    path = tmp_path / ("unaligned_50.pkl" if unaligned else "aligned_50.pkl")
    write_mmsa(raw, path, unaligned=unaligned)
    theirs = pickle.loads(path.read_bytes())
    assert set(theirs) == {"train", "valid", "test"} and theirs["train"]["regression_labels"].shape == (24,)
    if unaligned:
        assert theirs["train"]["audio"].shape == (24, 35, 3) and theirs["train"]["audio_lengths"][0] == 30
    a, b = load_mosi(ours), load_mosi(path)
    assert a.dims == b.dims and a.seq_len == b.seq_len
    for split in ("train", "valid", "test"):
        for m in ("vision", "text", "audio"):
            np.testing.assert_allclose(b.splits[split].features[m].numpy(), a.splits[split].features[m].numpy(),
                                       rtol=0, atol=1e-6)
        np.testing.assert_array_equal(b.splits[split].labels.numpy(), a.splits[split].labels.numpy())
        assert b.splits[split].ids == [i.replace("_", "$_$", 1) for i in a.splits[split].ids]


def test_mmsa_for_the_conversation_task(mosi_small, tmp_path):
    raw, _ = mosi_small
    path = tmp_path / "aligned.pkl"
    write_mmsa(raw, path)
    data = load_conversations(path)
    assert data.label_names == ["negative", "positive"] and data.dims == {"text": 6, "audio": 3, "visual": 4}
    first = data.splits["train"][0]
    ids = ["$_$".join(map(str, row)) for row in raw["train"]["id"]]
    rows = [i for i, x in enumerate(ids) if x.startswith(first.vid + "$_$")]
    rows.sort(key=lambda i: int(ids[i].rpartition("$_$")[2]))
    assert len(first) == len(rows)
    assert first.labels.tolist() == [int(raw["train"]["labels"][i, 0, 0] >= 0) for i in rows]
    text = raw["train"]["text"][rows[1]]
    np.testing.assert_allclose(first.features["text"][1], text[np.abs(text).sum(1) > 0].mean(0), atol=1e-6)
    assert len(data.splits["dev"]) and len(data.splits["test"])  # dev = MMSA's valid
    bad = pickle.loads(path.read_bytes())
    del bad["valid"]["vision"]
    path.write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=r"\[valid\]: MMSA layout: key 'vision' missing"):
        load_mosi(path)
