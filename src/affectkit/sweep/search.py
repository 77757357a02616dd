"""The Optuna study of a sweep: its storage (any SQLAlchemy URL; a SQLite file by default), the sampler and pruner,
the budget, and the trials' lifecycle (ask, report, tell) with Optuna's heartbeat.

Several processes (on one machine or many) may share one study: each asks for trials, trains them and tells
their outcome through the same database.  While a trial runs, its driver records a heartbeat every
``heartbeat_s`` seconds; a trial whose heartbeat is older than ``grace_s`` (its driver was killed, its machine
lost) is failed by whichever driver looks next (``optuna.storages.fail_stale_trials``), and Optuna's
``RetryHeartbeatStaleTrialCallback`` (``RetryFailedTrialCallback`` before 4.9) queues it again with the same
parameters.  A stale trial does not use the budget.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import threading
import time
import warnings
from typing import Any

from affectkit.errors import ConfigError
from affectkit.studies.engines import RunOutcome
from affectkit.studies.run import NO_EFFECT_KEYS
from affectkit.studies.spec import flatten_overrides
from affectkit.sweep.spec import Sweep

__all__ = ["Heartbeats", "counted", "fail_stale", "open_study", "over_budget", "storage_url", "tell"]

log = logging.getLogger("affectkit")

#: How often a running trial's driver says it is alive, and how long silence means it is gone (seconds).
HEARTBEAT_S, GRACE_S = 30, 120


def optuna_module() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("sweeps need Optuna: pip install 'affectkit[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(url: str) -> str:
    """The SQLAlchemy URL Optuna opens: ``postgresql://`` and ``postgres://`` go through psycopg 3 (the driver the
    service's store uses too); other URLs as given."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S) -> Any:
    """Optuna's RDB storage at ``url`` with heartbeats, and stale trials retried once more each (up to 3 times).
    ConfigError (one line, password hidden) when the URL is malformed or the database cannot be reached."""
    optuna = optuna_module()

    if heartbeat_s < 1 or grace_s <= heartbeat_s:
        raise ConfigError(f"--heartbeat must be >= 1 s and --grace longer than it, got {heartbeat_s} and {grace_s}")
    with warnings.catch_warnings():  # heartbeat and retry are "experimental" in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _rdb_storage(optuna, url, heartbeat_s, grace_s)


def _rdb_storage(optuna: Any, url: str, heartbeat_s: int, grace_s: int) -> Any:
    import sqlalchemy

    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback  # its name before Optuna 4.9
    retry = retry_cls(max_retry=3)
    kwargs: dict[str, Any] = {"heartbeat_interval": int(heartbeat_s), "grace_period": int(grace_s)}
    for attempt in range(3):
        try:
            try:
                return optuna.storages.RDBStorage(storage_url(url), heartbeat_stale_trial_callback=retry, **kwargs)
            except TypeError:  # Optuna before 4.9 names it failed_trial_callback
                return optuna.storages.RDBStorage(storage_url(url), failed_trial_callback=retry, **kwargs)
        except sqlalchemy.exc.IntegrityError:  # two drivers created the tables at once: they exist now
            if attempt == 2:
                raise
            time.sleep(0.5 + random.random())
        except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as exc:
            shown = sqlalchemy.engine.make_url(storage_url(url)).render_as_string(hide_password=True) \
                if "://" in url else url
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise ConfigError(f"--storage {shown}: cannot open the Optuna storage ({reason})") from None
    raise AssertionError("unreachable")


def fingerprint(sweep: Sweep) -> dict[str, Any]:
    """The base settings a resumed study must share (settings that change nothing, e.g. threads, left out)."""
    return {k: v for k, v in flatten_overrides(sweep.base).items() if k not in NO_EFFECT_KEYS}


def open_study(sweep: Sweep, storage: Any, data_sha256: str, shown: str) -> Any:
    """Create or resume the study; refuse one that holds trials on other data or other base settings (``shown``:
    the storage as the error names it)."""
    optuna = optuna_module()
    p = sweep.pruner
    pruner = (optuna.pruners.NopPruner() if p.get("kind") == "none" else optuna.pruners.MedianPruner(
        n_startup_trials=int(p.get("startup_trials", 5)), n_warmup_steps=int(p.get("warmup_epochs", 3))))
    study = optuna.create_study(study_name=sweep.name, storage=storage, load_if_exists=True,
                                direction=sweep.direction, pruner=pruner,
                                sampler=optuna.samplers.TPESampler(seed=sweep.seed, constant_liar=True,
                                                                   n_startup_trials=sweep.random_trials))
    base = fingerprint(sweep)
    for key, value in (("data_sha256", data_sha256), ("base", json.dumps(base, sort_keys=True, default=str))):
        old = study.user_attrs.get(key)
        if old is None:
            study.set_user_attr(key, value)
            continue
        if key == "base":  # a study made before threads stopped counting: compare without them
            old = json.dumps({k: v for k, v in json.loads(old).items() if k not in NO_EFFECT_KEYS}, sort_keys=True,
                             default=str)
        if old != value:
            what = f"data (sha256 {old[:12]}, now {value[:12]})" if key == "data_sha256" else "base settings"
            raise ConfigError(f"{shown}: study {sweep.name!r} holds trials on other {what}; use a new --out")
    if sweep.include_base and not study.trials:
        values = sweep.base_values()
        if values is None:
            log.warning("the base preset's values lie outside the searched ranges: no base trial")
        else:  # the reference point: trial 0 trains the preset itself, under the same budget
            study.enqueue_trial(values, user_attrs={"base": True})
    return study


def fail_stale(study: Any) -> int:
    """Fail the running trials whose heartbeat stopped (Optuna's own check; its callback queues each again).
    Returns how many this call failed."""
    from optuna.trial import TrialState

    optuna = optuna_module()
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    gone = before - after
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return len(gone & failed)


def _uses_budget(t: Any) -> bool:
    from optuna.trial import TrialState

    if t.state == TrialState.WAITING:  # queued (the base preset, a retry): counts once a driver runs it
        return False
    return t.state != TrialState.FAIL or "error" in t.user_attrs


def counted(study: Any) -> int:
    """Trials that use the budget: finished, pruned, running, or failed by their own run (not stale, not stopped
    by Ctrl-C, not yet run)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if _uses_budget(t))


def over_budget(study: Any, number: int, budget: int) -> bool:
    """Whether trial ``number`` lies past the budget: ``budget`` trials numbered before it use it already (two
    drivers that asked at the same moment agree on which of them is one too many)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.number < number and _uses_budget(t)) >= budget


def ask(study: Any) -> Any:
    """A new trial (a queued one first), marked with the driver that runs it.  (Optuna warns that heartbeats are
    meant for ``Study.optimize``: this driver records them itself, :class:`Heartbeats`.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    trial.set_user_attr("driver", f"{socket.gethostname()}:{os.getpid()}")
    return trial


def tell(study: Any, trial: Any, outcome: RunOutcome, select: str) -> None:
    """Store a finished run's outcome: its dev value, pruned (with the epochs it ran), or failed (with why)."""
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


class Heartbeats:
    """One thread that records the heartbeat of every trial this driver runs, every ``interval`` seconds, until
    :meth:`stop` (Optuna's own thread is per trial; a driver with many trials in flight needs one)."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.trials: dict[int, None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        interval = storage.get_heartbeat_interval()
        self._thread = threading.Thread(target=self._beat, args=(float(interval),), daemon=True,
                                        name="sweep-heartbeat")
        self._thread.start()

    def add(self, trial_id: int) -> None:
        with self._lock:
            self.trials[trial_id] = None
        self.storage.record_heartbeat(trial_id)

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self.trials.pop(trial_id, None)

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with self._lock:
                ids = list(self.trials)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as exc:  # noqa: BLE001 - the database is away for a moment: try next time
                    log.warning("heartbeat of trial id %d not recorded (%s)", trial_id, type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
