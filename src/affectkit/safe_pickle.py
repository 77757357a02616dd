"""A restricted unpickler: data pickles may hold numpy arrays and plain containers, nothing else.

`pickle.load` on a downloaded file runs arbitrary code; this loader only resolves the handful of
globals that numpy arrays need and refuses every other class with a message naming it.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from pathlib import Path
from typing import Any

from affectkit.errors import DataError

# (module, name) pairs a numpy array / scalar pickle needs.  Anything else is refused.
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("builtins", "slice"),
        ("builtins", "range"),
        ("builtins", "complex"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # protocol 0-2 pickles name builtins by their Python 2 names (``__builtin__.set``): map them first, as
        # pickle itself does, so the check sees the name that would be resolved (Python 3 has no such modules)
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load class {module}.{name}")


def safe_load(path: str | Path, *, encoding: str = "ASCII") -> Any:
    """Load a pickle that may only contain numpy arrays, dtypes and plain containers.

    Raises DataError (one line, naming the file) for a missing file, a refused class or a corrupt pickle.
    `encoding="latin1"` reads Python-2 pickles holding numpy arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: {exc} (only numpy arrays and plain containers are allowed)") from None
    except Exception as exc:  # a corrupt file raises many types (EOFError, OverflowError, MemoryError, ...)
        first = (str(exc).splitlines() or [""])[0]
        detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__  # MemoryError() has no text
        raise DataError(f"{path}: not a readable pickle ({detail})") from None
