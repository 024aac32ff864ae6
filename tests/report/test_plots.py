"""The report's plots on studies built in memory, no training: thousands of trials sampled where lines would
choke, one complete trial skipping what needs more, importances skipped where no parameter varies.

The plots of a real trained study, counted against its storage, are in tests/report/test_report.py.
"""

from __future__ import annotations

import optuna
import pytest
from matplotlib.collections import LineCollection
from optuna.trial import TrialState, create_trial

from hpsearch.report import _plots as plots
from hpsearch.report._study import trials_table
from tests.support import SYNTHETIC_SPACE, scatter_points, synthetic_study


def test_thousands_of_trials_are_sampled_where_lines_would_choke():
    study = synthetic_study(3000)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    curves = plots.learning_curves(study)
    lines = [ln for ln in curves.axes[0].get_lines() if ln.get_label().startswith("Trial")]
    assert len(lines) == plots.MAX_CURVES
    assert "200 of 3000 trials, sampled" in curves.axes[0].get_title()
    best = max(complete, key=lambda t: t.value)
    assert f"Trial{best.number}" in {ln.get_label() for ln in lines}  # the sample keeps the best
    states = {t.number: t.state for t in study.get_trials()}  # labels are the study's numbers, not the sample's
    assert all((ln.get_linestyle() == "--") == (states[int(ln.get_label()[5:])] == TrialState.PRUNED) for ln in lines)
    coords = plots.parallel_coordinate(study)
    assert sum(len(c.get_segments()) for ax in coords.axes for c in ax.collections
               if isinstance(c, LineCollection)) == plots.MAX_LINES
    frame = trials_table(study)
    finished = len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
    assert scatter_points(plots.lr_vs_accuracy(frame)) == finished  # a scatter takes them all, PRUNED at last value
    assert scatter_points(plots.optimization_history(study)) == finished
    plots.param_importances(study)


def test_one_complete_trial_skips_what_needs_more():
    study = synthetic_study(2, pruned_every=2)  # trial 0 COMPLETE, trial 1 PRUNED
    assert scatter_points(plots.optimization_history(study)) == 2  # the PRUNED one at its last reported value
    for needs_two in (plots.param_importances, plots.parallel_coordinate):
        with pytest.raises(plots.PlotSkipped, match="at least 2 COMPLETE"):
            needs_two(study)
    lines = plots.learning_curves(study).axes[0].get_lines()
    assert sum(ln.get_linestyle() == "--" for ln in lines if ln.get_label().startswith("Trial")) == 1


def test_importances_of_parameters_that_never_vary_are_skipped():
    single = optuna.create_study(direction="maximize")
    single.add_trials([create_trial(value=0.5 + i / 10, params={"optimizer": "adam"},
                                    distributions={"optimizer": SYNTHETIC_SPACE["optimizer"]}) for i in range(3)])
    with pytest.raises(plots.PlotSkipped, match="more than one value"):
        plots.param_importances(single)
