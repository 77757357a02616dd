"""Provenance by content: the generators' marker inside the file (read, never guessed from the name), the data
sha256 per run in results.csv, and resume that matches on content, so a regenerated file never mixes in."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml

from affectkit.cli import main
from affectkit.data.conversation import load_conversations
from affectkit.data.mosi import load_mosi
from affectkit.data.provenance import MARKER_KEY, file_sha256
from affectkit.data.synthetic_conversation import write_synthetic_conversations
from affectkit.data.synthetic_mosi import make_synthetic_mosi, write_synthetic_mosi
from affectkit.errors import ConfigError
from affectkit.studies import collect_results, describe_data, load_study, read_results_csv, run_study

ROOT = Path(__file__).resolve().parents[1]
TINY = {"sizes": {"train": 64, "valid": 24, "test": 32}, "dims": {"vision": 5, "text": 8, "audio": 6}, "seq_len": 10}


def test_the_mosi_generator_marks_its_file_and_the_loader_reads_it(tmp_path):
    path = write_synthetic_mosi(tmp_path / "data.pkl", seed=7, **TINY)
    marker = load_mosi(path).provenance
    assert marker["synthetic"] is True and marker["seed"] == 7
    assert marker["generator"] == "affectkit make-synthetic mosi"
    assert marker["settings"]["sizes"] == TINY["sizes"]
    # a file without the marker (every real file) loads, with no provenance
    raw = pickle.loads(path.read_bytes())
    del raw[MARKER_KEY]
    (tmp_path / "real.pkl").write_bytes(pickle.dumps(raw))
    assert load_mosi(tmp_path / "real.pkl").provenance is None


def test_the_cli_writes_its_own_command_into_the_file(tmp_path, capsys):
    out = tmp_path / "c.pkl"
    assert main(["make-synthetic", "conversation", str(out), "--preset", "mosei2", "--seed", "4"]) == 0
    marker = load_conversations(out).provenance
    assert marker["command"] == f"affectkit make-synthetic conversation {out} --seed 4 --preset mosei2"
    assert marker["generator"] == "affectkit make-synthetic conversation" and marker["seed"] == 4
    line = describe_data(out)
    assert "SYNTHETIC data from `affectkit make-synthetic conversation`" in line and "seed 4" in line
    assert "make-synthetic mosi" not in line
    m = tmp_path / "m.pkl"
    assert main(["make-synthetic", "mosi", str(m), "--small", "--seed", "2"]) == 0
    assert load_mosi(m).provenance["command"] == f"affectkit make-synthetic mosi {m} --seed 2 --small"


def test_synthetic_is_read_from_the_marker_not_the_file_name(tmp_path):
    raw = make_synthetic_mosi(1, **TINY)  # no marker: what a real file looks like
    named = tmp_path / "synth_seed5.pkl"
    named.write_bytes(pickle.dumps(raw))
    line = describe_data(named)
    assert "SYNTHETIC" not in line and f"sha256 {file_sha256(named)[:12]}" in line
    marked = write_synthetic_mosi(tmp_path / "mosi_raw.pkl", seed=5, **TINY)  # a real-looking name
    assert "SYNTHETIC" in describe_data(marked) and "generator seed 5" in describe_data(marked)


def test_a_conversation_file_without_marker_loads(tmp_path):
    path = tmp_path / "c.pkl"
    write_synthetic_conversations(path, preset="mosei2", seed=0, n_dialogues={"train": 3, "dev": 2, "test": 2},
                                  dims={"text": 4, "audio": 3, "visual": 2})
    raw = pickle.loads(path.read_bytes())
    assert raw[MARKER_KEY]["settings"]["preset"] == "mosei2"
    del raw[MARKER_KEY]
    path.write_bytes(pickle.dumps(raw))
    assert load_conversations(path).provenance is None


def _study(tmp_path: Path) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "name": "prov", "base": str(ROOT / "configs" / "mosi_lab.yaml"), "seeds": [1, 2],
        "variants": {"baseline": {}},
        "common": {"model.hidden": 8, "train.epochs": 1, "train.tensorboard": False}}))
    return path


def test_a_file_regenerated_at_the_same_path_never_mixes_into_the_table(tmp_path):
    data = tmp_path / "data.pkl"
    study, out = _study(tmp_path), tmp_path / "out"
    write_synthetic_mosi(data, seed=1, **TINY)
    first = run_study(study, data=data, out=out, progress=False, threads=1)
    sha1 = file_sha256(data)
    assert [r["data_sha256"] for r in read_results_csv(out / "results.csv")] == [sha1, sha1]

    # same path, other content; the driver is interrupted after the first new run
    write_synthetic_mosi(data, seed=2, **TINY)
    sha2 = file_sha256(data)
    assert sha2 != sha1

    def stop(outcome):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(study, data=data, out=out, progress=False, threads=1, on_record=stop)
    rows = collect_results(load_study(study), out, sha2)
    assert len(rows) == 1 and rows[0]["data_sha256"] == sha2  # the old seed-2 run is not in the table

    again = run_study(study, data=data, out=out, progress=False, threads=1)
    assert (again.skipped, len(again.ran)) == (1, 1)  # only the run on the old content reran
    rows = read_results_csv(out / "results.csv")
    assert [r["data_sha256"] for r in rows] == [sha2, sha2]
    assert [r["test_Corr"] for r in rows] != [r["test_Corr"] for r in first.rows]
    assert f"sha256 {sha2[:12]}" in (out / "summary.md").read_text()


def test_moving_the_file_keeps_the_finished_runs(tmp_path):
    data = write_synthetic_mosi(tmp_path / "a.pkl", seed=1, **TINY)
    study, out = _study(tmp_path), tmp_path / "out"
    run_study(study, data=data, out=out, progress=False, threads=1)
    moved = data.rename(tmp_path / "moved.pkl")
    again = run_study(study, data=moved, out=out, progress=False, threads=1)
    assert (again.skipped, len(again.ran)) == (2, 0)  # matched by content, not path


def test_a_variant_trains_on_its_own_data_file_and_the_summary_names_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a variant's data.path is relative to where the study runs, like --data
    write_synthetic_mosi(tmp_path / "a.pkl", seed=1, **TINY)
    write_synthetic_mosi(tmp_path / "b.pkl", seed=2, **TINY)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "name": "two_files", "base": str(ROOT / "configs" / "mosi_lab.yaml"), "seeds": [1, 2],
        "variants": {"on_a": {}, "on_b": {"data.path": "b.pkl"}},
        "common": {"model.hidden": 8, "train.epochs": 1, "train.tensorboard": False}}))
    res = run_study(study, data="a.pkl", out="out", progress=False, threads=1)
    sha = {"on_a": file_sha256(tmp_path / "a.pkl"), "on_b": file_sha256(tmp_path / "b.pkl")}
    assert {(r["variant"], r["data_sha256"]) for r in read_results_csv(tmp_path / "out" / "results.csv")} == \
        set(sha.items())
    # same architecture and seed, different data: the paired rows differ
    by = {(r["variant"], r["seed"]): r["test_Corr"] for r in res.rows}
    assert by[("on_a", 1)] != by[("on_b", 1)]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "on_a: `a.pkl`" in summary and f"sha256 {sha['on_a'][:12]}" in summary
    assert "on_b: `b.pkl`" in summary and f"sha256 {sha['on_b'][:12]}" in summary
    # resume recognises every run by its own file's content; a regenerated b.pkl reruns only on_b
    assert run_study(study, data="a.pkl", out="out", progress=False, threads=1).skipped == 4
    write_synthetic_mosi(tmp_path / "b.pkl", seed=3, **TINY)
    again = run_study(study, data="a.pkl", out="out", progress=False, threads=1)
    assert again.skipped == 2 and {o.variant for o in again.ran} == {"on_b"}


def test_a_variant_data_file_that_does_not_exist_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_synthetic_mosi(tmp_path / "a.pkl", seed=1, **TINY)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "name": "missing", "base": str(ROOT / "configs" / "mosi_lab.yaml"),
        "variants": {"on_a": {}, "on_b": {"data.path": "nope.pkl"}}}))
    with pytest.raises(ConfigError, match=r"nope\.pkl: data file not found \(variant 'on_b'\)"):
        run_study(study, data="a.pkl", out="out", progress=False, threads=1)
    assert not (tmp_path / "out").exists()
