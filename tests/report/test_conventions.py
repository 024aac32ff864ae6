"""The report says what a user relies on, one way everywhere: PRUNED trials drawn at their last reported value and
marked, importances as optuna-dashboard computes them, one ECE, 1-based epochs, one lr format, the ensemble
table's markers, no "None" axis for conditional parameters. Studies built in memory, no training.
"""

from __future__ import annotations

import re

import numpy as np
import optuna
import pytest
from matplotlib.figure import Figure
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from hpsearch import keys
from hpsearch.ensemble import ECE_BINS
from hpsearch.ensemble._candidates import Candidate
from hpsearch.ensemble._combine import ece_from
from hpsearch.ensemble._fit import build_ensemble
from hpsearch.export._write import result_json
from hpsearch.monitor import trials_frame
from hpsearch.monitor._tables import frame_table
from hpsearch.report import _plots as plots
from hpsearch.report._ensemble import comparison_table
from hpsearch.report._html import _table, _trials_table
from hpsearch.report._study import csv_bytes, trials_table
from hpsearch.store import TrialOutputs
from tests.support import SYNTHETIC_SPACE, csv_rows, drawn_texts, scatter_points, synthetic_study


def legend_texts(fig: Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_pruned_trials_are_drawn_at_their_last_reported_value_and_marked() -> None:
    # Every second trial is PRUNED after 2 epochs, and they are all RMSprop: the "Adam vs RMSprop" question
    # must show RMSprop's 6 trials where the pruner stopped them, not 0.
    study = synthetic_study(12, pruned_every=2)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert len(pruned) == 6 and {t.params["optimizer"] for t in pruned} == {"rmsprop"}
    history = plots.optimization_history(study)
    assert scatter_points(history) == 12
    assert any("PRUNED (6), at its last reported value" in t for t in legend_texts(history))
    frame = trials_table(study)
    lr = plots.lr_vs_accuracy(frame)
    assert scatter_points(lr) == 12
    assert "rmsprop (0 + 6 pruned)" in legend_texts(lr)
    drawn = {(round(x, 9), round(y, 9)) for ax in lr.axes for c in ax.collections for x, y in c.get_offsets()}
    assert all((round(t.params["lr"], 9), round(t.intermediate_values[1], 9)) in drawn for t in pruned)
    grid = " ".join(t.get_text() for t in plots.optimizer_scheduler_grid(frame).axes[0].texts)
    assert sum(int(n) for n in re.findall(r"\+(\d+) pruned", grid)) == 6
    assert [float(v) for v in frame["last_reported"][frame["state"] == "PRUNED"]] == \
        pytest.approx([t.intermediate_values[1] for t in pruned])


def test_importances_are_the_dashboards_and_say_how_many_trials() -> None:
    from optuna_dashboard._importance import get_param_importance_from_trials_cache
    from optuna_dashboard._inmemory_cache import InMemoryCache

    study = synthetic_study(30)
    dashboard = get_param_importance_from_trials_cache(InMemoryCache(), study._storage, study._study_id, 0,
                                                       study.get_trials())
    fig = plots.param_importances(study)
    (ax,) = fig.axes
    drawn = {label.get_text(): patch.get_width() for label, patch in zip(ax.get_yticklabels(), ax.patches,
                                                                         strict=True)}
    assert drawn == pytest.approx({d["name"]: d["importance"] for d in dashboard})
    assert "from 20 COMPLETE trials" in ax.get_title()


def test_the_reliability_diagram_bins_as_the_tables_ece() -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, 500)
    correct = rng.random(500) < confidence ** 2
    fig = plots.reliability_diagram([("one", confidence, correct)])
    top, bottom = fig.axes
    counts = np.array([p.get_height() for p in bottom.patches])
    hits = np.array([p.get_height() for p in top.patches])
    assert len(counts) == ECE_BINS
    (points,) = [ln for ln in top.get_lines() if ln.get_marker() == "o"]
    mean = np.asarray(points.get_xdata(), dtype=float)
    filled = counts > 0
    drawn_ece = float((counts[filled] * np.abs(hits[filled] - mean[filled])).sum() / counts.sum())
    assert drawn_ece == pytest.approx(ece_from(confidence, correct))


def test_epochs_are_1_based_and_the_best_trials_curve_is_named() -> None:
    study = synthetic_study(6)
    best = study.best_trial
    curves = plots.learning_curves(study)
    (ax,) = curves.axes
    lines = [ln for ln in ax.get_lines() if ln.get_label().startswith("Trial")]
    assert {int(min(ln.get_xdata())) for ln in lines} == {1}
    assert max(max(ln.get_xdata()) for ln in lines) == 5  # a 5-epoch trial ends at epoch 5
    assert ax.get_xlabel() == "epoch"
    assert f"best: trial {best.number} ({best.value:.4f})" in legend_texts(curves)
    (best_line,) = [ln for ln in lines if ln.get_label() == f"Trial{best.number}"]
    assert best_line.get_linewidth() > max(ln.get_linewidth() for ln in lines if ln is not best_line)
    stored = optuna.create_study(direction="maximize")
    stored.add_trial(create_trial(value=0.9, params={"lr": 1e-3}, distributions={"lr": SYNTHETIC_SPACE["lr"]},
                                  user_attrs={keys.BEST_EPOCH: 0}))  # stored 0-based: its first epoch
    assert csv_rows(csv_bytes(trials_table(stored)))[0]["best_epoch"] == "1"
    assert trials_frame(stored.get_trials())["epoch"].tolist() == [1]


def test_lr_reads_the_same_in_the_terminal_and_the_html() -> None:
    study = optuna.create_study(direction="maximize")
    study.add_trial(create_trial(value=0.9, params={"lr": 0.001048, "optimizer": "adam"},
                                 distributions={k: SYNTHETIC_SPACE[k] for k in ("lr", "optimizer")}))
    frame = trials_frame(study.get_trials())
    console = Console(record=True, width=200)
    console.print(frame_table(frame, "top"))
    assert "1.05e-03" in console.export_text()
    html = _trials_table(frame)
    assert "<td>1.05e-03</td>" in html and "0.001048" not in html


def test_the_html_ensemble_table_keeps_the_chosen_and_bound_markers() -> None:
    # Every validation sample right: T runs to its bound and is not shipped; the table says both.
    labels = torch_labels = np.array([0, 1, 2, 0, 1, 2])
    import torch

    y = torch.tensor(torch_labels)
    a = torch.nn.functional.one_hot(y, 3).float() * 1.5
    b = torch.nn.functional.one_hot(y, 3).float() * 1.0
    candidates = [Candidate(1, {}, 1.0, "a", TrialOutputs(a, a, "s" * 64, y, y)),
                  Candidate(2, {}, 1.0, "b", TrialOutputs(b, b, "s" * 64, y, y))]
    result = build_ensemble(candidates, arch="resnet18", method="soft")
    html = _table(comparison_table(result_json(result, "s", ["a", "b", "c"])))
    assert "uniform soft voting [chosen]" in html
    assert re.search(r"<td>1 \(fit 0\.0\d+: bound\)</td>", html)
    assert len(labels) == 6


def test_the_parallel_coordinate_draws_no_none_for_conditional_parameters() -> None:
    space = {"lr": SYNTHETIC_SPACE["lr"], "scheduler": CategoricalDistribution(["step", "plateau"]),
             "step_size": IntDistribution(1, 3), "plateau_factor": FloatDistribution(0.1, 0.5)}
    study = optuna.create_study(direction="maximize")
    for i in range(8):
        own = {"step_size": 1 + i % 3} if i % 2 else {"plateau_factor": 0.1 + 0.05 * i}
        params = {"lr": 1e-3 * (i + 1), "scheduler": "step" if i % 2 else "plateau", **own}
        study.add_trial(create_trial(value=0.5 + i / 20, params=params,
                                     distributions={k: space[k] for k in params}))
    fig = plots.parallel_coordinate(study)
    texts = drawn_texts(fig)
    assert "None" not in texts
    assert "lr" in texts and "scheduler" in texts and "step_size" not in texts
    assert "conditional, left out: plateau_factor, step_size" in fig.axes[0].get_title()
