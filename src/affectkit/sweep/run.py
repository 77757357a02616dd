"""Running a sweep: trials are asked from the study one at a time (``--workers`` in flight on Ray), executed by the
studies' engines (this process, or Ray tasks: the same collection loop as a study's), told back, and the outputs
are written.  Each trial trains with the one trainer on a view of the data whose test split is the dev split, so
no trial ever sees test data; the objective is the dev selection metric of the trial's selected epoch.

The driver is the only writer of the study: a Ray task's per-epoch scores reach it through the engine's relay
and it asks the pruner.  Several drivers (shells, machines) may share one study through a database
(``--storage postgresql://...``); each writes the folders of the trials it ran.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affectkit.data.provenance import file_sha256
from affectkit.errors import ConfigError
from affectkit.studies.engines import LocalEngine, RayEngine, RunOutcome
from affectkit.studies.report import describe_data
from affectkit.studies.run import command_line
from affectkit.sweep.outputs import (
    best_preset,
    evaluate_best_once,
    sweep_summary,
    trial_dir,
    trial_rows,
    write_sweep_plots,
    write_trials_csv,
)
from affectkit.sweep.search import (
    GRACE_S,
    HEARTBEAT_S,
    Heartbeats,
    ask,
    counted,
    fail_stale,
    open_storage,
    open_study,
    over_budget,
    tell,
)
from affectkit.sweep.spec import Sweep, load_sweep

__all__ = ["SweepResult", "run_sweep", "sweep_command"]

log = logging.getLogger("affectkit")


@dataclass
class SweepResult:
    """The sweep folder, the trials by state, the best trial and its one test evaluation."""

    out: Path
    states: dict[str, int]
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]
    test: dict[str, Any]
    select: str
    ran: int = 0

    def report(self) -> str:
        """One paragraph for the command line."""
        states = ", ".join(f"{n} {s.lower()}" for s, n in self.states.items())
        lines = [f"trials: {states} ({self.ran} run now)"]
        if self.best_number is not None:
            lines.append(f"best trial {self.best_number}: dev {self.select} {self.best_value:.4f}; "
                         + ", ".join(f"{k}={v!r}" for k, v in self.best_params.items()))
            shown = {k: v for k, v in self.test.items() if isinstance(v, float)}
            lines.append("test (evaluated once): " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) if shown
                         else "test: not here (the best trial ran under another driver; see summary.md)")
        lines.append(f"results: {self.out / 'summary.md'}, {self.out / 'trials.csv'}, {self.out / 'best.yaml'}")
        return "\n".join(lines)


def sweep_command(path: str | Path, data: str | Path | None, trials: int | None, out: str | Path | None,
                  overrides: Sequence[str] | None, engine: str, address: str | None) -> str:
    parts = ["affectkit", "sweep", str(path)]
    if data is not None:
        parts += ["--data", str(data)]
    if trials is not None:
        parts += ["--trials", str(trials)]
    return command_line(parts, overrides, engine, address, out)


def _trials(sweep: Sweep, study: Any, beats: Heartbeats, running: dict[str, Any], data: str | Path, out: Path,
            sha: str) -> Iterator[dict[str, Any]]:
    """The jobs of new trials, asked one at a time when the engine has a free slot, until the budget is used."""
    while counted(study) < sweep.trials:
        stale = fail_stale(study)
        if stale:
            log.warning("%d trial(s) whose driver went silent marked failed; they are queued again", stale)
        trial = ask(study)
        if over_budget(study, trial.number, sweep.trials):  # another driver asked the last one at the same time
            from optuna.trial import TrialState

            study.tell(trial, state=TrialState.FAIL)  # no "error": uses no budget
            return
        beats.add(trial._trial_id)  # noqa: SLF001 - Optuna's heartbeat API takes the storage's trial id
        values = {p.key: p.suggest(trial) for p in sweep.params}
        job = {"variant": f"trial{trial.number}", "seed": int(sweep.base.get("train", {}).get("seed", 42)),
               "config": sweep.trial_config(values, data, out, trial.number),
               "run_dir": str(trial_dir(out, trial.number)), "data_sha256": sha, "hide_test": True}
        running[job["variant"]] = trial
        yield job


def run_sweep(path: str | Path, data: str | Path | None = None, trials: int | None = None,
              out: str | Path | None = None, storage: str | None = None, overrides: Sequence[str] | None = None,
              engine: str = "local", address: str | None = None, workers: int | None = None,
              threads: int | None = None, progress: bool = True, command: str | None = None,
              heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S) -> SweepResult:
    """Run the sweep's missing trials (resuming its storage: a SQLite file in ``out`` unless ``storage`` names
    another SQLAlchemy URL), then write its tables, plots and best preset, and evaluate the best trial on test
    once.  ``heartbeat_s``/``grace_s``: Optuna's heartbeat of running trials and the silence that makes one stale."""
    sweep = load_sweep(path, overrides)
    if trials is not None:
        sweep.trials = int(trials)
    command = command or sweep_command(path, data, trials, out, overrides, engine, address)
    out = Path(out) if out is not None else Path("sweeps") / sweep.name
    if data is None:
        data = (sweep.base.get("data") or {}).get("path")
        if data is None:
            raise ConfigError("no data file: pass --data PATH (or set data.path in the base preset)")
    if not Path(data).is_file():
        raise ConfigError(f"{data}: data file not found")
    if engine not in ("local", "ray"):
        raise ConfigError(f"unknown engine {engine!r}; valid: local, ray")
    if engine == "local" and workers not in (None, 1):
        raise ConfigError("--workers > 1 needs --engine ray (or run the same command in several shells or machines: "
                          "they share the study through --storage)")
    out.mkdir(parents=True, exist_ok=True)
    sha = file_sha256(data)
    rdb = open_storage(storage or f"sqlite:///{(out / 'optuna.db').resolve()}", heartbeat_s, grace_s)
    shown = rdb.engine.url.render_as_string(hide_password=True)
    study = open_study(sweep, rdb, sha, shown)
    start = time.perf_counter()

    def announce(trial: Any, o: RunOutcome) -> None:
        if progress:
            state = "pruned" if o.pruned else ("ok" if o.ok else f"FAILED ({o.error})")
            value = (o.metrics.get("valid") or {}).get(sweep.select) if o.ok else None
            print(f"trial {trial.number}: {state}" + (f", dev {sweep.select} {value:.4f}" if value is not None else "")
                  + f" ({o.seconds:.0f}s; {counted(study)}/{sweep.trials}, {time.perf_counter() - start:.0f}s)",
                  flush=True)

    runner: LocalEngine | RayEngine = RayEngine(address, threads) if engine == "ray" else LocalEngine(1, threads)
    if engine == "ray" and workers is None:  # as many trials at a time as the cluster holds
        ray = runner.start()  # type: ignore[union-attr]
        cpus = runner.resources(ray, sweep.base)["num_cpus"]  # type: ignore[union-attr]
        workers = max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus, 1)))
    running: dict[str, Any] = {}
    done = [0]

    def decide(job: dict[str, Any], epoch: int, score: float) -> bool:
        trial = running[job["variant"]]
        trial.report(score, epoch)
        return bool(trial.should_prune())

    def record(outcome: RunOutcome) -> None:
        trial = running.pop(outcome.variant)
        tell(study, trial, outcome, sweep.select)
        beats.remove(trial._trial_id)  # noqa: SLF001
        announce(trial, outcome)
        done[0] += 1

    beats = Heartbeats(rdb)
    try:
        runner.run(_trials(sweep, study, beats, running, data, out, sha), record, decide, in_flight=workers or 1)
    except BaseException:  # Ctrl-C: the trials in flight fail without using the budget; they run again next time
        from optuna.trial import TrialState

        for trial in running.values():
            study.tell(trial, state=TrialState.FAIL)
        raise
    finally:
        beats.stop()
    return _write_outputs(sweep, study, out, data, sha, command, done[0])


def _write_outputs(sweep: Sweep, study: Any, out: Path, data: str | Path, sha: str, command: str,
                   ran: int) -> SweepResult:
    rows = trial_rows(study)
    write_trials_csv(rows, out / "trials.csv")
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if not complete:
        (out / "summary.md").write_text(f"# Sweep `{sweep.name}`\n\nNo trial finished: {states}.\n")
        return SweepResult(out, states, None, None, {}, {}, sweep.select, ran)
    notes = write_sweep_plots(study, out, sweep.select)
    best = study.best_trial
    test = evaluate_best_once(study, out, data, sha)
    header = (f"The best trial ({best.number}) of sweep {sweep.name!r}: dev {sweep.select} {best.value:.4f}, "
              f"test {sweep.select} {test.get(sweep.select, float('nan')):.4f} (evaluated once).\n"
              f"Made by: {command}")
    (out / "best.yaml").write_text(best_preset(sweep, dict(best.params), header))
    (out / "summary.md").write_text(sweep_summary(sweep, study, rows, test, describe_data(data, sha), command,
                                                  notes))
    return SweepResult(out, states, best.number, best.value, dict(best.params), test, sweep.select, ran)
