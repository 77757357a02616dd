"""What a sweep leaves in its folder: ``trials.csv``, ``history.png``, ``importance.png``, ``best.yaml`` (the best
trial as a ready preset), ``test.json`` (the best trial's checkpoint evaluated on the test split once; kept while
the best trial stays the same) and ``summary.md``.  All of it is written from the study alone."""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from affectkit import __version__
from affectkit.config import apply_overrides, config_from_dict, dump_yaml
from affectkit.sweep.spec import Sweep

__all__ = ["best_preset", "evaluate_best_once", "read_trials", "sweep_summary", "trial_dir", "trial_rows",
           "write_sweep_plots", "write_trials_csv"]


def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:04d}"


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, dev value, epochs, seconds, then every parameter."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "best_epoch": t.user_attrs.get("best_epoch"), "epochs": t.user_attrs.get("epochs"),
                     "seconds": t.user_attrs.get("seconds"), "error": t.user_attrs.get("error", ""),
                     "driver": t.user_attrs.get("driver", ""),
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
    the best trial and the data are the same; a later better trial gets its own single evaluation.  Empty when
    the best trial ran under another driver (its checkpoint is in that driver's folder)."""
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
    checkpoint = trial_dir(out, best.number) / "best.pt"
    if not checkpoint.is_file():  # trained by another driver sharing the study: its folder is on that machine
        return {}
    test = ev.evaluate_checkpoint(checkpoint, data, ["test"])["test"]
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
    if shown:
        lines += ["", "Test, evaluated once:", "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown),
                  "| " + " | ".join(f"{v:.4f}" for v in shown.values()) + " |"]
    else:
        lines += ["", f"Not tested here: the best trial ran under driver {best.user_attrs.get('driver', '?')} "
                      "(another process sharing the study); the same command on that machine tests it once."]
    lines += ["", "## Top trials (dev)", "",
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


def read_trials(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``trials.csv`` as strings (for comparisons and reports)."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
