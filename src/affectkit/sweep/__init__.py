"""Hyper-parameter sweeps: Optuna's TPE sampler over config keys, pruning on the dev metric of every epoch.

One module per job, each importing only those below it: :mod:`~affectkit.sweep.spec` (the sweep file),
:mod:`~affectkit.sweep.search` (the Optuna study: storage, heartbeat, budget, ask and tell),
:mod:`~affectkit.sweep.outputs` (tables, plots, best preset, the one test evaluation) and
:mod:`~affectkit.sweep.run` (trials executed by the studies' engines, on top).
"""

from __future__ import annotations

from affectkit.sweep.outputs import read_trials
from affectkit.sweep.run import SweepResult, run_sweep
from affectkit.sweep.spec import Param, Sweep, load_sweep

__all__ = ["Param", "Sweep", "SweepResult", "load_sweep", "read_trials", "run_sweep"]
