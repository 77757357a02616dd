"""Sweeps: the file is checked, the trainer's per-epoch hook, test data never guides the search (two files
that differ only in their test split give the same trial table), the best trial is tested exactly once, the
sweep resumes from its SQLite storage, and a regenerated data file is refused."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml

import affectkit.evaluate
from affectkit.config import load_config
from affectkit.data.provenance import MARKER_KEY
from affectkit.data.synthetic_mosi import make_synthetic_mosi, write_synthetic_mosi
from affectkit.errors import ConfigError
from affectkit.train import train

optuna = pytest.importorskip("optuna")

from affectkit.sweep import load_sweep, read_trials, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = {"sizes": {"train": 64, "valid": 24, "test": 32}, "dims": {"vision": 5, "text": 8, "audio": 6}, "seq_len": 10}


def _sweep(tmp_path: Path, **extra) -> Path:
    spec = {"name": "tiny", "base": str(ROOT / "configs" / "mosi_lab.yaml"), "trials": 4, "seed": 1,
            "common": {"model.hidden": 8, "train.epochs": 3, "train.tensorboard": False},
            "pruner": {"kind": "median", "startup_trials": 1, "warmup_epochs": 0},
            "params": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                       "model.hidden": {"choices": [4, 8]}, "model.num_layers": {"low": 1, "high": 2}}}
    spec.update(extra)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def count_tests(monkeypatch) -> list[tuple[str, list]]:
    """Every evaluation of a checkpoint by the sweep (the only way it touches the test split)."""
    calls: list[tuple[str, list]] = []
    real = affectkit.evaluate.evaluate_checkpoint

    def counting(ckpt, data, splits=None):
        calls.append((Path(ckpt).parent.name, list(splits or [])))
        return real(ckpt, data, splits)

    monkeypatch.setattr(affectkit.evaluate, "evaluate_checkpoint", counting)
    return calls


def test_sweep_files_are_checked(tmp_path):
    s = load_sweep(_sweep(tmp_path))
    assert (s.select, s.direction, s.trials) == ("Corr", "maximize", 4)
    assert {p.key: p.is_int for p in s.params} == {"train.lr": False, "model.hidden": False, "model.num_layers": True}
    with pytest.raises(ConfigError, match="model.no_such_field"):
        load_sweep(_sweep(tmp_path, params={"model.no_such_field": {"choices": [1]}}))
    with pytest.raises(ConfigError, match="low <= high"):
        load_sweep(_sweep(tmp_path, params={"train.lr": {"low": 0.1, "high": 0.01}}))
    with pytest.raises(ConfigError, match="log range needs low > 0"):
        load_sweep(_sweep(tmp_path, params={"train.lr": {"low": 0, "high": 0.01, "log": True}}))
    with pytest.raises(ConfigError, match="unknown sweep key 'trails'"):
        load_sweep(_sweep(tmp_path, trails=3))
    mae = load_sweep(_sweep(tmp_path, common={"train.select": "MAE", "model.hidden": 8}))
    assert mae.direction == "minimize"
    for shipped in (ROOT / "configs" / "sweeps").glob("*.yaml"):
        assert load_sweep(shipped).trials >= 8


def test_the_trainer_reports_every_epoch_and_stops_when_told(fast_cfg, tmp_path):
    data = write_synthetic_mosi(tmp_path / "d.pkl", seed=0, **TINY)
    seen = []

    def hook(epoch, score):
        seen.append((epoch, score))
        if epoch == 2:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        train(fast_cfg("train.epochs=5", f"out_dir={tmp_path}"), data_path=data, run_dir=tmp_path / "r",
              on_epoch=hook)
    assert [e for e, _ in seen] == [1, 2] and not (tmp_path / "r" / "metrics.json").exists()
    res = train(fast_cfg("train.epochs=2", f"out_dir={tmp_path}"), data_path=data, run_dir=tmp_path / "r2",
                on_epoch=lambda e, s: seen.append((e, s)))
    assert [s for _, s in seen[2:]] == [h["valid_Corr"] for h in res.history]


def test_test_data_never_guides_the_search_and_the_best_is_tested_once(tmp_path, count_tests):
    a = write_synthetic_mosi(tmp_path / "a.pkl", seed=0, **TINY)
    raw = pickle.loads(a.read_bytes())
    raw["test"] = make_synthetic_mosi(9, **TINY)["test"]  # another test split; train and dev the same
    raw[MARKER_KEY]["command"] += " (test split replaced)"
    b = tmp_path / "b.pkl"
    b.write_bytes(pickle.dumps(raw, protocol=4))
    sweep = _sweep(tmp_path)
    ra = run_sweep(sweep, data=a, out=tmp_path / "sa", threads=1, progress=False)
    rb = run_sweep(sweep, data=b, out=tmp_path / "sb", threads=1, progress=False)

    def table(out):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in read_trials(out / "trials.csv")]

    assert table(tmp_path / "sa") == table(tmp_path / "sb")  # states, dev values, epochs, params: all equal
    base = table(tmp_path / "sa")[0]  # trial 0: the base preset's own values, the reference point
    assert base["base"] == "True" and base["param_train.lr"] == "0.001" and base["param_model.hidden"] == "8"
    assert len(table(tmp_path / "sa")) == 4 and ra.best_number == rb.best_number
    assert ra.test["Corr"] != rb.test["Corr"]  # the test files do differ, and only the final evaluation saw it
    best = f"{ra.best_number:04d}"
    assert count_tests == [(best, ["test"]), (best, ["test"])]  # once per sweep, the best trial only
    states = {r["state"] for r in table(tmp_path / "sa")}
    assert states <= {"COMPLETE", "PRUNED"}
    for r in table(tmp_path / "sa"):
        if r["state"] == "PRUNED":
            assert int(r["epochs"]) < 3  # stopped early (its value: the last dev score it reported)

    # every trial's own record proves it never saw test: its provenance says so, the "test" its trainer
    # evaluated is the dev split (equal metrics), and the objective Optuna was told is its dev score
    select = load_sweep(sweep).select
    for r in table(tmp_path / "sa"):
        folder = tmp_path / "sa" / "trials" / f"{int(r['number']):04d}"
        if r["state"] != "COMPLETE":
            continue
        prov = json.loads((folder / "provenance.json").read_text())
        assert prov["test_split"] == "hidden (replaced by the dev split)"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["test"] == metrics["valid"], f"trial {r['number']} was tested on the real test split"
        assert float(r["value"]) == pytest.approx(metrics["valid"][select], abs=1e-12)

    # the best trial is a ready preset with the best parameters
    cfg = load_config(tmp_path / "sa" / "best.yaml")
    assert cfg.train.lr == pytest.approx(ra.best_params["train.lr"])
    assert cfg.model_params["num_layers"] == ra.best_params["model.num_layers"]
    for name in ("history.png", "importance.png"):
        assert (tmp_path / "sa" / name).read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "sa" / "summary.md").read_text()
    assert f"## Best trial: {ra.best_number}" in summary and "Test, evaluated once" in summary

    # resume: the same command again runs nothing and does not test again; a bigger budget adds trials
    again = run_sweep(sweep, data=a, out=tmp_path / "sa", threads=1, progress=False)
    assert again.ran == 0 and len(count_tests) == 2
    more = run_sweep(sweep, data=a, out=tmp_path / "sa", trials=5, threads=1, progress=False)
    assert more.ran == 1 and len(read_trials(tmp_path / "sa" / "trials.csv")) == 5

    # the same storage with other data is refused
    with pytest.raises(ConfigError, match="other data"):
        run_sweep(sweep, data=b, out=tmp_path / "sa", threads=1, progress=False)


def test_no_pruner_prunes_nothing(tmp_path):
    data = write_synthetic_mosi(tmp_path / "d.pkl", seed=0, **TINY)
    res = run_sweep(_sweep(tmp_path, trials=3, pruner={"kind": "none"}), data=data, out=tmp_path / "s",
                    threads=1, progress=False)
    assert res.states == {"COMPLETE": 3}
    assert [r["epochs"] for r in read_trials(tmp_path / "s" / "trials.csv")] == ["3", "3", "3"]
