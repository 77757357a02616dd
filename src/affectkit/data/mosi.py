"""CMU-MOSI in the MultiBench `mosi_raw.pkl` layout: safe loading, validation, tensors, batching.

Layout: ``{split: {"vision": (N,T,Dv), "text": (N,T,Dt), "audio": (N,T,Da), "labels": (N,1,1), "id": (N,...)}}``
for split in train/valid/test.  Dims and T are read from the file.  Each split becomes tensors once;
batches are slices of those tensors (no per-item ``torch.tensor``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from affectkit.data.mmsa import is_mmsa, mmsa_to_mosi
from affectkit.data.provenance import marker_of
from affectkit.errors import DataError
from affectkit.safe_pickle import safe_load

log = logging.getLogger("affectkit")

SPLITS: tuple[str, ...] = ("train", "valid", "test")
#: Canonical modality order (the lab's order: vision, text, audio); models iterate in this order.
MODALITIES: tuple[str, ...] = ("vision", "text", "audio")
LABEL_RANGE: tuple[float, float] = (-3.0, 3.0)


@dataclass
class MosiSplit:
    """One split as tensors: ``features[m]`` is (N, T, D_m) float32, ``labels`` is (N,) float32."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """A whole batch at once: ``index`` is a list of row indices (fed by a BatchSampler)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        batch = {m: x.index_select(0, idx) for m, x in self.features.items()}
        batch["labels"] = self.labels.index_select(0, idx)
        return batch


@dataclass
class MosiData:
    """The three splits plus what was read from the file (dims, sequence length)."""

    path: Path
    splits: dict[str, MosiSplit]
    dims: dict[str, int]
    seq_len: int
    nonfinite_replaced: dict[str, int]
    #: The generator's marker (:mod:`affectkit.data.provenance`) for a synthetic file; None for real data.
    provenance: dict[str, Any] | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.dims)

    def summary(self) -> str:
        sizes = "/".join(str(len(self.splits[s])) for s in SPLITS)
        dims = ", ".join(f"{m} {d}" for m, d in self.dims.items())
        return f"{self.path.name}: {sizes} clips (train/valid/test), {self.seq_len} steps, dims {dims}"


def _as_float_array(value: object, where: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise DataError(f"{where}: expected a numpy array, got {type(value).__name__}")
    if not np.issubdtype(value.dtype, np.number):
        raise DataError(f"{where}: expected a numeric array, got dtype {value.dtype}")
    return value


def load_mosi(path: str | Path, modalities: Sequence[str] | None = None) -> MosiData:
    """Load and validate a MOSI pickle; only the requested modalities are read into tensors.

    MMSA's aligned/unaligned pickles (MOSI, MOSEI, SIMS) are read too (:mod:`affectkit.data.mmsa`).

    Non-finite feature values (the real audio holds +-inf) are replaced by 0 and counted in a log line.
    Every malformed input raises a one-line DataError naming the file, split and key.
    """
    path = Path(path)
    raw = safe_load(path, encoding="latin1")
    name = str(path)
    if is_mmsa(raw):  # MMSA's aligned/unaligned MOSI, MOSEI or SIMS pickle
        raw = mmsa_to_mosi(raw, name)
    if not isinstance(raw, dict):
        raise DataError(f"{name}: expected a dict of splits {list(SPLITS)}, got {type(raw).__name__}")
    wanted = tuple(MODALITIES) if modalities is None else tuple(modalities)
    unknown = [m for m in wanted if m not in MODALITIES]
    if unknown:
        raise DataError(f"{name}: unknown modality {unknown[0]!r}; valid: {', '.join(MODALITIES)}")
    wanted = tuple(m for m in MODALITIES if m in wanted)

    splits: dict[str, MosiSplit] = {}
    dims: dict[str, int] = {}
    seq_len: int | None = None
    replaced = {m: 0 for m in wanted}
    for split in SPLITS:
        if split not in raw:
            raise DataError(f"{name}: split {split!r} missing (found: {', '.join(map(str, raw)) or 'none'})")
        part = raw[split]
        if not isinstance(part, dict):
            raise DataError(f"{name}[{split}]: expected a dict of arrays, got {type(part).__name__}")
        for key in (*wanted, "labels"):
            if key not in part:
                raise DataError(f"{name}[{split}]: key {key!r} missing (found: {', '.join(map(str, part))})")
        labels = _as_float_array(part["labels"], f"{name}[{split}][labels]")
        n = labels.shape[0] if labels.ndim else 0
        if n == 0:
            raise DataError(f"{name}[{split}]: empty split (0 clips)")
        if labels.size != n:
            raise DataError(f"{name}[{split}][labels]: expected one label per clip, got shape {labels.shape}")
        labels = labels.reshape(n).astype(np.float32)
        if not np.isfinite(labels).all():
            raise DataError(f"{name}[{split}][labels]: {int((~np.isfinite(labels)).sum())} non-finite labels")
        lo, hi = LABEL_RANGE
        if labels.min() < lo or labels.max() > hi:
            raise DataError(
                f"{name}[{split}][labels]: labels must lie in [{lo:g}, {hi:g}], "
                f"found [{labels.min():g}, {labels.max():g}]"
            )
        feats: dict[str, torch.Tensor] = {}
        for m in wanted:
            where = f"{name}[{split}][{m}]"
            arr = _as_float_array(part[m], where)
            if arr.ndim != 3:
                raise DataError(f"{where}: expected a 3-D array (clips, steps, dims), got shape {arr.shape}")
            if arr.shape[0] != n:
                raise DataError(f"{where}: {arr.shape[0]} clips but {n} labels")
            if seq_len is None:
                seq_len = arr.shape[1]
            elif arr.shape[1] != seq_len:
                raise DataError(f"{where}: sequence length {arr.shape[1]} differs from {seq_len} in other modalities")
            if dims.setdefault(m, arr.shape[2]) != arr.shape[2]:
                raise DataError(f"{where}: feature dim {arr.shape[2]} differs from {dims[m]} in another split")
            arr = np.array(arr, dtype=np.float32)  # a copy: never mutate the caller's arrays
            bad = ~np.isfinite(arr)
            if bad.any():
                replaced[m] += int(bad.sum())
                arr[bad] = 0.0
            feats[m] = torch.from_numpy(arr)
        ids_raw = part.get("id")
        ids = ["_".join(map(str, np.asarray(i).reshape(-1))) for i in ids_raw] if ids_raw is not None else []
        splits[split] = MosiSplit(features=feats, labels=torch.from_numpy(labels), ids=ids)
    counted = {m: c for m, c in replaced.items() if c}
    if counted:
        log.info(
            "%s: replaced non-finite feature values (inf/nan) by 0: %s",
            path.name,
            ", ".join(f"{m} {c}" for m, c in counted.items()),
        )
    return MosiData(path=path, splits=splits, dims=dims, seq_len=int(seq_len or 0), nonfinite_replaced=replaced,
                    provenance=marker_of(raw))


def mosi_loader(split: MosiSplit, batch_size: int, shuffle: bool) -> DataLoader:
    """Batches as slices of the split's tensors.

    Uses torch's DataLoader with a BatchSampler over a Random/SequentialSampler, so a seeded run draws from
    the global RNG exactly as the lab's per-item ``DataLoader(dataset, batch_size, shuffle)`` does (same
    shuffling order), while each batch is one ``index_select`` per tensor instead of B ``torch.tensor`` calls.
    """
    sampler = RandomSampler(split) if shuffle else SequentialSampler(split)
    return DataLoader(split, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)
