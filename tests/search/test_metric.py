"""A study's metric through the search: each epoch reports it, the pruner and the ranking follow its direction
(minimize for loss), the ensemble's candidates and the target too. Real trials on a real SQLite storage."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console
from sklearn.metrics import f1_score

from hpsearch.ensemble._candidates import select_candidates
from hpsearch.monitor import describe_trial, status_renderables
from hpsearch.report._plots import learning_curves, optimization_history
from hpsearch.search._run import run_trials
from hpsearch.store import (
    best_trial,
    load_trial_outputs,
    metric_name,
    open_artifact_store,
    ranked_trials,
    target_reached,
)
from tests.search.test_search import start


@pytest.mark.slow
@pytest.mark.inprocess
def test_a_loss_study_minimizes_prunes_the_higher_loss_and_ranks_the_lowest_first(study_file, tmp_path):
    path = study_file(
        "loss",
        study={"n_trials": 3, "metric": "loss", "pruner": "median", "pruner_startup_trials": 1,
               "pruner_warmup_epochs": 0},
        data={"subset": 400},
        train={"epochs": 2},
        space={"lr": [1e-7, 1e-2], "optimizer": ["adam", "sgd"], "scheduler": ["none"]},
    )
    cfg, _, study, objective = start(path, f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "artifacts")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.metric_names == ["val_loss"]
    study.enqueue_trial({"lr": 3e-4, "optimizer": "adam", "dropout": 0.0})
    study.enqueue_trial({"lr": 1e-7, "optimizer": "sgd", "dropout": 0.0})  # learns nothing: its loss stays high
    study.enqueue_trial({"lr": 3e-3, "optimizer": "adam", "dropout": 0.0})

    run_trials(study, objective, 3)

    first, hopeless, _ = study.trials
    # Each epoch reported its validation loss; the value is the best epoch's (the lowest).
    assert first.state == TrialState.COMPLETE
    assert first.value == pytest.approx(min(first.intermediate_values.values()))
    assert first.value == pytest.approx(first.user_attrs["val_loss"])
    # The median pruner stopped the trial whose loss was above the others' (maximizing would have kept it).
    assert hopeless.state == TrialState.PRUNED
    assert list(hopeless.intermediate_values) == [0]
    assert hopeless.intermediate_values[0] > first.intermediate_values[0]
    assert "val_loss" in hopeless.user_attrs["pruned_reason"]
    # Ranked lowest loss first: status, keep_weights, the report and the ensemble's candidates read this.
    complete = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert [t.number for t in ranked_trials(study)] == [t.number for t in complete]
    assert best_trial(study).number == complete[0].number
    selection = select_candidates(study, open_artifact_store(tmp_path / "artifacts"), cfg.ensemble.top_k)
    assert [c.trial for c in selection.candidates] == [t.number for t in complete]
    assert [c.val_accuracy for c in selection.candidates] == [t.user_attrs["val_accuracy"] for t in complete]
    # status names the metric and shows its value beside the accuracy, best first.
    console = Console(width=200, record=True)
    for part in status_renderables(study, "sqlite:///s.db", str(tmp_path / "artifacts"), 3, 2):
        console.print(part)
    text = console.export_text()
    assert f"best: trial {complete[0].number} val_loss={complete[0].value:.4f}" in text
    header = next(line for line in text.splitlines() if "val_loss" in line and "val_acc" in line)
    assert header.index("val_loss") < header.index("val_acc")
    line = describe_trial(first)  # the run's line per finished trial
    assert f"value={first.value:.4f} val_accuracy={first.user_attrs['val_accuracy']:.4f}" in line
    # A target for a minimized metric is reached at or below it.
    assert target_reached(study, complete[0].value + 1e-9).number == complete[0].number
    assert target_reached(study, complete[0].value - 1e-3) is None


@pytest.mark.slow
@pytest.mark.inprocess
def test_a_macro_f1_study_values_each_trial_by_its_best_epochs_macro_f1(study_file, tmp_path):
    path = study_file("f1", study={"n_trials": 1, "metric": "macro_f1"}, train={"epochs": 2},
                      space={"scheduler": ["cosine"], "warmup_epochs": [0.5, 1.0]})
    _, _, study, objective = start(path, f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "artifacts")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE and study.metric_names == ["val_macro_f1"]

    run_trials(study, objective, 1)

    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE
    assert {"warmup_epochs", "cosine_min_ratio"} <= set(trial.params)
    # The best epoch's validation logits, as stored.
    outputs = load_trial_outputs(open_artifact_store(tmp_path / "artifacts"), trial)
    predicted = outputs.val_logits.argmax(1)
    expected = f1_score(outputs.val_labels.numpy(), predicted.numpy(), average="macro", zero_division=0)
    assert trial.value == pytest.approx(expected, abs=1e-6)
    assert trial.value == pytest.approx(max(trial.intermediate_values.values()))


def test_the_reports_figures_name_the_studys_metric(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'r.db'}", direction="minimize")
    study.set_metric_names([metric_name("loss")])
    for number, losses in enumerate([[2.0, 1.2], [1.8, 0.9], [2.3, 2.2]]):
        trial = study.ask()
        trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        trial.suggest_float("dropout", 0.0, 0.5)
        for epoch, loss in enumerate(losses):
            trial.report(loss, epoch)
        study.tell(trial, min(losses))
        assert study.trials[number].value == min(losses)
    history = optimization_history(study)
    assert "val_loss" in history.axes[0].get_ylabel()
    assert learning_curves(study).axes[0].get_ylabel() == "val_loss"
