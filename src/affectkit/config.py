"""Run configuration: dataclass defaults, YAML presets merged over them, ``key=value`` overrides.

A run config has four parts: ``name``, ``data`` (task and file), ``model`` (a registered model name plus that
model's own config fields, validated by the registry) and ``train`` (the one trainer's settings).
Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from affectkit.errors import ConfigError


@dataclass
class DataConfig:
    """Which task reads which file."""

    task: str = "mosi"  # mosi (regression) | conversation (emotion recognition in conversation)
    path: str | None = None
    #: Class names in label order (classification tasks). A file whose labels fall outside this list, or
    #: whose own ``label_names`` differ, is refused; None = read the classes from the file.
    classes: list[str] | None = None


@dataclass
class TrainConfig:
    """Settings of the one trainer (every model uses it)."""

    epochs: int = 20  # the most epochs a run may take (early stopping may end it sooner)
    patience: int = 0  # early stopping: stop after this many epochs without a better dev `select`; 0 = off
    batch_size: int = 16
    eval_batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    #: None = the task's default (see ``Task.defaults``): cosine for MOSI regression, plateau for conversations.
    scheduler: str | None = None  # cosine (stepped per batch, T_max = epochs * batches) | plateau | none
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    loss: str | None = None  # mse | l1 | huber (regression); ce (classification); None = the task's default
    huber_delta: float = 1.0
    class_weights: bool = False  # inverse-frequency class weights for ce
    grad_clip: float = 0.0  # 0 = off
    fused: bool = False  # torch's fused Adam (one kernel over all parameters; CPU and CUDA)
    select: str | None = None  # validation metric that picks the epoch (never a test metric); None = task's
    seed: int = 42
    device: str = "auto"  # auto (cuda if available, else mps, else cpu) | cpu | cuda | cuda:N | mps
    amp: bool = False  # mixed precision (autocast, bf16 where supported else fp16) on cuda; off by default
    num_threads: int = 0  # 0 = torch's default
    progress: bool = True
    tensorboard: bool = True
    graph: bool = True  # write the model graph to TensorBoard


@dataclass
class RunConfig:
    """A whole run: what to train, on what, how."""

    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"name": "lstm_baseline"})
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def model_name(self) -> str:
        return str(self.model["name"])

    @property
    def model_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k != "name"}


_SECTIONS = {"data": DataConfig, "train": TrainConfig}


def _check_keys(section: str, values: dict[str, Any], cls: type) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in valid:
            raise ConfigError(f"unknown key {section}.{key}; valid: {', '.join(valid)}")


def _number(where: str, value: Any, kind: type) -> int | float:
    """``value`` as ``kind`` (int or float); also reads strings such as ``1e-3``, which YAML 1.1 leaves as text."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def check_field_types(section: str, obj: Any) -> Any:
    """Check each field of a config dataclass against the type of its default; numbers are coerced in place.

    A field whose default is None takes anything; null is refused for numbers, booleans and lists.
    """
    defaults = type(obj)()
    for f in dataclasses.fields(obj):
        default, value = getattr(defaults, f.name), getattr(obj, f.name)
        where = f"{section}.{f.name}"
        if default is None or (value is None and not isinstance(default, bool | int | float | list)):
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true/false, got {value!r}")
        elif isinstance(default, int | float):
            setattr(obj, f.name, _number(where, value, type(default)))
        elif isinstance(default, list) and not isinstance(value, list):
            raise ConfigError(f"{where} must be a list such as [a, b], got {value!r}")
    return obj


def _coerce(section: str, cls: type, values: dict[str, Any]) -> Any:
    _check_keys(section, values, cls)
    return check_field_types(section, cls(**values))


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a plain dict (a YAML file or a checkpoint), checking every key."""
    raw = copy.deepcopy(raw or {})
    raw.pop("base", None)
    _check_keys("config", raw, RunConfig)
    kwargs: dict[str, Any] = {}
    for key in ("name", "out_dir"):
        if key in raw:
            kwargs[key] = str(raw[key])
    for key, cls in _SECTIONS.items():
        section = raw.get(key) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"config section {key!r} must be a mapping, got {section!r}")
        kwargs[key] = _coerce(key, cls, section)
    model = raw.get("model") or {"name": "lstm_baseline"}
    if not isinstance(model, dict) or "name" not in model:
        raise ConfigError("config section 'model' must be a mapping with a 'name'")
    kwargs["model"] = model
    return RunConfig(**kwargs)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file that must hold a mapping; every problem is a one-line ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A preset as a dict; ``base: other.yaml`` or ``base: [a.yaml, b.yaml]`` (relative to the file, merged
    in order, later ones winning) lies underneath, so presets compose from shared groups."""
    path = Path(path)
    raw = read_mapping(path)
    if "base" in raw:
        bases = raw.pop("base")
        merged: dict[str, Any] = {}
        for base in bases if isinstance(bases, list) else [bases]:
            merged = _deep_merge(merged, read_yaml(path.parent / str(base)))
        raw = _deep_merge(merged, raw)
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.epochs=5`` -> (["train", "epochs"], 5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.epochs=5")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a config dict (from the CLI's ``--set`` or a study variant)."""
    raw = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        parts = key.split(".") if isinstance(key, str) else list(key)
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(parts)}: {part!r} is not a section")
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Preset (or the defaults) + overrides -> a checked RunConfig (model fields are checked when built)."""
    raw = read_yaml(path) if path is not None else {}
    if path is not None and "name" not in raw:
        raw["name"] = Path(path).stem
    return config_from_dict(apply_overrides(raw, overrides or []))


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
