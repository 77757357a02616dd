"""The cross-study table: cells computed from results.csv files, checked against hand-computed values."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from affectkit.errors import ConfigError
from affectkit.studies.compare import Row, cross_study_table


def _results(folder: Path, values: dict[str, list[float]]) -> Path:
    folder.mkdir(parents=True)
    with (folder / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seed", "test_F1_weighted"])
        for variant, vs in values.items():
            for seed, v in enumerate(vs, 42):
                w.writerow([variant, seed, v])
    return folder


def test_cells_are_mean_std_and_paired_difference(tmp_path):
    a = _results(tmp_path / "a", {"base": [0.50, 0.60, 0.70], "new": [0.52, 0.63, 0.74]})
    b = _results(tmp_path / "b", {"base": [0.40, 0.40]})  # "new" not run there; two seeds only
    table = cross_study_table({"A": a, "B": b, "C": tmp_path / "missing"},
                              [Row("base", "base"), Row("new", "new", "base")])
    lines = table.splitlines()
    assert lines[0] == "| | A | B | C |"
    # base in A: mean 60.0, sample std 10.0; in B: 40.0 ± 0.0 with n=2 flagged; C not run
    assert lines[2] == "| base | 60.0 ± 10.0 (n=3) | 40.0 ± 0.0 (n=2) | — |"
    # new - base per seed: 2, 3, 4 points -> mean 3.0, sd 1.0, t(0.975, 2) = 4.303 -> ± 2.48
    assert lines[3] == "| new | 63.0 ± 11.0 (n=3) (+3.0 [+0.5, +5.5]\\*) | — | — |"


def test_a_column_can_read_the_selection_split(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "results.csv").write_text("variant,seed,valid_F1_weighted,test_F1_weighted\n"
                                        "x,1,0.5,0.1\nx,2,0.7,0.1\n")
    table = cross_study_table({"dev": (folder, "valid"), "test": folder}, [Row("x", "x")])
    assert table.splitlines()[2] == "| x | 60.0 ± 14.1 (n=2) | 10.0 ± 0.0 (n=2) |"


def test_an_unreadable_results_file_is_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.csv").write_text("variant,seed,test_F1_weighted\nx,notanint,0.5\n")
    with pytest.raises(ConfigError, match=r"a/results\.csv: unreadable results"):
        cross_study_table({"A": tmp_path / "a"}, [Row("x", "x")])


def test_a_column_can_join_the_runs_of_several_studies(tmp_path):
    """A list of folders: their variants side by side in one column (and on the selection split); a
    variant found in two of them is refused by name."""
    a = _results(tmp_path / "a", {"small": [0.50, 0.60]})
    b = _results(tmp_path / "b", {"large": [0.70, 0.80], "large_ft": [0.72, 0.83]})
    table = cross_study_table({"test": [a, b], "dev": ([a, b], "test")},
                              [Row("small", "small"), Row("large", "large"), Row("ft", "large_ft", "large")])
    lines = table.splitlines()
    assert lines[2] == "| small | 55.0 ± 7.1 (n=2) | 55.0 ± 7.1 (n=2) |"
    assert lines[3] == "| large | 75.0 ± 7.1 (n=2) | 75.0 ± 7.1 (n=2) |"
    assert lines[4].startswith("| ft | 77.5 ± 7.8 (n=2) (+2.5 [")
    c = _results(tmp_path / "c", {"small": [0.1]})
    with pytest.raises(ConfigError, match=r"variant 'small' is in both .*a/results\.csv and .*c/results\.csv"):
        cross_study_table({"test": [a, c]}, [Row("small", "small")])
