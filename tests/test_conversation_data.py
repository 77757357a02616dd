"""Conversation (ERC) data: loading and validation, batching, the loader and the synthetic generator."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from affectkit.data import conversation as conv
from affectkit.data.conversation import (
    IGNORE_INDEX,
    ConversationLoader,
    Dialogue,
    class_counts,
    collate_dialogues,
    load_conversations,
)
from affectkit.data.synthetic_conversation import PRESETS, _pair_groups, write_synthetic_conversations
from affectkit.errors import ConfigError, DataError

# ------------------------------------------------------------------------------------------------ helpers


def _dialogue(vid: str, n: int, seed: int = 0, dims: dict[str, int] | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    dims = {"text": 4, "audio": 3} if dims is None else dims
    item: dict[str, Any] = {
        "vid": vid,
        "speakers": ["M" if t % 2 else "F" for t in range(n)],
        "labels": [int(v) for v in rng.integers(0, 3, size=n)],
        "sentence": [f"utt {t}" for t in range(n)],
    }
    for m, d in dims.items():
        item[m] = rng.standard_normal((n, d)).astype(np.float32)
    return item


def _small_file() -> dict[str, Any]:
    """A valid 3-class, text+audio file: train t0 t1, dev d0 d1, test s0."""
    return {
        "label_names": ["neg", "neu", "pos"],
        "train": [_dialogue("t0", 5, 0), _dialogue("t1", 7, 1)],
        "dev": [_dialogue("d0", 4, 2), _dialogue("d1", 6, 3)],
        "test": [_dialogue("s0", 3, 4)],
    }


def _write(tmp_path: Path, obj: Any, name: str = "conv.pkl") -> Path:
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj))
    return path


@pytest.fixture(scope="module")
def iemocap6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("syn") / "iemocap6.pkl"
    write_synthetic_conversations(path, "iemocap6", seed=0)
    return path


# ------------------------------------------------------------------------------- synthetic -> load round trip


def test_round_trip_iemocap6(iemocap6: Path) -> None:
    data = load_conversations(iemocap6)
    assert data.modalities == ("text", "audio", "visual") == data.kept
    assert data.dims == {"text": 768, "audio": 100, "visual": 512}
    assert data.n_classes == 6
    assert data.label_names == ["hap", "sad", "neu", "ang", "exc", "fru"]
    assert data.speakers == ["F", "M"] and data.speaker_index == {"F": 0, "M": 1}
    assert {s: len(d) for s, d in data.splits.items()} == {"train": 40, "dev": 6, "test": 12}
    for dialogues in data.splits.values():
        for d in dialogues:
            n = len(d)
            assert 20 <= n <= 60
            assert d.labels.dtype == np.int64 and d.speakers.dtype == np.int64
            assert set(np.unique(d.speakers)) <= {0, 1} and d.labels.max() < 6
            for m, dim in data.dims.items():
                assert d.features[m].shape == (n, dim) and d.features[m].dtype == np.float32
            assert d.sentences is not None and len(d.sentences) == n and d.sentences[2].startswith("utt 2 of")
    lines = data.summary().splitlines()
    assert len(lines) == 3 and lines[0].startswith("train: 40 dialogues") and "hap " in lines[0]


@pytest.mark.parametrize(
    ("preset", "n_classes", "dims", "speakers"),
    [
        ("iemocap4", 4, {"text": 768, "audio": 100, "visual": 512}, ["F", "M"]),
        ("mosei2", 2, {"text": 768, "audio": 80, "visual": 35}, ["S"]),
    ],
)
def test_other_presets(tmp_path: Path, preset: str, n_classes: int, dims: dict, speakers: list) -> None:
    path = tmp_path / f"{preset}.pkl"
    write_synthetic_conversations(path, preset, seed=3, n_dialogues={"train": 7, "test": 2})
    data = load_conversations(path)
    assert data.n_classes == n_classes and data.dims == dims and data.speakers == speakers
    assert data.label_names == list(PRESETS[preset].label_names)
    assert [len(data.splits[s]) for s in ("train", "dev", "test")] == [
        7,
        PRESETS[preset].n_dialogues["dev"],
        2,
    ]


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.pkl", tmp_path / "b.pkl", tmp_path / "c.pkl"
    write_synthetic_conversations(a, "iemocap6", seed=5, n_dialogues={"train": 4})
    write_synthetic_conversations(b, "iemocap6", seed=5, n_dialogues={"train": 4})
    write_synthetic_conversations(c, "iemocap6", seed=6, n_dialogues={"train": 4})
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_synthetic_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown synthetic preset 'meld'.*iemocap6"):
        write_synthetic_conversations(tmp_path / "x.pkl", "meld", seed=0)
    with pytest.raises(ConfigError, match="unknown split 'valid'"):
        write_synthetic_conversations(tmp_path / "x.pkl", "iemocap6", seed=0, n_dialogues={"valid": 3})
    with pytest.raises(ConfigError, match=r"n_dialogues\['train'\] must be a positive int"):
        write_synthetic_conversations(tmp_path / "x.pkl", "iemocap6", seed=0, n_dialogues={"train": 0})


def test_subset_of_modalities(iemocap6: Path) -> None:
    data = load_conversations(iemocap6, modalities=["visual", "text"])
    assert data.kept == ("text", "visual")  # canonical order, whatever order was asked
    assert data.modalities == ("text", "audio", "visual")  # what the file holds
    assert all(set(d.features) == {"text", "visual"} for ds in data.splits.values() for d in ds)
    assert load_conversations(iemocap6, modalities="audio").kept == ("audio",)  # a bare name is one modality


def test_requesting_a_missing_modality(tmp_path: Path) -> None:
    raw = _small_file()
    path = _write(tmp_path, raw)
    with pytest.raises(DataError, match=r"modality 'visual' not in the file; it holds text, audio"):
        load_conversations(path, modalities=["text", "visual"])


def test_text_only_file_without_label_names_or_speakers(iemocap6: Path, tmp_path: Path) -> None:
    """Like the real CORECT files: no top-level label_names/speakers, and here only text."""
    raw = pickle.loads(iemocap6.read_bytes())
    del raw["label_names"], raw["speakers"]
    for split in ("train", "dev", "test"):
        for item in raw[split]:
            del item["audio"], item["visual"]
    data = load_conversations(_write(tmp_path, raw))
    assert data.modalities == ("text",) and data.dims == {"text": 768}
    assert data.n_classes == 6 and data.label_names == ["0", "1", "2", "3", "4", "5"]
    assert data.speakers == ["F", "M"]


def test_corect_style_lists_of_vectors_and_int_speakers(tmp_path: Path) -> None:
    raw = _small_file()
    del raw["label_names"]
    for split in ("train", "dev", "test"):
        for item in raw[split]:
            item["text"] = [row for row in item["text"]]  # a list of 1-D arrays, as in CORECT's pickles
            item["speakers"] = [7 if s == "M" else 3 for s in item["speakers"]]
    data = load_conversations(_write(tmp_path, raw))
    assert data.dims == {"text": 4, "audio": 3}
    assert data.speakers == [3, 7]
    d = data.splits["train"][0]
    np.testing.assert_array_equal(d.features["text"], np.stack(raw["train"][0]["text"]))
    np.testing.assert_array_equal(d.speakers, [0, 1, 0, 1, 0])


def test_nonfinite_values_in_an_unrequested_modality_are_not_read(tmp_path: Path) -> None:
    raw = _small_file()
    raw["train"][0]["audio"][0, 0] = np.nan
    data = load_conversations(_write(tmp_path, raw), modalities=["text"])
    assert data.kept == ("text",)


# ------------------------------------------------------------------------------------------ bad inputs


def _mutate(fn):  # noqa: ANN001, ANN202 - tiny test helper
    def build() -> Any:
        raw = _small_file()
        out = fn(raw)
        return raw if out is None else out

    return build


def _set(path: tuple, value: Any):  # noqa: ANN202
    def fn(raw: dict) -> None:
        node = raw
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return fn


def _delete(path: tuple):  # noqa: ANN202
    def fn(raw: dict) -> None:
        node = raw
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return fn


def _nan_audio(raw: dict) -> None:
    raw["dev"][1]["audio"][2, 1] = np.nan
    raw["dev"][1]["audio"][3, 0] = np.inf


BAD_INPUTS = {
    "not a dict": (
        _mutate(lambda raw: [raw["train"]]),
        r"expected a dict with splits train, dev, test, got list",
    ),
    "missing split": (
        _mutate(_delete(("dev",))),
        r"split 'dev' missing \(found keys: label_names, train, test\)",
    ),
    "empty split": (_mutate(_set(("test",), [])), r"\[test\]: empty split \(0 dialogues\)"),
    "split not a list": (_mutate(_set(("test",), {"a": 1})), r"\[test\]: expected a list of dialogue dicts"),
    "dialogue not a dict": (_mutate(_set(("dev", 0), "x")), r"\[dev\] dialogue #0: expected a dict, got str"),
    "empty dialogue": (
        _mutate(
            _set(
                ("dev", 1),
                {
                    "vid": "d1",
                    "speakers": [],
                    "labels": [],
                    "text": np.zeros((0, 4)),
                    "audio": np.zeros((0, 3)),
                },
            )
        ),
        r"\[dev\] dialogue 'd1': empty dialogue \(0 utterances\)",
    ),
    "labels vs speakers": (
        _mutate(_set(("train", 1, "speakers"), ["M"] * 6)),
        r"\[train\] dialogue 't1': lengths differ \(labels 7, speakers 6, text 7, audio 7, sentence 7\)",
    ),
    "modality rows differ": (
        _mutate(_set(("test", 0, "audio"), np.zeros((4, 3), np.float32))),
        r"\[test\] dialogue 's0': lengths differ \(labels 3, speakers 3, text 3, audio 4",
    ),
    "modality 1-D": (
        _mutate(_set(("dev", 0, "text"), np.zeros(4, np.float32))),
        r"\[dev\] dialogue 'd0'\[text\]: expected a 2-D array \(utterances, dims\), got shape \(4,\)",
    ),
    "modality 3-D": (
        _mutate(_set(("dev", 0, "text"), np.zeros((4, 2, 2), np.float32))),
        r"\[dev\] dialogue 'd0'\[text\]: expected a 2-D array",
    ),
    "modality not numeric": (
        _mutate(_set(("dev", 0, "text"), np.array([["a"] * 4] * 4))),
        r"\[dev\] dialogue 'd0'\[text\]: expected a numeric array",
    ),
    "dims differ": (
        _mutate(_set(("dev", 1, "text"), np.zeros((6, 5), np.float32))),
        r"\[dev\] dialogue 'd1'\[text\]: feature dim 5 differs from 4 in earlier dialogues",
    ),
    "modality missing in one dialogue": (
        _mutate(_delete(("test", 0, "audio"))),
        r"\[test\] dialogue 's0': lacks audio; other dialogues hold text, audio",
    ),
    "label out of range": (
        _mutate(_set(("test", 0, "labels"), [0, 3, 1])),
        r"\[test\] dialogue 's0': label 3 at utterance 1 outside \[0, 3\)",
    ),
    "negative label": (
        _mutate(_set(("train", 0, "labels"), [0, 1, -1, 2, 0])),
        r"\[train\] dialogue 't0': negative label -1 at utterance 2",
    ),
    "float label": (
        _mutate(_set(("train", 0, "labels"), [0, 1, 1.5, 2, 0])),
        r"\[train\] dialogue 't0': label 1.5 at utterance 2 is not an int",
    ),
    "non-finite features": (
        _mutate(_nan_audio),
        r"\[dev\] dialogue 'd1'\[audio\]: 2 non-finite values \(NaN/inf\)",
    ),
    "labels key missing": (
        _mutate(_delete(("dev", 0, "labels"))),
        r"\[dev\] dialogue 'd0': key 'labels' missing",
    ),
    "speakers key missing": (
        _mutate(_delete(("train", 1, "speakers"))),
        r"\[train\] dialogue 't1': key 'speakers' missing",
    ),
    "unknown speaker": (
        _mutate(
            lambda raw: raw.update(speakers=["F", "M"]) or raw["test"][0].update(speakers=["F", "X", "M"])
        ),
        r"\[test\] dialogue 's0': unknown speaker tag 'X'; the file declares \['F', 'M'\]",
    ),
    "speaker tag not str or int": (
        _mutate(_set(("dev", 0, "speakers"), ["F", 1.0, "M", "F"])),
        r"\[dev\] dialogue 'd0': speaker tag 1.0 is neither a str nor an int",
    ),
    "bad label_names": (
        _mutate(_set(("label_names",), "neg pos")),
        r"'label_names' must be a non-empty list",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_one_line_data_error(tmp_path: Path, case: str) -> None:
    build, pattern = BAD_INPUTS[case]
    path = _write(tmp_path, build())
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + pattern) as info:
        load_conversations(path)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.pkl: file not found"):
        load_conversations(tmp_path / "nope.pkl")


class _Custom:
    pass


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_a_custom_class_is_refused(tmp_path: Path) -> None:
    raw = _small_file()
    raw["train"][0]["extra"] = _Custom()
    path = _write(tmp_path, raw)
    with pytest.raises(DataError, match=r"refused to load class .*_Custom"):
        load_conversations(path)


def test_pickle_running_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    raw = _small_file()
    raw["train"][0]["vid"] = _Evil(marker)
    path = _write(tmp_path, raw)
    with pytest.raises(DataError, match=r"refused to load class (posix|nt|os)\.system"):
        load_conversations(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ batching


def _make_dialogues(
    lengths: list[int], dims: dict[str, int], seed: int = 0, n_classes: int = 4
) -> list[Dialogue]:
    rng = np.random.default_rng(seed)
    return [
        Dialogue(
            vid=f"v{i}",
            speakers=rng.integers(0, 3, size=n).astype(np.int64),
            labels=rng.integers(0, n_classes, size=n).astype(np.int64),
            features={m: rng.standard_normal((n, d)).astype(np.float32) for m, d in dims.items()},
        )
        for i, n in enumerate(lengths)
    ]


def test_collate_pads_and_masks() -> None:
    dims = {"text": 4, "visual": 2}
    dialogues = _make_dialogues([3, 1, 5], dims)
    batch = collate_dialogues(dialogues, ["text", "visual"])
    assert batch.vids == ["v0", "v1", "v2"] and len(batch) == 3
    assert batch.lengths.tolist() == [3, 1, 5] and batch.lengths.dtype == torch.long
    assert batch.mask.dtype == torch.bool
    assert batch.mask.tolist() == [[True] * 3 + [False] * 2, [True] + [False] * 4, [True] * 5]
    for m, d in dims.items():
        x = batch.features[m]
        assert x.shape == (3, 5, d) and x.dtype == torch.float32
        for b, dlg in enumerate(dialogues):
            n = len(dlg)
            torch.testing.assert_close(x[b, :n], torch.from_numpy(dlg.features[m]))
            assert (x[b, n:] == 0).all()
    assert batch.labels.dtype == torch.long and batch.speakers.dtype == torch.long
    for b, dlg in enumerate(dialogues):
        n = len(dlg)
        assert batch.labels[b, :n].tolist() == dlg.labels.tolist()
        assert batch.speakers[b, :n].tolist() == dlg.speakers.tolist()
        assert (batch.labels[b, n:] == IGNORE_INDEX).all() and (batch.speakers[b, n:] == 0).all()
    # padding is ignored by cross_entropy's default ignore_index
    logits = torch.randn(3, 5, 4)
    full = F.cross_entropy(logits.reshape(-1, 4), batch.labels.reshape(-1))
    real = F.cross_entropy(logits[batch.mask], batch.labels[batch.mask])
    torch.testing.assert_close(full, real)
    moved = batch.to("cpu")
    assert moved is not batch and torch.equal(moved.features["text"], batch.features["text"])


def test_collate_refuses_a_modality_that_was_not_loaded() -> None:
    with pytest.raises(ConfigError, match=r"dialogue 'v0': modality 'audio' was not loaded \(loaded: text\)"):
        collate_dialogues(_make_dialogues([2], {"text": 3}), ["audio"])


def test_loader_yields_each_dialogue_once_per_epoch() -> None:
    dialogues = _make_dialogues([2 + i % 5 for i in range(11)], {"text": 3})
    loader = ConversationLoader(dialogues, ["text"], batch_size=4, shuffle=False)
    assert len(loader) == 3
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 4, 3]
    assert [v for b in batches for v in b.vids] == [d.vid for d in dialogues]

    gen = torch.Generator().manual_seed(123)
    shuffled = ConversationLoader(dialogues, ["text"], batch_size=4, shuffle=True, generator=gen)
    epochs = [[v for b in shuffled for v in b.vids] for _ in range(3)]
    for order in epochs:
        assert sorted(order) == sorted(d.vid for d in dialogues)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # a fresh order each epoch
    # the order is exactly torch.randperm with the generator, so a seed reproduces it
    ref = torch.Generator().manual_seed(123)
    expected = [[f"v{i}" for i in torch.randperm(11, generator=ref).tolist()] for _ in range(3)]
    assert epochs == expected


def test_loader_converts_to_tensors_once(monkeypatch: pytest.MonkeyPatch) -> None:
    loader = ConversationLoader(_make_dialogues([3, 4, 2], {"audio": 2}), ["audio"], 2, shuffle=False)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("per-epoch numpy -> tensor conversion")

    monkeypatch.setattr(conv, "_to_tensors", boom)
    assert sum(len(b) for b in loader) == 3


def test_loader_rejects_a_bad_batch_size() -> None:
    with pytest.raises(ConfigError, match="batch_size must be a positive int"):
        ConversationLoader(_make_dialogues([2], {"text": 3}), ["text"], batch_size=0, shuffle=False)


def test_class_counts() -> None:
    dialogues = _make_dialogues([3, 4], {"text": 1})
    dialogues[0].labels[:] = [0, 2, 2]
    dialogues[1].labels[:] = [2, 3, 0, 2]
    assert class_counts(dialogues, 5).tolist() == [2, 0, 4, 1, 0]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        class_counts(dialogues, 3)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_collate_property(lengths: list[int], seed: int) -> None:
    dialogues = _make_dialogues(lengths, {"text": 3, "audio": 2}, seed=seed)
    batch = collate_dialogues(dialogues, ["text", "audio"])
    assert int(batch.mask.sum()) == sum(lengths)
    assert batch.mask.shape == (len(lengths), max(lengths))
    for m in ("text", "audio"):
        expected = torch.from_numpy(np.concatenate([d.features[m] for d in dialogues]))
        torch.testing.assert_close(batch.features[m][batch.mask], expected)
        assert (batch.features[m][~batch.mask] == 0).all()
    assert batch.labels[batch.mask].tolist() == np.concatenate([d.labels for d in dialogues]).tolist()
    assert (batch.labels[~batch.mask] == IGNORE_INDEX).all()


# ---------------------------------------------------------------------------------------- planted signal


def _window_mean(x: np.ndarray, w: int = 2) -> np.ndarray:
    """Mean over utterances t-w..t+w of one dialogue (clipped at its ends)."""
    csum = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0, dtype=np.float64)])
    idx = np.arange(len(x))
    lo, hi = np.maximum(idx - w, 0), np.minimum(idx + w + 1, len(x))
    return (csum[hi] - csum[lo]) / (hi - lo)[:, None]


def _nearest_centroid_accuracy(data: conv.ConversationData, modalities: list[str], context: bool) -> float:
    def matrix(split: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for d in data.splits[split]:
            x = np.hstack([d.features[m] for m in modalities]).astype(np.float64)
            xs.append(_window_mean(x) if context else x)
            ys.append(d.labels)
        return np.vstack(xs), np.concatenate(ys)

    x, y = matrix("train")
    xt, yt = matrix("test")
    centroids = np.stack([x[y == k].mean(axis=0) for k in range(data.n_classes)])
    dist = -2.0 * xt @ centroids.T + (centroids**2).sum(axis=1)
    return float((dist.argmin(axis=1) == yt).mean())


@pytest.mark.parametrize("preset", ["iemocap6", "iemocap4"])
def test_planted_signal_needs_fusion_and_context(tmp_path: Path, preset: str) -> None:
    path = tmp_path / f"{preset}.pkl"
    write_synthetic_conversations(path, preset, seed=0)
    data = load_conversations(path)
    chance = 1.0 / data.n_classes
    single = {m: _nearest_centroid_accuracy(data, [m], context=False) for m in data.modalities}
    fused = _nearest_centroid_accuracy(data, list(data.modalities), context=False)
    fused_ctx = _nearest_centroid_accuracy(data, list(data.modalities), context=True)
    print(f"{preset}: single {single}, fused {fused:.3f}, fused + context {fused_ctx:.3f}")
    for m, acc in single.items():
        assert chance + 0.1 < acc < 0.6, (m, acc)  # one modality of one utterance: a weak cue
    assert fused > max(single.values()) + 0.15  # the modalities complement each other
    assert fused_ctx > fused + 0.1  # neighbouring utterances denoise (emotion persists)


def test_modalities_confuse_different_class_pairs() -> None:
    for n_classes in (4, 6):
        groups = [_pair_groups(n_classes, r) for r in range(3)]
        for a in range(n_classes):
            for b in range(a + 1, n_classes):
                together = sum(int(g[a] == g[b]) for g in groups)
                assert together <= 1, (n_classes, a, b)  # no pair is confused by two modalities
