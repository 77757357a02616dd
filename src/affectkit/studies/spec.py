"""The study file: named variants (config overrides over a base preset) x seeds, resolved and checked.

A study file (``configs/studies/*.yaml``)::

    name: layernorm
    base: ../mosi_lab.yaml          # the run preset the variants start from (relative to this file)
    seeds: [42, 43, 44, 45, 46]     # optional (default: these five)
    baseline: baseline              # optional (default: the first variant)
    common: {train.tensorboard: false}   # optional overrides for every run
    include: [other_study.yaml]     # optional: the variants of other study files, each with its own base
    variants:
      baseline: {}
      no_layernorm: {model.layernorm: false}
      better: {base: ../mosi_better.yaml}   # a variant may start from its own preset
      finetuned: {data.path: feats/iemocap_ft.pkl}  # a variant may train on its own data file

A variant's own ``data.path`` (relative to the directory the study runs from, like ``--data``) wins over the
study's ``--data``: one study can then compare feature files (say, frozen vs fine-tuned text vectors) with
paired seeds. Every other variant trains on the study's data file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from affectkit.config import RunConfig, apply_overrides, config_from_dict, read_mapping, read_yaml
from affectkit.errors import ConfigError

DEFAULT_SEEDS: tuple[int, ...] = (42, 43, 44, 45, 46)  # the lab's seed 42 and the next four
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

@dataclass
class Variant:
    """One arm of a study: its overrides (as written) and the full run config they give (a plain dict)."""

    name: str
    overrides: dict[str, Any]
    raw: dict[str, Any]
    changes: dict[str, Any] = field(default_factory=dict)  # settings that differ from the study's base preset


@dataclass
class Study:
    """Variants (by name, the baseline among them) x seeds; built by :func:`load_study`."""

    name: str
    variants: dict[str, Variant]
    seeds: list[int]
    baseline: str
    path: Path | None = None
    base: str = ""

    def data_for(self, variant: str, data: str | Path | None) -> str | Path | None:
        """The data file ``variant`` trains on: its own ``data.path`` when the study file gives one, else
        ``data`` (the study's ``--data``), else its preset's ``data.path``."""
        own = self.variants[variant].overrides.get("data.path")
        if own is not None:
            return str(own)
        return data if data is not None else self.variants[variant].raw.get("data", {}).get("path")

    def run_config(self, variant: str, seed: int, data: str | Path | None, out: Path) -> RunConfig:
        """The checked run config of one (variant, seed): the variant's config, the seed, its data file
        (:meth:`data_for`)."""
        raw = apply_overrides(self.variants[variant].raw, {
            "name": f"{self.name}-{variant}-seed{seed}", "out_dir": str(out), "train.seed": seed,
            "train.progress": False,
        })
        data = self.data_for(variant, data)
        if data is not None:
            raw = apply_overrides(raw, {"data.path": str(Path(data).resolve())})
        return config_from_dict(raw)


def flatten_overrides(over: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{model: {layernorm: false}}`` and ``{model.layernorm: false}`` -> ``{"model.layernorm": False}``."""
    flat: dict[str, Any] = {}
    for key, value in (over or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_overrides(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _check_variant(name: str, raw: dict[str, Any], where: str) -> None:
    """Fail at load time (not hours later) on a bad key, model name or model field."""
    from affectkit.models.registry import model_config

    if not _NAME_RE.match(name):
        raise ConfigError(f"{where}: variant name {name!r} must be letters, digits, _ . + - (a folder name)")
    try:
        cfg = config_from_dict(raw)
        model_config(cfg.model_name, cfg.model_params)
    except ConfigError as exc:
        raise ConfigError(f"{where}: variant {name!r}: {exc}") from None


def load_study(path: str | Path, seeds: Sequence[int] | None = None,
               overrides: Sequence[str] | None = None) -> Study:
    """Read a study file: every variant resolved to a full run config and checked. ``seeds`` replaces the
    file's seeds; ``overrides`` (``key=value``, e.g. ``train.epochs=2``) apply to every variant, last."""
    path = Path(path)
    raw = read_mapping(path, "study")
    valid = {"name", "base", "seeds", "baseline", "common", "variants", "include", "description"}
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise ConfigError(f"{path}: unknown study key {unknown[0]!r}; valid: {', '.join(sorted(valid))}")
    variants: dict[str, Variant] = {}
    for inc in raw.get("include") or []:
        for v in load_study(path.parent / str(inc), overrides=overrides).variants.values():
            _add_variant(variants, v, path)
    if raw.get("variants"):
        if "base" not in raw:
            raise ConfigError(f"{path}: a study with variants needs 'base: PRESET.yaml'")
        base = read_yaml(path.parent / str(raw["base"]))
        common = flatten_overrides(raw.get("common") or {})
        if not isinstance(raw["variants"], dict):
            raise ConfigError(f"{path}: 'variants' must map names to overrides")
        for name, over in raw["variants"].items():
            if over is not None and not isinstance(over, dict):
                raise ConfigError(f"{path}: variant {name!r} must be a mapping of overrides, got {over!r}")
            flat = flatten_overrides(over or {})
            own = base if "base" not in flat else read_yaml(path.parent / str(flat["base"]))  # its own preset
            rest = {k: v for k, v in flat.items() if k != "base"}
            resolved = apply_overrides(apply_overrides(own, common), rest)
            resolved = apply_overrides(resolved, list(overrides or []))
            _check_variant(str(name), resolved, str(path))
            reference = flatten_overrides(apply_overrides(apply_overrides(base, common), list(overrides or [])))
            changes = {k: v for k, v in flatten_overrides(resolved).items()
                       if k != "name" and (k not in reference or reference[k] != v)}
            _add_variant(variants, Variant(str(name), flat, resolved, changes), path)
    if not variants:
        raise ConfigError(f"{path}: no variants (give 'variants:' or 'include:')")
    baseline = str(raw.get("baseline") or next(iter(variants)))
    if baseline not in variants:
        raise ConfigError(f"{path}: baseline {baseline!r} is not a variant; variants: {', '.join(variants)}")
    seed_list = [int(s) for s in (seeds if seeds else raw.get("seeds") or DEFAULT_SEEDS)]
    if len(set(seed_list)) != len(seed_list):
        raise ConfigError(f"{path}: seeds repeat: {seed_list}")
    name = str(raw.get("name") or path.stem)
    return Study(name, variants, seed_list, baseline, path, str(raw.get("base") or ""))


def _add_variant(variants: dict[str, Variant], v: Variant, path: Path) -> None:
    if v.name in variants and variants[v.name].raw != v.raw:
        raise ConfigError(f"{path}: variant {v.name!r} is defined twice with different settings")
    variants.setdefault(v.name, v)


def run_dir(out: Path, variant: str, seed: int) -> Path:
    """The folder of one run: ``OUT/runs/<variant>/seed<k>``."""
    return Path(out) / "runs" / variant / f"seed{seed}"
