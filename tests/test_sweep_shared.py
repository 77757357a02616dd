"""Sweeps whose trials share one study: two ``affectkit sweep`` processes on one PostgreSQL study split the budget
without a duplicate; a trial whose driver went silent is failed by Optuna's heartbeat check and run again with
its parameters; settings that change nothing (threads) do not block a resume, the others do."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from affectkit.data.synthetic_mosi import write_synthetic_mosi  # noqa: E402
from affectkit.errors import ConfigError  # noqa: E402
from affectkit.sweep import read_trials, run_sweep  # noqa: E402
from affectkit.sweep.search import open_storage, open_study, storage_url  # noqa: E402
from affectkit.sweep.spec import load_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = {"sizes": {"train": 48, "valid": 16, "test": 16}, "dims": {"vision": 4, "text": 6, "audio": 5}, "seq_len": 8}


def _sweep(tmp_path: Path, trials: int, **extra) -> Path:
    spec = {"name": "shared", "base": str(ROOT / "configs" / "mosi_lab.yaml"), "trials": trials, "seed": 3,
            "common": {"model.hidden": 4, "train.epochs": 2, "train.tensorboard": False},
            "pruner": {"kind": "none"}, "random_trials": 2,
            "params": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "model.hidden": {"choices": [4, 8]}}}
    spec.update(extra)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    return write_synthetic_mosi(tmp_path / "d.pkl", seed=0, **TINY)


def _sweep_process(spec: Path, data: Path, out: Path, storage: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "affectkit.cli", "-q", "sweep", str(spec), "--data", str(data),
                             "--out", str(out), "--storage", storage, "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_processes_share_one_postgres_study_without_duplicates(tmp_path, data, postgres_url):
    """Two drivers (as on two machines: separate folders) on one study: the budget is met exactly, every trial
    number is run once by one of them, both contributed, and each trial's folder is on its driver's side."""
    trials = 8
    spec = _sweep(tmp_path, trials)
    procs = [_sweep_process(spec, data, tmp_path / name, postgres_url) for name in ("a", "b")]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=storage_url(postgres_url))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == trials  # the budget, exactly, however the two raced
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    surplus = [t for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(t.state == optuna.trial.TrialState.FAIL and "error" not in t.user_attrs for t in surplus)
    drivers = {t.user_attrs["driver"] for t in done}
    assert len(drivers) == 2, f"one driver ran every trial: {drivers}"
    folders = {name: {int(f.name) for f in (tmp_path / name / "trials").glob("*") if (f / "metrics.json").is_file()}
               for name in ("a", "b")}
    assert not folders["a"] & folders["b"]  # no trial trained twice
    assert folders["a"] | folders["b"] == {t.number for t in done}
    by_driver = {}
    for t in done:
        by_driver.setdefault(t.user_attrs["driver"], set()).add(t.number)
    assert sorted(map(sorted, by_driver.values())) == sorted(map(sorted, folders.values()))
    for name in ("a", "b"):  # each driver's table lists the whole study as it stood when it finished
        rows = read_trials(tmp_path / name / "trials.csv")
        assert {int(r["number"]) for r in rows if r["state"] == "COMPLETE"} <= {t.number for t in done}
    last = max(("a", "b"), key=lambda n: (tmp_path / n / "trials.csv").stat().st_mtime)
    assert len([r for r in read_trials(tmp_path / last / "trials.csv") if r["state"] == "COMPLETE"]) == trials


def test_a_silent_drivers_trial_is_failed_by_the_heartbeat_and_run_again(tmp_path, data):
    """A trial left RUNNING by a driver that died (its heartbeat stops) is failed once the grace period passes,
    queued again with the same parameters by Optuna's retry callback, and run: the budget is met with it."""
    spec = _sweep(tmp_path, 3)
    out = tmp_path / "s"
    out.mkdir()
    url = f"sqlite:///{(out / 'optuna.db').resolve()}"
    from affectkit.data.provenance import file_sha256

    storage = open_storage(url, heartbeat_s=1, grace_s=2)
    study = open_study(load_sweep(spec), storage, file_sha256(data), url)
    dead = study.ask()  # the base trial (queued first), then the driver "dies": no tell, no more heartbeats
    for p in load_sweep(spec).params:
        p.suggest(dead)
    dead.set_user_attr("driver", "elsewhere:1")
    storage.record_heartbeat(dead._trial_id)
    # SQLite's clock (CURRENT_TIMESTAMP) has one-second steps and Optuna's check is strict ("older than grace"):
    # 2.5 s of silence can read as 2 s; 3.5 s reads as 3 or 4 s, past the 2 s grace whatever the sub-second phase.
    time.sleep(3.5)
    res = run_sweep(spec, data=data, out=out, threads=1, progress=False, heartbeat_s=1, grace_s=2)
    study = optuna.load_study(study_name="shared", storage=url)
    failed = study.trials[dead.number]
    assert failed.state == optuna.trial.TrialState.FAIL and "error" not in failed.user_attrs
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == failed.params
    assert res.states == {"FAIL": 1, "COMPLETE": 3}


def test_threads_do_not_block_a_resume_other_settings_do(tmp_path, data):
    spec = _sweep(tmp_path, 1)
    out = tmp_path / "s"
    assert run_sweep(spec, data=data, out=out, threads=1, progress=False).ran == 1
    again = run_sweep(spec, data=data, out=out, threads=1, progress=False,
                      overrides=["train.num_threads=2", "train.progress=true"])
    assert again.ran == 0
    with pytest.raises(ConfigError, match="other base settings"):
        run_sweep(spec, data=data, out=out, threads=1, progress=False, overrides=["train.epochs=3"])


def test_a_bad_storage_is_one_line_that_hides_the_password(tmp_path, data):
    from affectkit.serve.throwaway import free_port

    with pytest.raises(ConfigError) as err:
        run_sweep(_sweep(tmp_path, 1), data=data, out=tmp_path / "s", progress=False,
                  storage=f"postgresql://u:secret@127.0.0.1:{free_port()}/db")
    assert "cannot open the Optuna storage" in str(err.value) and "secret" not in str(err.value)
    assert "\n" not in str(err.value)
