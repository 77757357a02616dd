"""One table across several studies: a row per (label, variant), a column per study, each cell the variant's
mean ± std over seeds of one test metric and, where the row names a reference variant, the paired difference
to it (same study, same seeds) with its 95% t interval. Built from the studies' ``results.csv`` alone, so a
README table that compares datasets is generated, never typed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affectkit.errors import ConfigError
from affectkit.studies.report import mean_std, paired_difference, per_seed, read_results_csv

__all__ = ["Row", "cross_study_table", "study_runs"]


@dataclass(frozen=True)
class Row:
    """A table row: its ``label``, the ``variant`` it shows and the ``reference`` variant its paired
    difference is taken to (None: no difference)."""

    label: str
    variant: str
    reference: str | None = None


def _cell(rows: list[dict[str, Any]], row: Row, key: str, scale: float) -> str:
    values = per_seed(rows, row.variant, key)
    mean, std, n = mean_std(values.values())
    if n == 0:
        return "—"
    text = f"{mean * scale:.1f} ± {std * scale:.1f}" if n > 1 else f"{mean * scale:.1f}"
    if n < 5:
        text += f" (n={n})"
    if row.reference is not None:
        d = paired_difference(per_seed(rows, row.reference, key), values)
        if d.n >= 2:
            star = "\\*" if d.excludes_zero else ""
            text += f" ({d.mean * scale:+.1f} [{d.lo * scale:+.1f}, {d.hi * scale:+.1f}]{star})"
        elif d.n == 1:
            text += f" ({d.mean * scale:+.1f})"
    return text


Folders = str | Path | list[str | Path]


def study_runs(folders: Folders, keys: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The runs of a study folder, or of several together (their ``results.csv``; a folder not run yet has
    none): each run's seed and variant checked and each of ``keys`` a number where present; a variant found
    in two of the folders is refused by name."""
    runs: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    for folder in folders if isinstance(folders, list) else [folders]:
        csv = Path(folder) / "results.csv"
        try:
            these = read_results_csv(csv) if csv.is_file() else []
            for r in these:
                int(r["seed"]), str(r["variant"])
                for key in keys:
                    if r.get(key) not in (None, ""):
                        float(r[key])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{csv}: unreadable results ({exc})") from None
        for variant in {str(r["variant"]) for r in these}:
            if seen.setdefault(variant, csv) != csv:
                raise ConfigError(f"variant {variant!r} is in both {seen[variant]} and {csv}")
        runs += these
    return runs


def cross_study_table(studies: Mapping[str, Folders | tuple[Folders, str]], rows: Sequence[Row],
                      metric: str = "F1_weighted", scale: float = 100.0) -> str:
    """A markdown table: ``studies`` maps a column title to a study folder (its ``results.csv``), a list of
    folders (their runs together, :func:`study_runs`), or to ``(folder(s), split)`` for another split than
    ``test`` (``valid``: the selection split); every cell shows
    ``<split>_<metric>`` x ``scale`` as mean ± std over seeds (n when fewer than 5) and, for a row with a
    reference, ``(Δ [95% interval])`` paired by seed within that study (\\* = excludes 0). A study not run
    yet gives "—" cells."""
    loaded: dict[str, tuple[list[dict[str, Any]], str]] = {}
    for title, where in studies.items():
        folders, split = where if isinstance(where, tuple) else (where, "test")
        key = f"{split}_{metric}"
        loaded[title] = (study_runs(folders, [key]), key)
    lines = ["| | " + " | ".join(studies) + " |", "|---|" + "---|" * len(studies)]
    for row in rows:
        cells = [_cell(rows_of, row, key, scale) for rows_of, key in loaded.values()]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
