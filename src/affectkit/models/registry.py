"""The model registry: the only list of models. ``@register_model`` maps a name to a class + config dataclass.

A model class is built as ``cls(config, info)`` where ``config`` is its own dataclass (filled from the run
config's ``model`` section) and ``info`` holds what was read from the data file (feature dims, classes, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from affectkit.config import check_field_types
from affectkit.errors import ConfigError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cls: type[nn.Module]
    config_cls: type
    task: str
    doc: str


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, config_cls: type, task: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register ``cls`` under ``name`` for ``task`` ("mosi" or "conversation")."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MODELS and _MODELS[name].cls is not cls:
            raise ValueError(f"model name {name!r} registered twice")
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _MODELS[name] = ModelEntry(name, cls, config_cls, task, doc)
        return cls

    return wrap


def check_modalities(modalities: list[str], valid: tuple[str, ...]) -> None:
    """A model's ``modalities`` must be a non-empty subset of ``valid`` without repeats."""
    mods = list(modalities)
    if not mods or len(set(mods)) != len(mods) or any(m not in valid for m in mods):
        raise ConfigError(f"model.modalities must be a non-empty subset of {list(valid)} without repeats, got {mods}")


def model_names(task: str | None = None) -> list[str]:
    return sorted(n for n, e in _MODELS.items() if task is None or e.task == task)


def get_model_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(model_names())}")
    return _MODELS[name]


def legacy_defaults(name: str) -> dict[str, Any]:
    """The values runs and checkpoints of model ``name`` had before each of its later config fields existed
    (its config's ``LEGACY_DEFAULTS``; empty when it declares none)."""
    return dict(getattr(get_model_entry(name).config_cls, "LEGACY_DEFAULTS", {}))


def model_config(name: str, params: dict[str, Any]) -> Any:
    """The model's config dataclass filled from ``params``; unknown keys list the valid ones."""
    entry = get_model_entry(name)
    valid = [f.name for f in dataclasses.fields(entry.config_cls)]
    for key in params:
        if key not in valid:
            raise ConfigError(f"unknown key model.{key} for model {name!r}; valid: {', '.join(valid)}")
    try:
        cfg = entry.config_cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {name!r}: {exc}") from None
    check_field_types("model", cfg)
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()
    return cfg


def build_model(name: str, params: dict[str, Any], info: dict[str, Any]) -> nn.Module:
    """Build a registered model from its name, its config fields and the data's info (dims, classes)."""
    entry = get_model_entry(name)
    return entry.cls(model_config(name, params), info)
