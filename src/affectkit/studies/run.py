"""Running a study: plan the (variant, seed) runs not done yet, hand them to an engine, write the report.

Resume is by content: a run counts as done when its folder holds ``metrics.json`` for the same config and a
``provenance.json`` naming the same data sha256 as the file given now. A file regenerated at the same path
(other content) therefore reruns every run, and its old rows never reach the table.
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from affectkit.config import RunConfig, config_from_dict
from affectkit.data.provenance import file_sha256
from affectkit.errors import ConfigError
from affectkit.studies.engines import LocalEngine, RayEngine, RunOutcome, clean_incoming
from affectkit.studies.report import collect_results, run_provenance, write_outputs
from affectkit.studies.spec import flatten_overrides, load_study, run_dir

log = logging.getLogger("affectkit")

#: Settings that do not change a run's result: a finished run stays valid when only these differ. The data
#: file is matched by its content (sha256), not its path; the device and threads are where it ran.
NO_EFFECT_KEYS = frozenset({"name", "out_dir", "train.progress", "train.tensorboard", "train.graph",
                            "train.num_threads", "train.device", "data.path"})
ENGINES = ("local", "ray")


@dataclass
class StudyResult:
    """The study folder, one row per finished run (this time or earlier), and what ran now."""

    out: Path
    rows: list[dict[str, Any]]
    ran: list[RunOutcome] = field(default_factory=list)
    skipped: int = 0
    total: int = 0

    @property
    def failures(self) -> list[RunOutcome]:
        return [r for r in self.ran if not r.ok]

    def report(self) -> str:
        """One paragraph for the command line."""
        ok = sum(r.ok for r in self.ran)
        lines = [f"{self.total} runs: {self.skipped} already done, {ok} trained now, "
                 f"{len(self.failures)} failed"]
        lines += [f"  FAILED {r.variant} seed {r.seed}: {r.error}" for r in self.failures]
        lines.append(f"results: {self.out / 'results.csv'}, {self.out / 'summary.md'}, "
                     f"plots {self.out}/*.png")
        return "\n".join(lines)


def is_done(folder: Path, cfg: RunConfig, data_sha256: str | None = None) -> bool:
    """A finished run of the same config on the same data: ``metrics.json`` readable, ``provenance.json``
    naming ``data_sha256`` (when given), ``config.yaml`` equal on every key both hold (except settings without
    effect on the result, e.g. the progress bar), and the same model as built: every field of its model
    config, defaults included (``provenance.json``'s ``model_config``; for older runs, the defaults of their
    time), so a default that changed between versions reruns the runs it affects, unless the field changes
    nothing in this model (its ``inert_fields``: P-CM's settings in a text-only CORECT)."""
    try:
        json.loads((folder / "metrics.json").read_text())
        stored = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return False
    provenance = run_provenance(folder) or {}
    if data_sha256 is not None:
        had = provenance.get("data_sha256")
        if had != data_sha256:
            log.warning("%s: trained on other data (sha256 %s, now %s); running it again", folder,
                        (had or "not recorded")[:12], data_sha256[:12])
            return False
    # Compare what the runs train with: the task's defaults filled in on both sides (a stored config is resolved).
    from affectkit.train import resolve_config

    try:
        stored = resolve_config(config_from_dict(stored))[0].to_dict()
        new_cfg = resolve_config(cfg)[0]
    except ConfigError:
        return False
    old, new = flatten_overrides(stored), flatten_overrides(new_cfg.to_dict())
    changed = [k for k in old.keys() & new.keys() if k not in NO_EFFECT_KEYS and old[k] != new[k]]
    if not changed:  # the model as built: a default that changed between versions changes the model too
        had = provenance.get("model_config")
        if had is None:  # a run from before provenance held every field: the defaults of its time
            had = full_model_config(config_from_dict(stored), legacy=True)
        else:  # fields added since it ran: what runs had before them (LEGACY_DEFAULTS), if declared
            had = {**_legacy_defaults(new_cfg.model_name), **had}
        now = full_model_config(new_cfg)
        inert = inert_model_fields(new_cfg)
        changed = [f"model.{k}" for k in sorted(had.keys() | now.keys())
                   if k not in inert and had.get(k) != now.get(k)]
    if changed:
        log.warning("%s: config changed since it ran (%s); running it again", folder,
                    ", ".join(sorted(changed)))
    return not changed


def _legacy_defaults(model_name: str) -> dict[str, Any]:
    """:func:`affectkit.models.registry.legacy_defaults`, empty for a model this version does not know."""
    from affectkit.models.registry import legacy_defaults

    try:
        return legacy_defaults(model_name)
    except ConfigError:
        return {}


def inert_model_fields(cfg: RunConfig) -> set[str]:
    """The run's model config fields that change nothing in the model as built (the config's
    ``inert_fields()``, e.g. P-CM's in a text-only CORECT); empty when it declares none or does not validate."""
    from affectkit.models.registry import model_config

    try:
        built = model_config(cfg.model_name, dict(cfg.model_params))
    except ConfigError:
        return set()
    inert = getattr(built, "inert_fields", None)
    return set(inert()) if inert is not None else set()


def full_model_config(cfg: RunConfig, legacy: bool = False) -> dict[str, Any]:
    """Every field of the run's model config (defaults filled in), as JSON reads it back. ``legacy``: fields
    the stored config lacks take the values runs had before those fields existed (the model config's
    ``LEGACY_DEFAULTS``, as for old checkpoints)."""
    import dataclasses

    from affectkit.models.registry import model_config

    params = dict(cfg.model_params)
    if legacy:
        params = {**_legacy_defaults(cfg.model_name), **params}
    try:
        return json.loads(json.dumps(dataclasses.asdict(model_config(cfg.model_name, params)), default=str))
    except ConfigError:
        return {}


def study_command(path: str | Path, data: str | Path | None, seeds: Sequence[int] | None, workers: int,
                  out: str | Path | None, overrides: Sequence[str] | None = None, engine: str = "local",
                  address: str | None = None) -> str:
    """The ``affectkit study`` command line that runs this study (written into the summary)."""
    parts = ["affectkit", "study", str(path)]
    if data is not None:
        parts += ["--data", str(data)]
    if seeds:
        parts += ["--seeds", *map(str, seeds)]
    if workers != 1:
        parts += ["--workers", str(workers)]
    return command_line(parts, overrides, engine, address, out)


def command_line(parts: list[str], overrides: Sequence[str] | None, engine: str, address: str | None,
                 out: str | Path | None) -> str:
    """``parts`` plus the options every study-like command shares, quoted for a shell."""
    for o in overrides or []:
        parts += ["--set", o]
    if engine != "local":
        parts += ["--engine", engine]
    if address:
        parts += ["--address", address]
    if out is not None:
        parts += ["--out", str(out)]
    return shlex.join(parts)


def make_engine(engine: str, workers: int = 1, threads: int | None = None, address: str | None = None,
                devices: Sequence[str] | None = None, gpus_per_run: float = 1.0) -> LocalEngine | RayEngine:
    """The engine by name: ``local`` (this process or a pool; never imports Ray) or ``ray``."""
    if engine == "local":
        if address:
            raise ConfigError("--address is for --engine ray")
        return LocalEngine(workers, threads, devices)
    if engine == "ray":
        if devices:
            raise ConfigError("--devices is for --engine local; Ray assigns GPUs to runs (train.device: cuda)")
        return RayEngine(address, threads, gpus_per_run)
    raise ConfigError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")


def run_study(path: str | Path, data: str | Path | None = None, seeds: Sequence[int] | None = None,
              workers: int = 1, out: str | Path | None = None, overrides: Sequence[str] | None = None,
              command: str | None = None, progress: bool = True, threads: int | None = None,
              engine: str = "local", address: str | None = None, devices: Sequence[str] | None = None,
              gpus_per_run: float = 1.0,
              on_record: Callable[[RunOutcome], None] | None = None) -> StudyResult:
    """Run every (variant, seed) not done yet with the one trainer, then write results.csv, summary.md, plots.

    ``engine="local"``: ``workers > 1`` trains in that many spawned processes with ``threads`` torch threads
    each (default ``cores // workers``), ``devices`` one per worker. ``engine="ray"``: every run a Ray task at
    ``address`` with ``threads`` CPUs (default 1, or the config's ``train.num_threads``). A run that raises is
    reported (and its ``error.txt`` written); the others go on. ``data`` defaults to the base preset's
    ``data.path``; a variant's own ``data.path`` wins over both; ``overrides`` apply to every run.
    ``on_record`` sees each outcome as it is recorded.
    """
    from tqdm import tqdm

    study = load_study(path, seeds, overrides)
    command = command or study_command(path, data, seeds, workers, out, overrides, engine, address)
    out = Path(out) if out is not None else Path("studies") / study.name
    files = {v: study.data_for(v, data) for v in study.variants}
    for v, f in files.items():
        if f is None:
            raise ConfigError(f"no data file for variant {v!r}: pass --data PATH (or set data.path in the "
                              "base preset or the variant)")
        if not Path(f).is_file():
            raise ConfigError(f"{f}: data file not found (variant {v!r})")
    runner = make_engine(engine, workers, threads, address, devices, gpus_per_run)
    out.mkdir(parents=True, exist_ok=True)
    clean_incoming(out)
    sha_of = {f: file_sha256(f) for f in {str(f) for f in files.values()}}
    shas = {v: sha_of[str(f)] for v, f in files.items()}

    jobs, skipped = [], 0
    for seed in study.seeds:  # seed-major: an interrupted study holds paired results for every variant
        for variant in study.variants:
            cfg = study.run_config(variant, seed, data, out)
            folder = run_dir(out, variant, seed)
            if is_done(folder, cfg, shas[variant]):
                skipped += 1
                continue
            jobs.append({"variant": variant, "seed": seed, "config": cfg.to_dict(), "run_dir": str(folder),
                         "data_sha256": shas[variant]})
    total = skipped + len(jobs)
    outcomes: list[RunOutcome] = []
    bar = tqdm(total=total, initial=skipped, desc=f"study {study.name} ({engine})", unit="run",
               disable=not progress)

    def record(o: RunOutcome) -> None:
        outcomes.append(o)
        bar.update(1)
        if o.ok:
            bar.set_postfix_str(f"{o.variant} seed {o.seed} {o.seconds:.0f}s")
        else:
            where = run_dir(out, o.variant, o.seed) / "error.txt"
            bar.write(f"FAILED {o.variant} seed {o.seed}: {o.error} (see {where})")
        if on_record is not None:
            on_record(o)

    try:
        runner.run(jobs, record)
    finally:
        bar.close()
    rows = collect_results(study, out, shas)
    write_outputs(study, rows, out, files, command, shas)
    return StudyResult(out, rows, outcomes, skipped, total)
