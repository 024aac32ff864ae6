"""The Optuna side of a study: the objective (suggest, train, report, store), cross-validated trials,
samplers, pruners, study creation and resume checks, the callbacks around trials, TensorBoard tracking.
"""

from __future__ import annotations

from hpsearch.search._run import Run, open_run, run_trials, thread_share
from hpsearch.search._study import study_preprocess

__all__ = ["Run", "open_run", "run_trials", "study_preprocess", "thread_share"]
