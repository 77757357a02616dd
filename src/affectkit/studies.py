"""Ablation studies: named variants (config overrides over a base preset) x seeds, each run by the one
trainer, resumable and in parallel worker processes; then ``results.csv``, ``summary.md`` and PNG plots.

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

Each run writes ``OUT/runs/<variant>/seed<k>/`` (the trainer's folder: ``config.yaml``, ``metrics.json``,
``best.pt``); a run whose ``metrics.json`` exists for the same config is skipped, so an interrupted study
resumes without losing finished runs. The summary compares every variant with the baseline *paired by seed*:
the mean of the per-seed differences with a 95% Student-t interval.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shlex
import shutil
import signal
import time
import traceback
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from affectkit import __version__
from affectkit.config import RunConfig, apply_overrides, config_from_dict, read_mapping, read_yaml
from affectkit.errors import ConfigError
from affectkit.metrics import LOWER_IS_BETTER

log = logging.getLogger("affectkit")

DEFAULT_SEEDS: tuple[int, ...] = (42, 43, 44, 45, 46)  # the lab's seed 42 and the next four
#: Settings that do not change a run's result: a finished run stays valid when only these differ.
_NO_EFFECT_KEYS = frozenset({"name", "out_dir", "train.progress", "train.tensorboard", "train.graph",
                             "train.num_threads"})
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
#: Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30.
T975: tuple[float, ...] = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)


# ----------------------------------------------------------------------------- the study file


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

    def run_config(self, variant: str, seed: int, data: str | Path | None, out: Path) -> RunConfig:
        """The checked run config of one (variant, seed): the variant's config, the seed, the study's data."""
        raw = apply_overrides(self.variants[variant].raw, {
            "name": f"{self.name}-{variant}-seed{seed}", "out_dir": str(out), "train.seed": seed,
            "train.progress": False,
        })
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


# ----------------------------------------------------------------------------- running


@dataclass
class RunOutcome:
    """What became of one (variant, seed) in this invocation."""

    variant: str
    seed: int
    ok: bool
    seconds: float
    error: str = ""


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


def run_dir(out: Path, variant: str, seed: int) -> Path:
    """The folder of one run: ``OUT/runs/<variant>/seed<k>``."""
    return Path(out) / "runs" / variant / f"seed{seed}"


def is_done(folder: Path, cfg: RunConfig) -> bool:
    """A finished run of the same config: ``metrics.json`` readable, ``config.yaml`` equal on every key both
    hold (except settings without effect on the result, e.g. the progress bar)."""
    try:
        json.loads((folder / "metrics.json").read_text())
        stored = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return False
    old, new = flatten_overrides(stored), flatten_overrides(cfg.to_dict())
    changed = [k for k in old.keys() & new.keys() if k not in _NO_EFFECT_KEYS and old[k] != new[k]]
    if changed:
        log.warning("%s: config changed since it ran (%s); running it again", folder,
                    ", ".join(sorted(changed)))
    return not changed


_DATA_CACHE: dict[tuple[Any, ...], Any] = {}


def _load_data(cfg: RunConfig, path: str) -> Any:
    """The data for a run, kept between the runs of one process (one file and modality set at a time)."""
    from affectkit.models.registry import model_config
    from affectkit.tasks import get_task

    task = get_task(cfg.data.task)
    mcfg = model_config(cfg.model_name, cfg.model_params)
    p = Path(path)
    key = (task.name, str(p.resolve()), p.stat().st_mtime_ns, repr(getattr(mcfg, "modalities", None)),
           repr(cfg.data.classes))
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = task.load(p, mcfg, cfg.data)
    return _DATA_CACHE[key]


def _run_job(job: dict[str, Any]) -> RunOutcome:
    """Train one (variant, seed) into its folder; any exception becomes a failed outcome (and error.txt)."""
    import affectkit.train as trainer

    start = time.perf_counter()
    folder = Path(job["run_dir"])
    try:
        cfg = config_from_dict(job["config"])
        if folder.exists():  # a run interrupted earlier: start clean
            shutil.rmtree(folder)
        data = _load_data(cfg, str(cfg.data.path))
        trainer.train(cfg, data_path=cfg.data.path, run_dir=folder, data=data)
        return RunOutcome(job["variant"], job["seed"], True, time.perf_counter() - start)
    except Exception as exc:  # one failed run must not stop the study
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "error.txt").write_text(traceback.format_exc())
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return RunOutcome(job["variant"], job["seed"], False, time.perf_counter() - start, msg)


def _init_worker(threads: int) -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    torch.set_num_threads(threads)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued runs and end the running ones (their folders lack metrics.json: they rerun)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.join(timeout=10)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def study_command(path: str | Path, data: str | Path | None, seeds: Sequence[int] | None, workers: int,
                  out: str | Path | None, overrides: Sequence[str] | None = None) -> str:
    """The ``affectkit study`` command line that runs this study (written into the summary)."""
    parts = ["affectkit", "study", str(path)]
    if data is not None:
        parts += ["--data", str(data)]
    if seeds:
        parts += ["--seeds", *map(str, seeds)]
    for o in overrides or []:
        parts += ["--set", o]
    if workers != 1:
        parts += ["--workers", str(workers)]
    if out is not None:
        parts += ["--out", str(out)]
    return shlex.join(parts)


def run_study(path: str | Path, data: str | Path | None = None, seeds: Sequence[int] | None = None,
              workers: int = 1, out: str | Path | None = None, overrides: Sequence[str] | None = None,
              command: str | None = None, progress: bool = True, threads: int | None = None) -> StudyResult:
    """Run every (variant, seed) not done yet with the one trainer, then write results.csv, summary.md, plots.

    ``workers > 1`` trains in that many spawned processes with ``threads`` torch threads each (default
    ``cores // workers``); the parent keeps one progress bar. A run that raises is reported (and its
    ``error.txt`` written); the others go on. ``data`` defaults to the base preset's ``data.path``;
    ``overrides`` apply to every run.
    """
    import torch
    from tqdm import tqdm

    study = load_study(path, seeds, overrides)
    command = command or study_command(path, data, seeds, workers, out, overrides)
    out = Path(out) if out is not None else Path("studies") / study.name
    if data is None:
        data = study.variants[study.baseline].raw.get("data", {}).get("path")
        if data is None:
            raise ConfigError("no data file: pass --data PATH (or set data.path in the base preset)")
    if not Path(data).is_file():
        raise ConfigError(f"{data}: data file not found")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    out.mkdir(parents=True, exist_ok=True)

    jobs, skipped = [], 0
    for seed in study.seeds:  # seed-major: an interrupted study holds paired results for every variant
        for variant in study.variants:
            cfg = study.run_config(variant, seed, data, out)
            folder = run_dir(out, variant, seed)
            if is_done(folder, cfg):
                skipped += 1
                continue
            jobs.append({"variant": variant, "seed": seed, "config": cfg.to_dict(), "run_dir": str(folder)})
    total = skipped + len(jobs)
    workers = max(1, min(workers, len(jobs)))
    threads = threads or max(1, available_cores() // workers)
    outcomes: list[RunOutcome] = []
    bar = tqdm(total=total, initial=skipped, desc=f"study {study.name}", unit="run", disable=not progress)

    def record(o: RunOutcome) -> None:
        outcomes.append(o)
        bar.update(1)
        if o.ok:
            bar.set_postfix_str(f"{o.variant} seed {o.seed} {o.seconds:.0f}s")
        else:
            where = run_dir(out, o.variant, o.seed) / "error.txt"
            bar.write(f"FAILED {o.variant} seed {o.seed}: {o.error} (see {where})")

    try:
        if jobs and workers == 1:
            before, level = torch.get_num_threads(), log.level
            torch.set_num_threads(threads)
            log.setLevel(logging.WARNING)  # the study's bar replaces the per-epoch log lines
            try:
                for job in jobs:
                    record(_run_job(job))
            finally:
                torch.set_num_threads(before)
                log.setLevel(level)
        elif jobs:
            ctx = mp.get_context("spawn")  # fresh interpreters: no forked OpenMP/torch thread state
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,))
            try:
                futures = {pool.submit(_run_job, job): job for job in jobs}
                for fut in as_completed(futures):
                    job = futures[fut]
                    try:
                        record(fut.result())
                    except Exception as exc:  # a worker process died (killed, out of memory): no hang
                        record(RunOutcome(job["variant"], job["seed"], False, 0.0,
                                          f"worker process died ({type(exc).__name__})"))
            except BaseException:  # Ctrl-C: stop now; finished runs are kept, the cut ones rerun next time
                _stop(pool)
                raise
            pool.shutdown()
    finally:
        bar.close()
    rows = collect_results(study, out)
    write_outputs(study, rows, out, data, command)
    return StudyResult(out, rows, outcomes, skipped, total)


# ----------------------------------------------------------------------------- results


def collect_results(study: Study, out: Path) -> list[dict[str, Any]]:
    """One row per finished run (variant order, then seed): epoch, valid_* and test_* metrics, time, size."""
    rows = []
    for variant in study.variants:
        for seed in study.seeds:
            f = run_dir(out, variant, seed) / "metrics.json"
            if not f.is_file():
                continue
            m = json.loads(f.read_text())
            row: dict[str, Any] = {"variant": variant, "seed": seed, "best_epoch": m.get("best_epoch"),
                                   "epochs_run": m.get("epochs_run"), "max_epochs": m.get("max_epochs")}
            for split in ("valid", "test"):
                for k, v in (m.get(split) or {}).items():
                    if isinstance(v, int | float) or v is None:
                        row[f"{split}_{k}"] = v
            row.update(train_seconds=m.get("train_seconds"), n_params=m.get("n_params"),
                       history=m.get("history") or [])
            rows.append(row)
    return rows


def write_results_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``results.csv``: one row per run; columns in first-seen order (history left out)."""
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k != "history" and k not in cols]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols or ["variant", "seed"], extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})


def read_results_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.csv``, numbers parsed (empty cells -> None)."""
    rows = []
    with Path(path).open(newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                if k == "variant":
                    row[k] = v
                elif v is None or v == "":
                    row[k] = None
                else:
                    try:
                        row[k] = int(v) if re.fullmatch(r"-?\d+", v) else float(v)
                    except ValueError:
                        row[k] = v
            rows.append(row)
    return rows


def t975(df: int) -> float:
    """Two-sided 95% Student-t quantile; the table for df <= 30, a Cornish-Fisher expansion above."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (n-1; NaN for one value) and count of the finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


@dataclass
class Paired:
    """Mean of per-seed differences (variant - baseline) with its 95% t interval (NaN bounds when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.lo > 0 or self.hi < 0)


def paired_difference(base: dict[int, float], other: dict[int, float]) -> Paired:
    """Differences ``other[s] - base[s]`` over the seeds both have; mean +- t(0.975, n-1) * sd / sqrt(n)."""
    seeds = sorted(base.keys() & other.keys())
    diffs = [other[s] - base[s] for s in seeds if _finite(base[s]) and _finite(other[s])]
    mean, sd, n = mean_std(diffs)
    if n < 2:
        return Paired(mean, math.nan, math.nan, n)
    half = t975(n - 1) * sd / math.sqrt(n)
    return Paired(mean, mean - half, mean + half, n)


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(float(x))


def _metric_names(rows: list[dict[str, Any]], split: str) -> list[str]:
    names: list[str] = []
    prefix = f"{split}_"
    for row in rows:
        names += [k[len(prefix):] for k in row if k.startswith(prefix) and k[len(prefix):] not in names]
    return names


def _compared_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """Test metrics the summary compares; the test loss is left out (variants may train on different losses)."""
    return [m for m in _metric_names(rows, "test") if m != "loss"]


def _per_seed(rows: list[dict[str, Any]], variant: str, key: str) -> dict[int, float]:
    return {int(r["seed"]): r[key] for r in rows if r["variant"] == variant and r.get(key) is not None}


def _variants_in(rows: list[dict[str, Any]], baseline: str, order: Sequence[str] | None = None) -> list[str]:
    seen = list(dict.fromkeys([baseline, *(order or []), *(r["variant"] for r in rows)]))
    present = {r["variant"] for r in rows}
    return [v for v in seen if v in present]


def describe_data(path: str | Path) -> str:
    """The data line of a summary: file name, synthetic or not (with the generator seed when the name holds
    it), size and a short sha256, so a table can never be mistaken for one computed on another file."""
    p = Path(path)
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    text = f"`{p.name}` ({p.stat().st_size / 1e6:.1f} MB, sha256 {h.hexdigest()[:12]})"
    if "synth" in p.name.lower():
        m = re.search(r"seed[_-]?(\d+)", p.name.lower())
        seed = f"generator seed {m.group(1)}" if m else "generator seed not in the file name"
        text += f": SYNTHETIC data from `affectkit make-synthetic mosi` ({seed}), not CMU-MOSI"
    return text


def _fmt(x: float, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def summary_markdown(rows: list[dict[str, Any]], baseline: str, data_line: str, command: str,
                     study_name: str = "study", overrides: dict[str, dict[str, Any]] | None = None,
                     select: str = "Corr", order: Sequence[str] | None = None) -> str:
    """The summary: mean +- std per variant for every test metric (baseline first) and the paired
    difference of each variant to the baseline with its 95% t interval over seeds."""
    metrics = _compared_metrics(rows)
    variants = _variants_in(rows, baseline, order)
    seeds = sorted({int(r["seed"]) for r in rows})
    arrow = {m: " ↓" if m in LOWER_IS_BETTER else "" for m in metrics}
    lines = [f"# Study `{study_name}`", "",
             f"- Data: {data_line}",
             f"- Command: `{command}`",
             f"- Seeds: {', '.join(map(str, seeds))}; epoch selected on valid {select}; "
             "test evaluated once per run.",
             f"- Written {datetime.now():%Y-%m-%d %H:%M} by affectkit {__version__}.", "",
             "## Test metrics: mean ± std over seeds", "",
             f"↓ = lower is better. n = seeds finished. valid {select} is the selection metric. "
             "The test loss is in results.csv only (variants may train on different losses).", ""]
    head = ["variant", "n", *[f"{m}{arrow[m]}" for m in metrics], f"valid {select}", "train s", "params"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        cells = [f"**{v}**" if v == baseline else v, str(len(_per_seed(rows, v, "seed")))]
        for m in metrics:
            mean, std, _ = mean_std(_per_seed(rows, v, f"test_{m}").values())
            cells.append(f"{_fmt(mean)} ± {_fmt(std)}")
        mean, std, _ = mean_std(_per_seed(rows, v, f"valid_{select}").values())
        cells.append(f"{_fmt(mean)} ± {_fmt(std)}")
        secs = mean_std(_per_seed(rows, v, "train_seconds").values())[0]
        params = next((r.get("n_params") for r in rows if r["variant"] == v), None)
        cells += [f"{secs:.0f}" if math.isfinite(secs) else "n/a", str(params)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"## Difference to `{baseline}`, paired by seed: mean [95% t interval]", "",
              "Δ = variant − baseline on the same seed, averaged over the seeds both finished (n); "
              "the interval is mean ± t(0.975, n−1)·sd/√n of the per-seed differences (none for n = 1). "
              "\\* = the interval excludes 0.", ""]
    head = ["variant", "n", *[f"Δ {m}{arrow[m]}" for m in metrics]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        if v == baseline:
            continue
        cells, n = [v], 0
        for m in metrics:
            d = paired_difference(_per_seed(rows, baseline, f"test_{m}"), _per_seed(rows, v, f"test_{m}"))
            n = max(n, d.n)
            if d.n == 0:
                cells.append("n/a")
            elif d.n == 1:
                cells.append(_fmt(d.mean, True))
            else:
                cells.append(f"{_fmt(d.mean, True)} [{_fmt(d.lo, True)}, {_fmt(d.hi, True)}]"
                             + ("\\*" if d.excludes_zero else ""))
        lines.append("| " + " | ".join([cells[0], str(n), *cells[1:]]) + " |")
    if overrides is not None:
        lines += ["", "## Variants", "", "| variant | settings that differ from the base preset |", "|---|---|"]
        for v, over in overrides.items():
            text = ", ".join(f"`{k}={json.dumps(val)}`" for k, val in over.items()) or "(the base preset)"
            lines.append(f"| {v} | {text} |")
    lines += ["", "Plots: `metrics.png` (mean ± std per variant), `differences.png` (paired Δ with 95% "
              "intervals), `curves.png` (mean train/valid loss per epoch).", ""]
    return "\n".join(lines)


def write_outputs(study: Study, rows: list[dict[str, Any]], out: Path, data: str | Path,
                  command: str) -> None:
    """results.csv, summary.md and the plots of whatever runs are finished."""
    write_results_csv(rows, out / "results.csv")
    missing = [f"{v}/seed{s}" for s in study.seeds for v in study.variants
               if not any(r["variant"] == v and r["seed"] == s for r in rows)]
    from affectkit.tasks import get_task

    base_cfg = config_from_dict(study.variants[study.baseline].raw)
    select = base_cfg.train.select or get_task(base_cfg.data.task).default_select
    text = summary_markdown(rows, study.baseline, describe_data(data), command, study.name,
                            {v: s.changes for v, s in study.variants.items()}, select, list(study.variants))
    if missing:
        text += f"\nNot finished (yet): {', '.join(missing)}.\n"
    (out / "summary.md").write_text(text)
    if rows:
        write_plots(rows, study.baseline, out, list(study.variants))


# ----------------------------------------------------------------------------- plots


def write_plots(rows: list[dict[str, Any]], baseline: str, out: Path,
                order: Sequence[str] | None = None) -> list[Path]:
    """``metrics.png``, ``differences.png`` and ``curves.png`` (matplotlib's Agg canvas, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = _compared_metrics(rows)
    variants = _variants_in(rows, baseline, order)
    cols = 4
    nrows = math.ceil(len(metrics) / cols)
    colors = ["tab:orange" if v == baseline else "tab:blue" for v in variants]
    written = []

    fig = Figure(figsize=(4.2 * cols, 0.25 * len(variants) * nrows + 2.2 * nrows + 0.5))
    FigureCanvasAgg(fig)
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(nrows, cols, i + 1)
        stats = [mean_std(_per_seed(rows, v, f"test_{m}").values()) for v in variants]
        means = [s[0] for s in stats]
        stds = [0.0 if not math.isfinite(s[1]) else s[1] for s in stats]
        ax.barh(range(len(variants)), means, xerr=stds, color=colors, capsize=2)
        ax.set_yticks(range(len(variants)), variants, fontsize=7)
        ax.invert_yaxis()
        finite = [x for x in means if math.isfinite(x)]
        if finite and m not in ("loss",) and min(finite) > 0:
            lo = min(x - s for x, s in zip(finite, stds))
            ax.set_xlim(max(0.0, lo - 0.1 * (max(finite) - lo + 1e-9)), None)
        ax.set_title(f"test {m}" + (" (lower is better)" if m in LOWER_IS_BETTER else ""), fontsize=9)
    fig.suptitle("mean ± std over seeds (baseline in orange)", fontsize=10)
    fig.tight_layout()
    written.append(out / "metrics.png")
    fig.savefig(written[-1], dpi=100)

    others = [v for v in variants if v != baseline]
    if others:
        fig = Figure(figsize=(4.2 * cols, 0.25 * len(others) * nrows + 2.2 * nrows + 0.5))
        FigureCanvasAgg(fig)
        for i, m in enumerate(metrics):
            ax = fig.add_subplot(nrows, cols, i + 1)
            base = _per_seed(rows, baseline, f"test_{m}")
            diffs = [paired_difference(base, _per_seed(rows, v, f"test_{m}")) for v in others]
            for j, d in enumerate(diffs):
                if not math.isfinite(d.mean):
                    continue
                err = [[d.mean - d.lo], [d.hi - d.mean]] if d.n >= 2 else None
                ax.errorbar(d.mean, j, xerr=err, fmt="o", color="tab:red" if d.excludes_zero else "tab:gray",
                            capsize=2, ms=3)
            ax.axvline(0.0, color="black", lw=0.8)
            ax.set_yticks(range(len(others)), others, fontsize=7)
            ax.set_ylim(len(others) - 0.5, -0.5)
            ax.set_title(f"Δ test {m} vs {baseline}" + (" (lower is better)" if m in LOWER_IS_BETTER else ""),
                         fontsize=9)
        fig.suptitle("paired difference to the baseline, 95% t interval over seeds (red: excludes 0)",
                     fontsize=10)
        fig.tight_layout()
        written.append(out / "differences.png")
        fig.savefig(written[-1], dpi=100)

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    cmap = ["black" if v == baseline else f"C{i % 10}" for i, v in enumerate(variants)]
    for k, (key, title) in enumerate((("train_loss", "train loss"), ("valid_loss", "valid loss"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for color, v in zip(cmap, variants):
            hists = [r["history"] for r in rows if r["variant"] == v and r.get("history")]
            if not hists:
                continue
            epochs = max(len(h) for h in hists)
            mean = [mean_std(h[e][key] for h in hists if len(h) > e and h[e].get(key) is not None)[0]
                    for e in range(epochs)]
            ax.plot(range(1, epochs + 1), mean, label=v, color=color, lw=2.2 if v == baseline else 1.2,
                    ls="-" if (variants.index(v) // 10) % 2 == 0 else "--")  # colours repeat after ten
        ax.set_xlabel("epoch")
        ax.set_title(f"mean {title} over seeds (each variant's own loss)", fontsize=10)
    if fig.axes[-1].lines:
        fig.axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    written.append(out / "curves.png")
    fig.savefig(written[-1], dpi=100)
    return written

