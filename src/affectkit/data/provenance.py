"""Where a data file came from, by content: its sha256, and the marker our synthetic generators write into it.

A table must never be mistaken for one computed on another file, nor synthetic data for real data. The
generators add one top-level key, :data:`MARKER_KEY`, to the pickle (a plain dict: the command that made the
file, the generator and its seed); loaders read it when present and tolerate files without it (every real
file). The file's sha256 identifies its content whatever its name or path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from affectkit import __version__

#: The top-level key of a data pickle that holds the generator's marker.
MARKER_KEY = "affectkit_provenance"


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def synthetic_marker(kind: str, seed: int, command: str | None = None, **settings: Any) -> dict[str, Any]:
    """The marker a generator writes: ``kind`` is ``mosi`` or ``conversation``; ``command`` the command line
    that made the file (default: the ``affectkit make-synthetic`` equivalent of the seed); ``settings``
    any other generator arguments (plain values only: the file is read by a restricted unpickler)."""
    return {
        "synthetic": True,
        "generator": f"affectkit make-synthetic {kind}",
        "seed": int(seed),
        "command": command or f"affectkit make-synthetic {kind} OUT --seed {int(seed)}",
        "settings": {k: v for k, v in settings.items() if v is not None},
        "affectkit": __version__,
    }


def marker_of(raw: Any) -> dict[str, Any] | None:
    """The generator's marker of a loaded data pickle, or None (a file without one, e.g. any real file)."""
    if not isinstance(raw, dict):
        return None
    marker = raw.get(MARKER_KEY)
    return dict(marker) if isinstance(marker, dict) else None


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The marker of a data file on disk (through the restricted unpickler), or None."""
    from affectkit.safe_pickle import safe_load

    return marker_of(safe_load(path, encoding="latin1"))


def describe_marker(marker: dict[str, Any] | None) -> str:
    """The words a summary uses for a marker: which command and seed made the file (empty for real data)."""
    if not marker or not marker.get("synthetic"):
        return ""
    return (f"SYNTHETIC data from `{marker.get('generator', 'affectkit make-synthetic')}` "
            f"(generator seed {marker.get('seed', '?')}; made by `{marker.get('command', '?')}`)")
