"""Hyper-parameter sweeps: Optuna's TPE sampler over config keys, pruning on the dev metric of every epoch.

A sweep file (``configs/sweeps/*.yaml``)::

    name: mosi_baseline
    base: ../mosi_lab.yaml            # the preset the trials start from (relative to this file)
    trials: 30                        # total trials (finished and pruned ones count)
    seed: 0                           # the sampler's seed
    common: {train.epochs: 20}        # overrides for every trial
    pruner: {kind: median, startup_trials: 5, warmup_epochs: 3}   # or {kind: none}
    random_trials: 10                 # TPE samples at random until this many trials have finished
    include_base: true                # trial 0 is the base preset's own values (the reference point)
    params:
      train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}
      model.dropout: {low: 0.0, high: 0.5, step: 0.1}
      model.hidden: {choices: [32, 64, 128]}
      model.num_layers: {low: 1, high: 2}          # ints stay ints

Each trial trains with the one trainer on a view of the data whose test split is the dev split, so no trial
ever sees test data; the objective is the dev selection metric (``train.select``) of the trial's selected
epoch. The study is stored in SQLite (``OUT/optuna.db``) so the same command resumes and several processes
can share it; the Ray engine runs trials as Ray tasks and the driver alone writes the storage (pruning
decisions travel through a small actor). At the end: ``trials.csv``, ``history.png``, ``importance.png``,
``best.yaml`` (the best trial as a ready preset), and the best trial's checkpoint evaluated on the test split
once (``test.json``; kept while the best trial stays the same), summarised in ``summary.md``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from affectkit import __version__
from affectkit.config import apply_overrides, config_from_dict, dump_yaml, read_mapping, read_yaml
from affectkit.data.provenance import file_sha256
from affectkit.errors import ConfigError
from affectkit.metrics import LOWER_IS_BETTER
from affectkit.studies.engines import PruneRun, RayEngine, RunOutcome, available_cores, execute_run, install_folder
from affectkit.studies.report import describe_data
from affectkit.studies.run import command_line
from affectkit.studies.spec import flatten_overrides

log = logging.getLogger("affectkit")

_SWEEP_KEYS = {"name", "base", "description", "trials", "seed", "common", "params", "pruner", "random_trials",
               "include_base"}
_PARAM_KEYS = {"low", "high", "log", "step", "choices"}


@dataclass
class Param:
    """One searched config key: a float or int range (``log``, ``step``) or a list of ``choices``."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.low, bool)

    def suggest(self, trial: Any) -> Any:
        """Draw this parameter from an Optuna trial."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, self.choices)
        if self.is_int:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def examples(self) -> list[Any]:
        """Values that bound the range (to check the key before any trial runs)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


@dataclass
class Sweep:
    """A sweep file, resolved: the base config (common overrides applied) and the searched parameters."""

    name: str
    base: dict[str, Any]
    params: list[Param]
    trials: int
    seed: int
    select: str
    direction: str
    pruner: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    random_trials: int = 10
    include_base: bool = True

    def base_values(self) -> dict[str, Any] | None:
        """The base preset's own values of the searched keys, if every one lies in its range (else None)."""
        flat = flatten_overrides(self.base)
        values = {}
        for p in self.params:
            v = flat.get(p.key)
            inside = (v in p.choices) if p.choices is not None else (
                isinstance(v, int | float) and not isinstance(v, bool) and p.low <= v <= p.high)
            if not inside:
                return None
            values[p.key] = v
        return values

    def trial_config(self, values: dict[str, Any], data: str | Path, out: Path, number: int) -> dict[str, Any]:
        """The full run config of one trial (a plain dict)."""
        return apply_overrides(self.base, {**values, "name": f"{self.name}-trial{number}", "out_dir": str(out),
                                           "data.path": str(Path(data).resolve()), "train.progress": False})


def _param(key: str, spec: Any, where: str) -> Param:
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{where}: param {key!r} must be {{low, high[, log, step]}} or {{choices: [...]}}")
    unknown = sorted(set(spec) - _PARAM_KEYS)
    if unknown:
        raise ConfigError(f"{where}: param {key!r}: unknown field {unknown[0]!r}; "
                          f"valid: {', '.join(sorted(_PARAM_KEYS))}")
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ConfigError(f"{where}: param {key!r}: choices must be a non-empty list")
        return Param(key, choices=list(spec["choices"]))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: param {key!r} needs low and high (or choices)")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)) or low > high:
        raise ConfigError(f"{where}: param {key!r}: need numbers low <= high, got {low!r}, {high!r}")
    if spec.get("log") and low <= 0:
        raise ConfigError(f"{where}: param {key!r}: a log range needs low > 0")
    return Param(key, low, high, bool(spec.get("log", False)), spec.get("step"))


def load_sweep(path: str | Path, overrides: Sequence[str] | None = None) -> Sweep:
    """Read and check a sweep file: every searched key is tried at the ends of its range before any trial."""
    from affectkit.models.registry import model_config
    from affectkit.tasks import get_task

    path = Path(path)
    raw = read_mapping(path, "sweep")
    unknown = sorted(set(raw) - _SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key {unknown[0]!r}; valid: {', '.join(sorted(_SWEEP_KEYS))}")
    if "base" not in raw:
        raise ConfigError(f"{path}: a sweep needs 'base: PRESET.yaml'")
    base = apply_overrides(read_yaml(path.parent / str(raw["base"])), flatten_overrides(raw.get("common") or {}))
    base = apply_overrides(base, list(overrides or []))
    if not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise ConfigError(f"{path}: 'params' must map config keys to ranges or choices")
    params = [_param(str(k), v, str(path)) for k, v in raw["params"].items()]
    for p in params:
        for value in p.examples():
            try:
                cfg = config_from_dict(apply_overrides(base, {p.key: value}))
                model_config(cfg.model_name, cfg.model_params)
            except ConfigError as exc:
                raise ConfigError(f"{path}: param {p.key!r} = {value!r}: {exc}") from None
    cfg = config_from_dict(base)
    select = cfg.train.select or get_task(cfg.data.task).default_select
    pruner = dict(raw.get("pruner") or {"kind": "median"})
    if pruner.get("kind", "median") not in ("median", "none"):
        raise ConfigError(f"{path}: pruner kind {pruner.get('kind')!r}; valid: median, none")
    trials = int(raw.get("trials", 20))
    if trials < 1:
        raise ConfigError(f"{path}: trials must be >= 1")
    return Sweep(str(raw.get("name") or path.stem), base, params, trials, int(raw.get("seed", 0)), select,
                 "minimize" if select in LOWER_IS_BETTER else "maximize", pruner, path,
                 int(raw.get("random_trials", 10)), bool(raw.get("include_base", True)))


# ----------------------------------------------------------------------------- the Optuna study


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("sweeps need Optuna: pip install 'affectkit[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(sweep: Sweep, storage: str, data_sha256: str) -> Any:
    """Create or resume the Optuna study; refuse one that holds trials on other data or another base config."""
    optuna = _optuna()
    p = sweep.pruner
    pruner = (optuna.pruners.NopPruner() if p.get("kind") == "none" else optuna.pruners.MedianPruner(
        n_startup_trials=int(p.get("startup_trials", 5)), n_warmup_steps=int(p.get("warmup_epochs", 3))))
    study = optuna.create_study(study_name=sweep.name, storage=storage, load_if_exists=True,
                                direction=sweep.direction, pruner=pruner,
                                sampler=optuna.samplers.TPESampler(seed=sweep.seed, constant_liar=True,
                                                                   n_startup_trials=sweep.random_trials))
    if sweep.include_base and not study.trials:
        values = sweep.base_values()
        if values is None:
            log.warning("the base preset's values lie outside the searched ranges: no base trial")
        else:  # the reference point: trial 0 trains the preset itself, under the same budget
            study.enqueue_trial(values, user_attrs={"base": True})
    fingerprint = json.dumps({k: v for k, v in flatten_overrides(sweep.base).items()
                              if k not in ("data.path", "out_dir", "name")}, sort_keys=True, default=str)
    for key, value in (("data_sha256", data_sha256), ("base", fingerprint)):
        old = study.user_attrs.get(key)
        if old is None:
            study.set_user_attr(key, value)
        elif old != value:
            what = f"data (sha256 {old[:12]}, now {value[:12]})" if key == "data_sha256" else "base settings"
            raise ConfigError(f"{storage}: study {sweep.name!r} holds trials on other {what}; use a new --out")
    return study


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale(study: Any) -> int:
    """Mark RUNNING trials whose driver (a process on this host) is gone as FAIL: they rerun, uncounted."""
    from optuna.trial import TrialState

    n = 0
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        h, _, pid = str(t.user_attrs.get("driver", "")).rpartition(":")
        if h == host and pid.isdigit() and not _alive(int(pid)):
            study.tell(t.number, state=TrialState.FAIL)
            n += 1
    return n


def counted(study: Any) -> int:
    """Trials that use the budget: finished, pruned, running, or failed by their own run (not by a stop)."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.FAIL or "error" in t.user_attrs)


# ----------------------------------------------------------------------------- running trials


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
            lines.append("test (evaluated once): " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        lines.append(f"results: {self.out / 'summary.md'}, {self.out / 'trials.csv'}, {self.out / 'best.yaml'}")
        return "\n".join(lines)


def _trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:04d}"


def _tell(study: Any, trial: Any, outcome: RunOutcome, select: str) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("seconds", round(outcome.seconds, 2))
    if outcome.pruned:
        trial.set_user_attr("epochs", len(outcome.metrics.get("epochs", [])))
        study.tell(trial, state=TrialState.PRUNED)
    elif outcome.ok:
        value = (outcome.metrics.get("valid") or {}).get(select)
        trial.set_user_attr("best_epoch", outcome.metrics.get("best_epoch"))
        trial.set_user_attr("epochs", len(outcome.metrics.get("history") or []))
        if value is None or not math.isfinite(value):
            trial.set_user_attr("error", f"dev {select} is not a number")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, float(value))
    else:
        trial.set_user_attr("error", outcome.error or "failed")
        study.tell(trial, state=TrialState.FAIL)


def _new_job(sweep: Sweep, study: Any, data: str | Path, out: Path, sha: str) -> tuple[Any, dict[str, Any]]:
    trial = study.ask()
    trial.set_user_attr("driver", f"{socket.gethostname()}:{os.getpid()}")
    values = {p.key: p.suggest(trial) for p in sweep.params}
    folder = _trial_dir(out, trial.number)
    job = {"variant": f"trial{trial.number}", "seed": int(sweep.base.get("train", {}).get("seed", 42)),
           "config": sweep.trial_config(values, data, out, trial.number), "run_dir": str(folder),
           "data_sha256": sha, "hide_test": True}
    return trial, job


def _run_local(sweep: Sweep, study: Any, data: str | Path, out: Path, sha: str, threads: int | None,
               announce: Callable[[Any, RunOutcome], None]) -> int:
    """Trials one after another in this process; the pruner is asked after every epoch."""
    import torch

    before, level = torch.get_num_threads(), log.level
    torch.set_num_threads(threads or available_cores())
    log.setLevel(logging.WARNING)
    ran = 0
    try:
        while counted(study) < sweep.trials:
            trial, job = _new_job(sweep, study, data, out, sha)

            def on_epoch(epoch: int, score: float, trial: Any = trial) -> None:
                trial.report(score, epoch)
                if trial.should_prune():
                    raise PruneRun(f"trial {trial.number}")

            outcome = execute_run(job, Path(job["run_dir"]), data, on_epoch)
            _tell(study, trial, outcome, sweep.select)
            announce(trial, outcome)
            ran += 1
    finally:
        torch.set_num_threads(before)
        log.setLevel(level)
    return ran


def _board(ray: Any) -> Any:
    """A small async actor: a trial's task reports each epoch's score and waits for the driver's decision
    (prune or go on); the driver drains the reports, writes them to the storage and decides."""
    import asyncio

    @ray.remote(num_cpus=0)
    class Board:
        def __init__(self) -> None:
            self.queue: list[tuple[str, int, float]] = []
            self.waiting: dict[tuple[str, int], Any] = {}
            self.decided: dict[tuple[str, int], bool] = {}

        async def report(self, key: str, epoch: int, score: float) -> bool:
            event = asyncio.Event()
            self.waiting[(key, epoch)] = event
            self.queue.append((key, epoch, score))
            await event.wait()
            return self.decided.pop((key, epoch))

        async def drain(self) -> list[tuple[str, int, float]]:
            queue, self.queue = self.queue, []
            return queue

        async def decide(self, key: str, epoch: int, prune: bool) -> None:
            self.decided[(key, epoch)] = prune
            event = self.waiting.pop((key, epoch), None)
            if event is not None:
                event.set()

    return Board.remote()


def _run_ray(sweep: Sweep, study: Any, data: str | Path, out: Path, sha: str, engine: RayEngine,
             workers: int | None, announce: Callable[[Any, RunOutcome], None]) -> int:
    """Trials as Ray tasks, ``workers`` at a time; the driver asks, tells and prunes (the only writer)."""
    from optuna.trial import TrialState

    from affectkit.studies.engines import ray_run

    ray = engine.start()
    inflight: dict[Any, tuple[Any, dict[str, Any]]] = {}
    ran = 0
    try:
        board = _board(ray)
        task = ray.remote(ray_run)
        box = [ray.put(Path(data).read_bytes())]
        opts = engine.resources(ray, sweep.base)
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1) // max(opts["num_cpus"], 1)))
        trials: dict[str, Any] = {}
        while inflight or counted(study) < sweep.trials:
            while len(inflight) < workers and counted(study) < sweep.trials:
                trial, job = _new_job(sweep, study, data, out, sha)
                ref = task.options(**opts).remote(job, box, opts["num_cpus"], board)
                inflight[ref] = (trial, job)
                trials[job["variant"]] = trial
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=0.2)
            for key, epoch, score in ray.get(board.drain.remote()):
                trial = trials[key]
                trial.report(score, epoch)
                board.decide.remote(key, epoch, bool(trial.should_prune()))
            for ref in done:
                trial, job = inflight.pop(ref)
                try:
                    outcome, archive = ray.get(ref)
                except Exception as exc:  # retries spent: the trial's worker or node kept dying
                    outcome, archive = RunOutcome(job["variant"], job["seed"], False, 0.0,
                                                  f"ray task lost ({type(exc).__name__})"), None
                if archive is not None:
                    install_folder(archive, Path(job["run_dir"]))
                _tell(study, trial, outcome, sweep.select)
                announce(trial, outcome)
                ran += 1
    except BaseException:  # Ctrl-C: cancel the trials in flight; they rerun next time, uncounted
        for ref, (trial, _) in inflight.items():
            ray.cancel(ref, force=True)
            study.tell(trial, state=TrialState.FAIL)
        raise
    finally:
        engine.stop()
    return ran


# ----------------------------------------------------------------------------- outputs


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, dev value, epochs, seconds, then every parameter."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "best_epoch": t.user_attrs.get("best_epoch"), "epochs": t.user_attrs.get("epochs"),
                     "seconds": t.user_attrs.get("seconds"), "error": t.user_attrs.get("error", ""),
                     "base": bool(t.user_attrs.get("base")),
                     **{f"param_{k}": v for k, v in t.params.items()}})
    return rows


def write_trials_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols or ["number", "state", "value"])
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if row.get(k) is None else row.get(k) for k in cols})


def write_sweep_plots(study: Any, out: Path, select: str = "") -> list[str]:
    """Optuna's optimisation-history and parameter-importance plots (matplotlib, Agg); notes on any skipped.
    Optuna's plots set a global style: it is undone afterwards (``rc_context``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    notes = []
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, draw in (("history.png", lambda: ovm.plot_optimization_history(study)),
                           ("importance.png", lambda: ovm.plot_param_importances(
                               study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)))):
            try:
                ax = draw()
                if name == "history.png" and select:
                    ax.set_ylabel(f"dev {select}")
                fig = ax.figure
                fig.set_size_inches(8, 4.5)
                fig.tight_layout()
                fig.savefig(out / name, dpi=100)
                plt.close(fig)
            except (ValueError, RuntimeError) as exc:  # e.g. importance needs two finished trials
                notes.append(f"{name} not drawn: {str(exc).splitlines()[0]}")
    return notes


def evaluate_best_once(study: Any, out: Path, data: str | Path, sha: str) -> dict[str, Any]:
    """The best trial's checkpoint on the test split, evaluated once: kept in ``test.json`` and reused while
    the best trial and the data are the same; a later better trial gets its own single evaluation."""
    from affectkit import evaluate as ev

    best = study.best_trial
    path = out / "test.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if old.get("trial") == best.number and old.get("data_sha256") == sha:
            return old["test"]
    test = ev.evaluate_checkpoint(_trial_dir(out, best.number) / "best.pt", data, ["test"])["test"]
    from affectkit.train import json_safe

    path.write_text(json.dumps(json_safe({"trial": best.number, "data_sha256": sha, "test": test,
                                          "evaluated": datetime.now().isoformat(timespec="seconds")}), indent=2))
    return test


def best_preset(sweep: Sweep, params: dict[str, Any], header: str) -> str:
    """The best trial as a ready preset: the base config with the best parameters, with a comment header."""
    raw = apply_overrides(sweep.base, {**params, "name": f"{sweep.name}_best"})
    raw.pop("out_dir", None)
    text = dump_yaml(config_from_dict(raw))
    return "".join(f"# {line}\n" for line in header.splitlines()) + text


def sweep_summary(sweep: Sweep, study: Any, rows: list[dict[str, Any]], test: dict[str, Any], data_line: str,
                  command: str, notes: Sequence[str]) -> str:
    """summary.md: the data, the command, trials by state, the best trial and its single test evaluation."""
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    best = study.best_trial
    lines = [f"# Sweep `{sweep.name}`", "",
             f"- Data: {data_line}",
             f"- Command: `{command}`",
             f"- Objective: dev {sweep.select} of each trial's selected epoch ({sweep.direction}); TPE sampler "
             f"(seed {sweep.seed}); pruner {sweep.pruner.get('kind', 'median')}. Trials never see the test "
             "split (their test split is the dev split); the best trial's checkpoint is evaluated on test once.",
             "- Trials: " + ", ".join(f"{n} {s.lower()}" for s, n in states.items()),
             f"- Written {datetime.now():%Y-%m-%d %H:%M} by affectkit {__version__}.", "",
             f"## Best trial: {best.number}", "",
             f"dev {sweep.select} {best.value:.4f} (epoch {best.user_attrs.get('best_epoch')}); "
             "preset: `best.yaml`." + _base_line(rows, best.value, sweep.select), "",
             "| parameter | value |", "|---|---|"]
    lines += [f"| `{k}` | {v!r} |" for k, v in best.params.items()]
    shown = {k: v for k, v in test.items() if isinstance(v, float) and k != "loss"}
    lines += ["", "Test, evaluated once:", "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown),
              "| " + " | ".join(f"{v:.4f}" for v in shown.values()) + " |", "",
              "## Top trials (dev)", "",
              "| trial | dev " + sweep.select + " | epochs | " + " | ".join(f"`{p.key}`" for p in sweep.params) + " |",
              "|---|---|---|" + "---|" * len(sweep.params)]
    done = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: r["value"],
                  reverse=sweep.direction == "maximize")
    for r in done[:10]:
        vals = [r.get(f"param_{p.key}") for p in sweep.params]
        mark = " (base preset)" if r.get("base") else ""
        lines.append(f"| {r['number']}{mark} | {r['value']:.4f} | {r['epochs']} | "
                     + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in vals) + " |")
    lines += ["", "Plots: `history.png` (optimisation history), `importance.png` (fANOVA parameter importance). "
              "All trials: `trials.csv`.", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def _base_line(rows: list[dict[str, Any]], best: float, select: str) -> str:
    base = next((r for r in rows if r.get("base") and r["state"] == "COMPLETE"), None)
    if base is None:
        return ""
    return (f" The base preset's own values (trial {base['number']}, same budget): dev {select} "
            f"{base['value']:.4f}; best − base = {best - base['value']:+.4f} on dev.")


def sweep_command(path: str | Path, data: str | Path | None, trials: int | None, out: str | Path | None,
                  overrides: Sequence[str] | None, engine: str, address: str | None) -> str:
    parts = ["affectkit", "sweep", str(path)]
    if data is not None:
        parts += ["--data", str(data)]
    if trials is not None:
        parts += ["--trials", str(trials)]
    return command_line(parts, overrides, engine, address, out)


def run_sweep(path: str | Path, data: str | Path | None = None, trials: int | None = None,
              out: str | Path | None = None, storage: str | None = None, overrides: Sequence[str] | None = None,
              engine: str = "local", address: str | None = None, workers: int | None = None,
              threads: int | None = None, progress: bool = True, command: str | None = None) -> SweepResult:
    """Run the sweep's missing trials (resuming its storage), then write its tables, plots and best preset,
    and evaluate the best trial on test once."""
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
        raise ConfigError("--workers > 1 needs --engine ray (or run the same command in several shells: "
                          "they share the SQLite storage)")
    out.mkdir(parents=True, exist_ok=True)
    sha = file_sha256(data)
    storage = storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
    study = open_study(sweep, storage, sha)
    stale = fail_stale(study)
    if stale:
        log.warning("%d trial(s) of an interrupted run marked failed; they are run again", stale)
    start = time.perf_counter()

    def announce(trial: Any, o: RunOutcome) -> None:
        if progress:
            state = "pruned" if o.pruned else ("ok" if o.ok else f"FAILED ({o.error})")
            value = (o.metrics.get("valid") or {}).get(sweep.select) if o.ok else None
            print(f"trial {trial.number}: {state}" + (f", dev {sweep.select} {value:.4f}" if value is not None else "")
                  + f" ({o.seconds:.0f}s; {counted(study)}/{sweep.trials}, {time.perf_counter() - start:.0f}s)",
                  flush=True)

    if engine == "ray":
        ran = _run_ray(sweep, study, data, out, sha, RayEngine(address, threads), workers, announce)
    else:
        ran = _run_local(sweep, study, data, out, sha, threads, announce)

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


def read_trials(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``trials.csv`` as strings (for comparisons and reports)."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


__all__ = ["Param", "Sweep", "SweepResult", "load_sweep", "read_trials", "run_sweep"]
