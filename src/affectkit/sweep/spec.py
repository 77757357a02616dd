"""A sweep file, read and checked: the base preset, the common overrides, the searched keys and their ranges.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affectkit.config import apply_overrides, config_from_dict, read_mapping, read_yaml
from affectkit.errors import ConfigError
from affectkit.metrics import LOWER_IS_BETTER
from affectkit.studies.spec import flatten_overrides

__all__ = ["Param", "Sweep", "load_sweep"]

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
