"""Ablation studies: named variants (config overrides over a base preset) x seeds, each run by the one
trainer, resumable, on an engine of choice; then ``results.csv``, ``summary.md`` and PNG plots.

- :mod:`~affectkit.studies.spec`: the study file (variants, seeds, baseline), resolved and checked;
- :mod:`~affectkit.studies.engines`: where runs execute: this process or a local pool (``local``, the default,
  never imports Ray), or Ray tasks on a cluster (``ray``);
- :mod:`~affectkit.studies.run`: plan what is not done yet (by config and data sha256), run, report;
- :mod:`~affectkit.studies.report`: results.csv, the paired statistics over seeds, the summary, the plots.

Each run writes ``OUT/runs/<variant>/seed<k>/`` (the trainer's folder: ``config.yaml``, ``metrics.json``,
``best.pt``, plus ``provenance.json`` with the data file's sha256); a run whose folder holds the same config
and data hash is skipped, so an interrupted study resumes without losing finished runs. The summary compares
every variant with the baseline *paired by seed*: the mean of the per-seed differences with a 95% Student-t
interval.
"""

from affectkit.studies.engines import (
    LocalEngine,
    PruneRun,
    RayEngine,
    RunOutcome,
    available_cores,
    gpus_for,
)
from affectkit.studies.report import (
    Paired,
    collect_results,
    describe_data,
    mean_std,
    paired_difference,
    read_results_csv,
    summary_markdown,
    t975,
    write_outputs,
    write_plots,
    write_results_csv,
)
from affectkit.studies.run import StudyResult, is_done, make_engine, run_study, study_command
from affectkit.studies.spec import DEFAULT_SEEDS, Study, Variant, flatten_overrides, load_study, run_dir

__all__ = [
    "DEFAULT_SEEDS", "LocalEngine", "Paired", "PruneRun", "RayEngine", "RunOutcome", "Study", "StudyResult",
    "Variant", "available_cores", "collect_results", "describe_data", "flatten_overrides", "gpus_for", "is_done",
    "load_study", "make_engine", "mean_std", "paired_difference", "read_results_csv", "run_dir", "run_study",
    "study_command", "summary_markdown", "t975", "write_outputs", "write_plots", "write_results_csv",
]
