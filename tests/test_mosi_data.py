"""MOSI data: the safe loader's round trip, validation errors (one line naming file/split/key), batching."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from affectkit.data import mosi as mosi_mod
from affectkit.data.mosi import MODALITIES, MosiSplit, load_mosi, mosi_loader
from affectkit.data.synthetic_mosi import REAL_DIMS, REAL_SIZES, make_synthetic_mosi, write_synthetic_mosi
from affectkit.errors import DataError

# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_small_file(small_mosi: Path, small_sizes: dict[str, int]) -> None:
    data = load_mosi(small_mosi)
    raw = pickle.loads(small_mosi.read_bytes())
    assert data.path == small_mosi
    assert data.modalities == ("vision", "text", "audio")
    assert data.dims == REAL_DIMS and data.seq_len == 50
    for split, n in small_sizes.items():
        part = data.splits[split]
        assert len(part) == n
        assert part.labels.shape == (n,) and part.labels.dtype == torch.float32
        np.testing.assert_array_equal(part.labels.numpy(), raw[split]["labels"].reshape(-1))
        for m, d in REAL_DIMS.items():
            x = part.features[m]
            assert x.shape == (n, 50, d) and x.dtype == torch.float32
            assert torch.isfinite(x).all()
            expected = np.nan_to_num(raw[split][m], posinf=0.0, neginf=0.0)
            np.testing.assert_array_equal(x.numpy(), expected)
    # the synthetic generator plants a few +-inf audio frames, like the real file
    assert data.nonfinite_replaced["audio"] > 0
    assert data.nonfinite_replaced["text"] == data.nonfinite_replaced["vision"] == 0
    assert data.summary().startswith("small.pkl: 96/32/48 clips")


def test_real_shapes_load_with_real_dims(tmp_path: Path) -> None:
    """A synthetic file with exactly the real MOSI shapes: 1284/229/686 clips, 50 steps, 35/300/74 dims."""
    path = write_synthetic_mosi(tmp_path / "mosi_raw.pkl", seed=3)
    data = load_mosi(path)
    assert {s: len(p) for s, p in data.splits.items()} == REAL_SIZES
    assert sum(REAL_SIZES.values()) == 2199
    assert data.dims == {"vision": 35, "text": 300, "audio": 74}
    assert data.seq_len == 50
    assert data.splits["test"].features["text"].shape == (686, 50, 300)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_protocols_load(mosi_raw: dict, write_pickle: Callable[..., Path], protocol: int) -> None:
    """Python-2-era (protocol 2, numpy bytes via _codecs.encode) and out-of-band (5) pickles load too."""
    data = load_mosi(write_pickle(mosi_raw, protocol=protocol))
    np.testing.assert_array_equal(data.splits["valid"].features["text"].numpy(), mosi_raw["valid"]["text"])


def test_dims_and_seq_len_come_from_the_file(tmp_path: Path, fast_cfg: Callable) -> None:
    """Nothing is hard-coded to 50 steps or 35/300/74 dims: a 20-step file with dims 7/11/13 loads and trains."""
    from affectkit.checkpoint import read_checkpoint
    from affectkit.train import train

    dims = {"vision": 7, "text": 11, "audio": 13}
    path = write_synthetic_mosi(tmp_path / "odd.pkl", seed=2, sizes={"train": 24, "valid": 8, "test": 8},
                                dims=dims, seq_len=20)
    data = load_mosi(path)
    assert data.dims == dims and data.seq_len == 20
    assert data.splits["train"].features["audio"].shape == (24, 20, 13)
    result = train(fast_cfg("train.epochs=1", "model.hidden=8"), data_path=path, run_dir=tmp_path / "run")
    assert len(result.history) == 1 and np.isfinite(result.test["MAE"])
    assert read_checkpoint(tmp_path / "run" / "best.pt")["info"] == {"dims": dims, "seq_len": 20}


def test_labels_may_be_flat_or_column(mosi_raw: dict, write_pickle: Callable[..., Path]) -> None:
    mosi_raw["train"]["labels"] = mosi_raw["train"]["labels"].reshape(-1)
    mosi_raw["valid"]["labels"] = mosi_raw["valid"]["labels"].reshape(-1, 1).astype(np.float64)
    data = load_mosi(write_pickle(mosi_raw))
    assert data.splits["train"].labels.shape == (10,)
    assert data.splits["valid"].labels.shape == (6,) and data.splits["valid"].labels.dtype == torch.float32


# ---------------------------------------------------------------------------------- non-finite values


def _plant_nonfinite(raw: dict) -> None:
    raw["train"]["audio"][0, 1, 2] = np.inf
    raw["test"]["audio"][3, 0, 0] = -np.inf
    raw["valid"]["text"][2, 7, 1] = np.nan


def test_nonfinite_features_become_zero_and_are_counted(
    mosi_raw: dict, write_pickle: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    _plant_nonfinite(mosi_raw)
    with caplog.at_level(logging.INFO, logger="affectkit"):
        data = load_mosi(write_pickle(mosi_raw, "bad_values.pkl"))
    assert data.nonfinite_replaced == {"vision": 0, "text": 1, "audio": 2}
    assert data.splits["train"].features["audio"][0, 1, 2].item() == 0.0
    assert data.splits["test"].features["audio"][3, 0, 0].item() == 0.0
    assert data.splits["valid"].features["text"][2, 7, 1].item() == 0.0
    for part in data.splits.values():
        assert all(torch.isfinite(x).all() for x in part.features.values())
    # every other value is untouched
    np.testing.assert_array_equal(data.splits["train"].features["audio"][1:].numpy(), mosi_raw["train"]["audio"][1:])
    lines = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(lines) == 1
    assert "bad_values.pkl" in lines[0] and "audio 2" in lines[0] and "text 1" in lines[0]
    assert "vision" not in lines[0]


def test_clean_file_logs_no_replacement(
    mosi_raw: dict, write_pickle: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="affectkit"):
        data = load_mosi(write_pickle(mosi_raw))
    assert data.nonfinite_replaced == {"vision": 0, "text": 0, "audio": 0}
    assert not [r for r in caplog.records if "non-finite" in r.getMessage()]


def test_callers_arrays_are_not_mutated(mosi_raw: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """load_mosi works on copies: when the unpickler hands over the caller's own arrays, they keep their inf/nan."""
    _plant_nonfinite(mosi_raw)
    before = {s: {k: np.array(v, copy=True) for k, v in p.items()} for s, p in mosi_raw.items()}
    monkeypatch.setattr(mosi_mod, "safe_load", lambda path, encoding="ASCII": mosi_raw)
    data = load_mosi(tmp_path / "in_memory.pkl")
    assert data.nonfinite_replaced["audio"] == 2
    for split, part in mosi_raw.items():
        for key, value in part.items():
            np.testing.assert_array_equal(value, before[split][key])
    assert np.isinf(mosi_raw["train"]["audio"][0, 1, 2])
    # and the tensors do not share memory with the caller's arrays
    data.splits["train"].features["text"].add_(1.0)
    np.testing.assert_array_equal(mosi_raw["train"]["text"], before["train"]["text"])


# ------------------------------------------------------------------------------------ modality subsets


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [(["text"], ("text",)), (["audio", "text"], ("text", "audio")), (["vision", "audio"], ("vision", "audio"))],
)
def test_modality_subset_reads_only_those(small_mosi: Path, wanted: list[str], expected: tuple[str, ...]) -> None:
    data = load_mosi(small_mosi, wanted)
    assert data.modalities == expected
    assert tuple(data.dims) == expected and tuple(data.nonfinite_replaced) == expected
    for part in data.splits.values():
        assert tuple(part.features) == expected
        assert set(part[[0, 1]]) == {*expected, "labels"}


def test_subset_does_not_need_the_other_modalities(mosi_raw: dict, write_pickle: Callable[..., Path]) -> None:
    for part in mosi_raw.values():
        del part["vision"], part["audio"]
    data = load_mosi(write_pickle(mosi_raw), ["text"])
    assert data.dims == {"text": 5}
    with pytest.raises(DataError, match=r"\[train\]: key 'vision' missing"):
        load_mosi(write_pickle(mosi_raw, "b.pkl"))


def test_unknown_modality_is_refused(small_mosi: Path) -> None:
    with pytest.raises(DataError, match="unknown modality 'visual'") as err:
        load_mosi(small_mosi, ["text", "visual"])
    assert str(small_mosi) in str(err.value)


# -------------------------------------------------------------------------------------- bad inputs


def _set(split: str, key: str, fn: Callable[[Any], Any]) -> Callable[[dict], Any]:
    def mutate(raw: dict) -> dict:
        raw[split][key] = fn(raw[split][key])
        return raw

    return mutate


def _drop(split: str, key: str | None = None) -> Callable[[dict], dict]:
    def mutate(raw: dict) -> dict:
        if key is None:
            del raw[split]
        else:
            del raw[split][key]
        return raw

    return mutate


def _labels_with(value: float, at: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    def fn(labels: np.ndarray) -> np.ndarray:
        labels = labels.copy()
        labels.reshape(-1)[at] = value
        return labels

    return fn


def _empty_split(raw: dict) -> dict:
    raw["test"] = {k: v[:0] for k, v in raw["test"].items()}
    return raw


# (case id, mutation of the valid dict, substrings the one-line message must hold besides the file name)
BAD_INPUTS: list[tuple[str, Callable[[dict], Any], list[str]]] = [
    ("list_at_top", lambda raw: [raw["train"], raw["valid"], raw["test"]], ["dict of splits", "list"]),
    ("missing_split", _drop("valid"), ["'valid'", "missing"]),
    ("split_not_a_dict", lambda raw: {**raw, "train": list(raw["train"].values())}, ["[train]", "dict of arrays"]),
    ("missing_modality", _drop("train", "audio"), ["[train]", "'audio'", "missing"]),
    ("missing_labels", _drop("test", "labels"), ["[test]", "'labels'", "missing"]),
    ("n_modality_vs_labels", _set("valid", "vision", lambda x: x[:-1]), ["[valid][vision]", "5 clips", "6 labels"]),
    ("seq_len_differs", _set("train", "audio", lambda x: x[:, :-1]),
     ["[train][audio]", "sequence length 7 differs from 8"]),
    ("seq_len_differs_across_splits", _set("test", "vision", lambda x: x[:, 1:]), ["[test][vision]", "sequence"]),
    ("dim_differs_across_splits", _set("test", "text", lambda x: x[:, :, :-1]), ["[test][text]", "dim 4"]),
    ("nan_label", _set("train", "labels", _labels_with(np.nan)), ["[train][labels]", "non-finite"]),
    ("inf_label", _set("valid", "labels", _labels_with(-np.inf)), ["[valid][labels]", "non-finite"]),
    ("label_above_3", _set("valid", "labels", _labels_with(3.5)), ["[valid][labels]", "[-3, 3]", "3.5"]),
    ("label_below_-3", _set("test", "labels", _labels_with(-3.01)), ["[test][labels]", "[-3, 3]"]),
    ("empty_split", _empty_split, ["[test]", "empty"]),
    ("labels_two_per_clip", _set("train", "labels", lambda y: np.zeros((10, 2), np.float32)),
     ["[train][labels]", "one label per clip"]),
    ("modality_2d", _set("train", "text", lambda x: x[:, :, 0]), ["[train][text]", "3-D", "(10, 8)"]),
    ("modality_a_list", _set("valid", "audio", lambda x: x.tolist()), ["[valid][audio]", "numpy array", "list"]),
    ("modality_strings", _set("test", "vision", lambda x: x.astype(str)), ["[test][vision]", "numeric"]),
    ("labels_scalar", _set("valid", "labels", lambda y: np.float32(1.0)), ["[valid][labels]"]),
]


@pytest.mark.parametrize(("mutate", "parts"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_data_error(
    mosi_raw: dict, write_pickle: Callable[..., Path], mutate: Callable[[dict], Any], parts: list[str]
) -> None:
    path = write_pickle(mutate(mosi_raw), "broken.pkl")
    with pytest.raises(DataError) as err:
        load_mosi(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "mosi_raw.pkl"
    with pytest.raises(DataError) as err:
        load_mosi(path)
    msg = str(err.value)
    assert msg == f"{path}: file not found"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a pickle at all\n",
        b"\x80\x04\x95",  # truncated frame header
        b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\xff",  # frame length beyond sys.maxsize: OverflowError
        b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7f",  # BINBYTES8 too large: OverflowError
    ],
    ids=["empty", "text", "truncated", "huge_frame", "huge_bytes"],
)
def test_unreadable_pickle(tmp_path: Path, content: bytes) -> None:
    """A corrupt or truncated download is a one-line DataError, whatever the unpickler raises."""
    path = tmp_path / "corrupt.pkl"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_mosi(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


class _Exploit:
    """Unpickling this runs a shell command (the classic pickle attack)."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.cmd,))


@pytest.mark.parametrize("where", ["top", "inside_split"])
def test_code_in_pickle_is_refused_and_not_run(
    mosi_raw: dict, write_pickle: Callable[..., Path], tmp_path: Path, where: str
) -> None:
    marker = tmp_path / "pwned"
    exploit = _Exploit(f"touch {marker}")
    if where == "top":
        obj: Any = exploit
    else:
        mosi_raw["train"]["id"] = exploit
        obj = mosi_raw
    path = write_pickle(obj, "evil.pkl")
    with pytest.raises(DataError) as err:
        load_mosi(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path))
    assert "posix.system" in msg or "os.system" in msg
    assert "refused" in msg
    assert not marker.exists()


def test_other_globals_are_refused(write_pickle: Callable[..., Path]) -> None:
    """Any class outside the numpy/containers allow-list is refused, even harmless ones."""
    from collections import Counter

    with pytest.raises(DataError, match=r"collections\.Counter"):
        load_mosi(write_pickle({"train": Counter("ab")}))


# ---------------------------------------------------------------------------------------- batching


def _tagged_split(n: int) -> MosiSplit:
    """A split whose row i carries i in every modality and in its label (so batches name their rows)."""
    rows = torch.arange(n, dtype=torch.float32)
    feats = {m: rows[:, None, None].expand(n, 3, d).clone() + torch.rand(n, 3, d) * 0.1
             for m, d in zip(MODALITIES, (2, 4, 3))}
    return MosiSplit(features=feats, labels=rows.clone())


def _row_ids(loader: DataLoader) -> list[list[int]]:
    return [b["labels"].long().tolist() for b in loader]


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_covers_every_clip_once_and_batches_are_rows(shuffle: bool) -> None:
    split = _tagged_split(37)
    loader = mosi_loader(split, batch_size=8, shuffle=shuffle)
    assert len(loader) == 5
    for _epoch in range(2):
        batches = list(loader)
        assert [len(b["labels"]) for b in batches] == [8, 8, 8, 8, 5]
        order = [i for b in batches for i in b["labels"].long().tolist()]
        assert sorted(order) == list(range(37))
        if not shuffle:
            assert order == list(range(37))
        for b in batches:
            idx = b["labels"].long()
            assert set(b) == {*MODALITIES, "labels"}
            for m in MODALITIES:
                assert torch.equal(b[m], split.features[m][idx])


def test_loader_on_loaded_file_yields_the_split_rows(small_mosi: Path) -> None:
    data = load_mosi(small_mosi)
    split = data.splits["valid"]
    batches = list(mosi_loader(split, batch_size=10, shuffle=False))
    assert [len(b["labels"]) for b in batches] == [10, 10, 10, 2]
    for m in MODALITIES:
        assert torch.equal(torch.cat([b[m] for b in batches]), split.features[m])
    assert torch.equal(torch.cat([b["labels"] for b in batches]), split.labels)


def test_shuffle_follows_torch_manual_seed() -> None:
    split = _tagged_split(50)
    loader = mosi_loader(split, batch_size=16, shuffle=True)
    torch.manual_seed(7)
    first = _row_ids(loader)
    second_epoch = _row_ids(loader)
    torch.manual_seed(7)
    again = _row_ids(loader)
    torch.manual_seed(8)
    other = _row_ids(loader)
    assert first == again
    assert first != second_epoch  # a new order every epoch
    assert first != other


def test_shuffle_order_equals_the_labs_per_item_loader() -> None:
    """Same seed -> the same clips in the same batches as ``DataLoader(dataset, batch_size, shuffle=True)``."""
    n = 45
    split = _tagged_split(n)
    torch.manual_seed(42)
    ours = _row_ids(mosi_loader(split, batch_size=16, shuffle=True))
    torch.manual_seed(42)
    lab = [b.long().tolist() for b in DataLoader(list(range(n)), batch_size=16, shuffle=True)]
    assert ours == lab


def test_make_synthetic_is_seeded() -> None:
    a = make_synthetic_mosi(5, sizes={"train": 4, "valid": 2, "test": 2}, seq_len=8)
    b = make_synthetic_mosi(5, sizes={"train": 4, "valid": 2, "test": 2}, seq_len=8)
    c = make_synthetic_mosi(6, sizes={"train": 4, "valid": 2, "test": 2}, seq_len=8)
    np.testing.assert_array_equal(a["train"]["text"], b["train"]["text"])
    assert not np.array_equal(a["train"]["text"], c["train"]["text"])
    assert a["train"]["labels"].shape == (4, 1, 1)
    assert set(a["train"]) == {"vision", "text", "audio", "labels", "id"}
