"""Shared fixtures: small synthetic MOSI files on disk, an in-memory MOSI dict to break, a pickle writer, a
throw-away PostgreSQL server and fresh databases on it."""

from __future__ import annotations

import itertools
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from affectkit.config import RunConfig, load_config
from affectkit.data.synthetic_mosi import make_synthetic_mosi, write_synthetic_mosi

# One intra-op thread: the suite runs on small machines shared with other jobs, where torch's default
# (one thread per core, spinning while it waits) makes tiny LSTMs many times slower under load.
torch.set_num_threads(1)

SMALL_SIZES: dict[str, int] = {"train": 96, "valid": 32, "test": 48}
MEDIUM_SIZES: dict[str, int] = {"train": 240, "valid": 60, "test": 120}
#: The in-memory dict to break: tiny dims and sequence length so each variant writes in microseconds.
TINY_SIZES: dict[str, int] = {"train": 10, "valid": 6, "test": 8}
TINY_DIMS: dict[str, int] = {"vision": 3, "text": 5, "audio": 4}
TINY_SEQ = 8

#: Overrides for a fast run that is not about the recipe: small model, no progress bar, no TensorBoard.
FAST = ["train.progress=false", "train.tensorboard=false", "train.graph=false", "model.hidden=16"]


@pytest.fixture(scope="session")
def small_mosi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic MOSI pickle in the real layout, 96/32/48 clips, real dims and 50 steps (seed 0)."""
    return write_synthetic_mosi(tmp_path_factory.mktemp("mosi") / "small.pkl", seed=0, sizes=SMALL_SIZES)


@pytest.fixture(scope="session")
def medium_mosi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240/60/120 clips (what ``make-synthetic mosi --small`` writes): enough to learn the planted signal."""
    return write_synthetic_mosi(tmp_path_factory.mktemp("mosi") / "medium.pkl", seed=0, sizes=MEDIUM_SIZES)


@pytest.fixture
def mosi_raw() -> dict[str, dict[str, np.ndarray]]:
    """A fresh, valid MOSI dict (tiny sizes/dims, no planted inf) for a test to modify and write."""
    raw = make_synthetic_mosi(seed=1, sizes=TINY_SIZES, dims=TINY_DIMS, seq_len=TINY_SEQ)
    for part in raw.values():
        for key in TINY_DIMS:
            part[key][~np.isfinite(part[key])] = 0.0
    return raw


@pytest.fixture
def write_pickle(tmp_path: Path) -> Callable[..., Path]:
    """``write_pickle(obj, name="data.pkl", protocol=4)`` -> the path of ``obj`` pickled under tmp_path."""

    def write(obj: Any, name: str = "data.pkl", protocol: int = 4) -> Path:
        path = tmp_path / name
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        return path

    return write


@pytest.fixture(scope="session")
def small_sizes() -> dict[str, int]:
    return dict(SMALL_SIZES)


@pytest.fixture(scope="session")
def lab_yaml() -> Path:
    """``configs/mosi_lab.yaml`` as an absolute path (tests may run from any folder)."""
    return Path(__file__).resolve().parents[1] / "configs" / "mosi_lab.yaml"


@pytest.fixture(scope="session")
def fast_cfg(lab_yaml: Path) -> Callable[..., RunConfig]:
    """``fast_cfg(*overrides, fast=True)``: the lab preset, then the FAST overrides, then ``overrides``."""

    def make(*overrides: str, fast: bool = True) -> RunConfig:
        return load_config(lab_yaml, [*(FAST if fast else []), *overrides])

    return make


_DATABASES = itertools.count()


@pytest.fixture(scope="session")
def postgres_server() -> Any:
    """A throw-away PostgreSQL cluster on 127.0.0.1 for the whole run (skips when it cannot be started here);
    stopped, its folder deleted, at the end."""
    from affectkit.serve.throwaway import LocalPostgres, postgres_missing

    shared = os.environ.get("AFFECTKIT_TEST_POSTGRES_PORT")
    if shared:  # a throw-away server started once for many runs (tools/mutation.py): no initdb per run
        server = LocalPostgres.__new__(LocalPostgres)
        server.port = int(shared)
        yield server
        return
    reason = postgres_missing()
    if reason:
        pytest.skip(f"PostgreSQL tests: {reason}")
    server = LocalPostgres(fsync=False)
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: Any) -> str:
    """A fresh, empty database on the throw-away server; its URL."""
    return postgres_server.create_database(f"t{os.getpid()}_{next(_DATABASES)}_{os.urandom(4).hex()}")
