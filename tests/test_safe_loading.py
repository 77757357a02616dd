"""Safe loading, pinned: the restricted unpickler's allow-list is exactly the numpy/containers set, and the
usual code-carrying callables are refused, before they run, in data pickles and in checkpoints."""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from affectkit import safe_pickle
from affectkit.checkpoint import read_checkpoint
from affectkit.errors import DataError
from affectkit.safe_pickle import safe_load

# What a numpy array or scalar pickle (protocols 0-5, numpy 1.x and 2.x) and plain containers need. Adding a
# name here is a security decision: it must be reviewed, and this test changed with it.
PINNED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "slice"),
    ("builtins", "range"), ("builtins", "complex"), ("collections", "OrderedDict"), ("_codecs", "encode"),
}


def test_the_allow_list_is_pinned():
    assert set(safe_pickle._ALLOWED) == PINNED


class _Call:
    """Pickles as ``func(*args)``: what a malicious file does on ``pickle.load``."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, Any]:
    """One payload per code-carrying callable; those that can act on their own create ``marker``."""
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    return {
        "builtins.eval": _Call(eval, touch),
        "builtins.exec": _Call(exec, touch),
        "builtins.getattr": _Call(getattr, _Call(__import__, "os"), "system"),
        "builtins.__import__": _Call(__import__, "os"),
        "system": _Call(os.system, f"touch {marker}"),  # posix.system (nt.system on Windows)
        "subprocess.Popen": _Call(subprocess.Popen, ["touch", str(marker)]),
        "functools.partial": _Call(functools.partial, os.system, f"touch {marker}"),
        "builtins.open": _Call(open, str(marker), "w"),
    }


@pytest.mark.parametrize("name", list(_payloads(Path("m"))))
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_data_pickles_refuse_code_carrying_callables(tmp_path, name, protocol):
    marker = tmp_path / "pwned"
    payload = {"train": [np.zeros(3)], "evil": _payloads(marker)[name]}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(DataError, match=rf"evil\.pkl: refused to load class \S*{name.split('.')[-1]}\b"):
        safe_load(path)
    assert not marker.exists()
    # plain pickle would have run it (the payload is real), for those that act on their own
    if name in ("builtins.eval", "builtins.exec", "system", "builtins.open"):
        pickle.loads(path.read_bytes())
        assert marker.exists()


@pytest.mark.parametrize("name", list(_payloads(Path("m"))))
def test_checkpoints_refuse_code_carrying_callables(tmp_path, name):
    marker = tmp_path / "pwned"
    path = tmp_path / "best.pt"
    torch.save({"affectkit_checkpoint": 1, "config": {}, "info": {}, "state_dict": {},
                "extra": {"evil": _payloads(marker)[name]}}, path)
    with pytest.raises(DataError, match=r"best\.pt: not a loadable checkpoint \(UnpicklingError\)"):
        read_checkpoint(path)
    assert not marker.exists()


def test_arrays_and_containers_still_load(tmp_path):
    data = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": {1, 2}, "f": frozenset("ab"), "r": range(3),
            "n": np.float64(2.5), "b": bytearray(b"xy"), "c": 1 + 2j}
    for protocol in (0, 2, 4, 5):
        path = tmp_path / f"ok{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        back = safe_load(path)
        np.testing.assert_array_equal(back["a"], data["a"])
        assert {k: v for k, v in back.items() if k != "a"} == {k: v for k, v in data.items() if k != "a"}


def test_python2_strings_decode_with_the_given_encoding(tmp_path):
    """A Python 2 ``str`` (protocol 0 ``STRING``) is decoded as ASCII by default, latin-1 when asked (the
    upstream IEMOCAP/MELD feature files are Python 2 pickles)."""
    ascii_path, latin_path = tmp_path / "a.pkl", tmp_path / "l.pkl"
    ascii_path.write_bytes(b"S'abc'\n.")
    latin_path.write_bytes(b"S'\\xe9t\\xe9'\n.")
    assert safe_load(ascii_path) == "abc"
    assert safe_load(latin_path, encoding="latin1") == "\u00e9t\u00e9"
    with pytest.raises(DataError, match=r"l\.pkl: not a readable pickle \(UnicodeDecodeError: 'ascii' codec"):
        safe_load(latin_path)


def test_unreadable_files_are_one_line_errors_naming_the_file(tmp_path):
    with pytest.raises(DataError, match=r"^\S*missing\.pkl: file not found$"):
        safe_load(tmp_path / "missing.pkl")
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(DataError, match=r"^\S*empty\.pkl: not a readable pickle \(EOFError: Ran out of input\)$"):
        safe_load(tmp_path / "empty.pkl")
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps(list(range(100)), protocol=4)[:40])
    with pytest.raises(DataError, match=r"^\S*cut\.pkl: .*truncated.* \(only numpy arrays and plain containers"):
        safe_load(tmp_path / "cut.pkl")


def test_an_allocation_bomb_is_a_one_line_error(tmp_path):
    """``bytearray(10**18)`` (an allowed callable with a hostile size) fails in allocation, not later."""
    (tmp_path / "bomb.pkl").write_bytes(b"c__builtin__\nbytearray\n(I1000000000000000000\ntR.")
    with pytest.raises(DataError, match=r"^\S*bomb\.pkl: not a readable pickle \(MemoryError\)$"):
        safe_load(tmp_path / "bomb.pkl")
