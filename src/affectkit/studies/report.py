"""A study's report: one row per finished run (``results.csv``), the paired statistics over seeds
(``summary.md``) and PNG plots. Every engine ends here: the tables are built from the run folders alone.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from affectkit import __version__
from affectkit.config import config_from_dict
from affectkit.data.provenance import describe_marker, file_sha256, read_marker
from affectkit.metrics import LOWER_IS_BETTER, format_number
from affectkit.studies.spec import Study, run_dir

#: The file each run folder gets beside the trainer's: the sha256 of the data file the run trained on.
PROVENANCE_FILE = "provenance.json"
#: Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30.
T975: tuple[float, ...] = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)


def run_provenance(folder: Path) -> dict[str, Any] | None:
    """A run folder's ``provenance.json`` (the sha256 of the data it trained on), or None if absent/unreadable."""
    try:
        prov = json.loads((Path(folder) / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return prov if isinstance(prov, dict) else None


def collect_results(study: Study, out: Path,
                    data_sha256: str | Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per finished run (variant order, then seed): epoch, valid_* and test_* metrics, time, size and
    the sha256 of the data file it trained on. With ``data_sha256`` (one sha256, or one per variant), a run
    trained on other content (a file regenerated at the same path) is left out: it can never mix into the
    table."""
    rows = []
    for variant in study.variants:
        want = data_sha256.get(variant) if isinstance(data_sha256, Mapping) else data_sha256
        for seed in study.seeds:
            folder = run_dir(out, variant, seed)
            prov = run_provenance(folder)
            sha = (prov or {}).get("data_sha256")
            if want is not None and sha != want:
                continue
            try:
                m = json.loads((folder / "metrics.json").read_text())
            except (OSError, ValueError):
                continue
            row: dict[str, Any] = {"variant": variant, "seed": seed, "best_epoch": m.get("best_epoch"),
                                   "epochs_run": m.get("epochs_run"), "max_epochs": m.get("max_epochs")}
            for split in ("valid", "test"):
                for k, v in (m.get(split) or {}).items():
                    if isinstance(v, int | float) or v is None:
                        row[f"{split}_{k}"] = v
            row.update(train_seconds=m.get("train_seconds"), n_params=m.get("n_params"), data_sha256=sha,
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
                if k in ("variant", "data_sha256"):
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


def per_seed(rows: list[dict[str, Any]], variant: str, key: str) -> dict[int, float]:
    """``{seed: row[key]}`` of one variant's rows that have the key (non-finite values are kept: the
    statistics skip them)."""
    return {int(r["seed"]): r[key] for r in rows if r["variant"] == variant and r.get(key) is not None}


def _variants_in(rows: list[dict[str, Any]], baseline: str, order: Sequence[str] | None = None) -> list[str]:
    seen = list(dict.fromkeys([baseline, *(order or []), *(r["variant"] for r in rows)]))
    present = {r["variant"] for r in rows}
    return [v for v in seen if v in present]


def describe_data(path: str | Path, sha256: str | None = None) -> str:
    """The data line of a summary: file name, size, sha256 and, for a file our generators made, the command
    and seed from the marker inside it (read, never guessed from the name), so a table can never be mistaken
    for one computed on another file or on real data."""
    p = Path(path)
    sha = sha256 or file_sha256(p)
    text = f"`{p.name}` ({p.stat().st_size / 1e6:.1f} MB, sha256 {sha[:12]})"
    words = describe_marker(read_marker(p))
    return f"{text}: {words}, not real data" if words else text


def last_epoch_runs(rows: list[dict[str, Any]]) -> list[str]:
    """``variant/seedN`` of every run that selected its last allowed epoch (it may not have converged)."""
    return [f"{r['variant']}/seed{r['seed']}" for r in rows
            if r.get("max_epochs") and r.get("best_epoch") is not None
            and int(r["best_epoch"]) >= int(r["max_epochs"])]


def stopping_line(rows: list[dict[str, Any]]) -> str:
    """How the runs ended: epochs allowed and run, early stops, and a flag on any run that selected its last
    allowed epoch (measured before convergence)."""
    known = [r for r in rows if r.get("max_epochs") and r.get("epochs_run")]
    if not known:
        return "- Epochs: not recorded (runs from before early stopping)."
    caps = sorted({int(r["max_epochs"]) for r in known})
    early = sum(1 for r in known if int(r["epochs_run"]) < int(r["max_epochs"]))
    line = (f"- Epochs: at most {'/'.join(map(str, caps))}; {early} of {len(known)} runs stopped early "
            "(train.patience).")
    flagged = last_epoch_runs(known)
    if flagged:
        line += (f" **Selected their last allowed epoch (may not have converged): {', '.join(flagged)}.**")
    else:
        line += " No run selected its last allowed epoch."
    return line


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
             stopping_line(rows),
             f"- Written {datetime.now():%Y-%m-%d %H:%M} by affectkit {__version__}.", "",
             "## Test metrics: mean ± std over seeds", "",
             f"↓ = lower is better. n = seeds finished. valid {select} is the selection metric. "
             "The test loss is in results.csv only (variants may train on different losses).", ""]
    head = ["variant", "n", *[f"{m}{arrow[m]}" for m in metrics], f"valid {select}", "epoch (best / run)",
            "train s", "params"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        cells = [f"**{v}**" if v == baseline else v, str(len(per_seed(rows, v, "seed")))]
        for m in metrics:
            mean, std, _ = mean_std(per_seed(rows, v, f"test_{m}").values())
            cells.append(f"{format_number(mean)} ± {format_number(std)}")
        mean, std, _ = mean_std(per_seed(rows, v, f"valid_{select}").values())
        cells.append(f"{format_number(mean)} ± {format_number(std)}")
        best = mean_std(per_seed(rows, v, "best_epoch").values())[0]
        ran = mean_std(per_seed(rows, v, "epochs_run").values())[0]
        cells.append(" / ".join(f"{x:.1f}" if math.isfinite(x) else "n/a" for x in (best, ran)))
        secs = mean_std(per_seed(rows, v, "train_seconds").values())[0]
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
            d = paired_difference(per_seed(rows, baseline, f"test_{m}"), per_seed(rows, v, f"test_{m}"))
            n = max(n, d.n)
            if d.n == 0:
                cells.append("n/a")
            elif d.n == 1:
                cells.append(format_number(d.mean, True))
            else:
                cells.append(f"{format_number(d.mean, True)} [{format_number(d.lo, True)}, {format_number(d.hi, True)}]"
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


def data_line(files: str | Path | Mapping[str, str | Path],
              data_sha256: str | Mapping[str, str] | None = None) -> str:
    """The summary's data line: one file, or, when variants train on different files, each file with the
    variants that use it."""
    if not isinstance(files, Mapping):
        return describe_data(files, data_sha256 if isinstance(data_sha256, str) else None)
    shas = data_sha256 if isinstance(data_sha256, Mapping) else {}
    users: dict[str, list[str]] = {}
    for v, f in files.items():
        users.setdefault(str(f), []).append(v)
    if len(users) == 1:
        return describe_data(next(iter(users)), shas.get(next(iter(files))))
    return "; ".join(f"{', '.join(vs)}: {describe_data(f, shas.get(vs[0]))}" for f, vs in users.items())


def write_outputs(study: Study, rows: list[dict[str, Any]], out: Path, data: str | Path | Mapping[str, str | Path],
                  command: str, data_sha256: str | Mapping[str, str] | None = None) -> None:
    """results.csv, summary.md and the plots of whatever runs are finished (every engine's one report path).
    ``data`` is the study's data file or, with per-variant files, ``{variant: file}``."""
    write_results_csv(rows, out / "results.csv")
    missing = [f"{v}/seed{s}" for s in study.seeds for v in study.variants
               if not any(r["variant"] == v and r["seed"] == s for r in rows)]
    from affectkit.tasks import get_task

    base_cfg = config_from_dict(study.variants[study.baseline].raw)
    select = base_cfg.train.select or get_task(base_cfg.data.task).default_select
    text = summary_markdown(rows, study.baseline, data_line(data, data_sha256), command, study.name,
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
        stats = [mean_std(per_seed(rows, v, f"test_{m}").values()) for v in variants]
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
            base = per_seed(rows, baseline, f"test_{m}")
            diffs = [paired_difference(base, per_seed(rows, v, f"test_{m}")) for v in others]
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

