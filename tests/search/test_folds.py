"""Stratified k-fold cross-validation: the folds themselves, their record in the study, and cross-validated
trials (one step per fold, the Wilcoxon pruner, a retry resuming at its first unfinished fold), on real SQLite
files and the digits data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState
from safetensors.torch import load_file

from hpsearch import keys
from hpsearch.config import ConfigError, StudyConfig, read_study_file
from hpsearch.data import load_pool, make_folds, make_split
from hpsearch.record import read_trial_record
from hpsearch.search._objective import Objective, Prepared
from hpsearch.search._run import run_trials
from hpsearch.search._study import open_study, prepare
from hpsearch.store import StudyArtifacts, load_outputs, open_artifact_store, open_storage

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits_split():
    cfg = StudyConfig.model_validate({"study": {"name": "d"}}).data
    pool = load_pool(cfg)
    return pool, make_split(pool, cfg, seed=0)


# ---------------------------------------------------------------------------------------------- the folds


@pytest.mark.parametrize("k", [2, 5])
def test_folds_are_stratified_disjoint_and_cover_train_and_val_exactly(digits_split, k):
    pool, split = digits_split
    labels = pool.labels.numpy()
    folds = make_folds(labels, split, k, seed=0)
    vals = [folds.val(f) for f in range(k)]
    everything = np.concatenate(vals)
    assert len(everything) == len(set(everything.tolist()))  # disjoint
    assert sorted(everything.tolist()) == sorted(np.concatenate([split.train, split.val]).tolist())  # exact cover
    assert not set(everything.tolist()) & set(split.test.tolist())  # the test split is in no fold
    for f in range(k):
        assert sorted(np.concatenate([folds.train(f), folds.val(f)]).tolist()) == sorted(everything.tolist())
        assert not set(folds.train(f).tolist()) & set(folds.val(f).tolist())
    # Stratified: each class's count in a fold is its train+val count / k, within one image.
    pool_labels = labels[folds.pool]
    for c in np.unique(pool_labels):
        counts = [int((labels[v] == c).sum()) for v in vals]
        assert max(counts) - min(counts) <= 1, (c, counts)
        assert sum(counts) == int((pool_labels == c).sum())
    sizes = folds.sizes()
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(everything)


def test_folds_are_fixed_by_the_seed(digits_split):
    pool, split = digits_split
    labels = pool.labels.numpy()
    a, b = make_folds(labels, split, 5, seed=0), make_folds(labels, split, 5, seed=0)
    assert a.sha256() == b.sha256() and np.array_equal(a.assignment, b.assignment)
    assert make_folds(labels, split, 5, seed=1).sha256() != a.sha256()
    assert make_folds(labels, split, 4, seed=0).sha256() != a.sha256()


def test_folds_are_recorded_in_the_study_and_checked_on_resume(study_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = read_study_file(study_file("cv", data={"folds": 3}))
    prepared = prepare(cfg)
    study = open_study(cfg, open_storage(url), prepared, tmp_path / "artifacts")
    assert prepared.folds is not None
    assert study.user_attrs[keys.FOLDS_SHA256] == prepared.folds.sha256()
    assert study.user_attrs[keys.FOLD_SIZES] == prepared.folds.sizes()
    open_study(cfg, open_storage(url), prepare(cfg), tmp_path / "artifacts")  # the same folds resume

    for changed, why in (({"folds": 4}, "fold assignment differs"), ({"folds": 0}, "created with 3 folds")):
        other = read_study_file(study_file("cv", data=changed))
        with pytest.raises(ConfigError) as raised:
            open_study(other, open_storage(url), prepare(other), tmp_path / "artifacts")
        assert raised.value.field == "data.folds" and why in str(raised.value)
        assert "\n" not in str(raised.value)


def test_a_single_split_study_refuses_folds_on_resume(study_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = read_study_file(study_file("plain"))
    open_study(cfg, open_storage(url), prepare(cfg), tmp_path / "artifacts")
    with pytest.raises(ConfigError, match="created without folds") as raised:
        cv = read_study_file(study_file("plain", data={"folds": 3}))
        open_study(cv, open_storage(url), prepare(cv), tmp_path / "artifacts")
    assert raised.value.field == "data.folds"


# ----------------------------------------------------------------------------------- cross-validated trials


def start(path: Path, tmp_path: Path, **kwargs) -> tuple[StudyConfig, Prepared, optuna.Study, Objective]:
    """What one `hpsearch run` process does before its first trial."""
    cfg = read_study_file(path)
    prepared = prepare(cfg)
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    artifacts = tmp_path / "artifacts"
    study = open_study(cfg, storage, prepared, artifacts)
    files = StudyArtifacts(open_artifact_store(artifacts), storage, study.study_name, str(artifacts))
    return cfg, prepared, study, Objective(cfg, prepared, CPU, files, **kwargs)


@pytest.mark.slow
@pytest.mark.inprocess
def test_a_cross_validated_trial_reports_each_fold_and_stores_each_fold_model(study_file, tmp_path):
    path = study_file("cv", data={"folds": 3}, study={"n_trials": 1})
    _, prepared, study, objective = start(path, tmp_path)
    run_trials(study, objective, 1)

    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE
    records = list(read_trial_record(trial).folds)
    assert [r["fold"] for r in records] == [0, 1, 2]
    # One step per fold, its value that fold's best-epoch validation accuracy; the trial's value their mean.
    assert trial.intermediate_values == {r["fold"]: r["val_accuracy"] for r in records}
    assert trial.value == pytest.approx(np.mean([r["val_accuracy"] for r in records]))
    assert trial.user_attrs["fold_val_accuracy"] == [r["val_accuracy"] for r in records]
    store = open_artifact_store(tmp_path / "artifacts")
    folds = prepared.folds
    for record in records:
        assert len(record["history"]) == 1 and {"train_loss", "val_loss", "val_accuracy", "lr"} <= set(
            record["history"][0])
        outputs = load_outputs(store, record["outputs_artifact"])
        assert outputs.fold == record["fold"] and outputs.folds_sha256 == folds.sha256()
        assert outputs.val_index.tolist() == folds.val(record["fold"]).tolist()  # out-of-fold, in pool order
        assert outputs.test_logits.shape[0] == len(prepared.split.test)
        accuracy = (outputs.val_logits.argmax(1) == outputs.val_labels).float().mean().item()
        assert accuracy == pytest.approx(record["val_accuracy"])
        with (tmp_path / "w.safetensors").open("wb") as f:
            f.write(store.open_reader(record["weights_artifact"]).read())
        assert "fc.weight" in load_file(str(tmp_path / "w.safetensors"))
    assert keys.WEIGHTS not in trial.user_attrs and keys.OUTPUTS not in trial.user_attrs


@pytest.mark.slow
@pytest.mark.inprocess
def test_the_wilcoxon_pruner_stops_a_bad_trial_before_its_last_fold(study_file, tmp_path):
    path = study_file(
        "wilcoxon",
        # 3 folds: the exact one-sided signed-rank test of 2 pairs gives at best p = 1/4, under this threshold.
        study={"n_trials": 2, "pruner": "wilcoxon", "pruner_p_threshold": 0.3},
        data={"subset": 400, "folds": 3},
        train={"epochs": 2},
        space={"lr": [1e-7, 1e-2], "optimizer": ["adam", "sgd"], "scheduler": ["none"]},
    )
    _, _, study, objective = start(path, tmp_path)
    study.enqueue_trial({"lr": 1e-3, "optimizer": "adam", "dropout": 0.0})
    study.enqueue_trial({"lr": 1e-7, "optimizer": "sgd", "dropout": 0.0})

    run_trials(study, objective, 2)

    good, bad = study.trials
    assert good.state == TrialState.COMPLETE and list(good.intermediate_values) == [0, 1, 2]
    assert bad.state == TrialState.PRUNED
    assert list(bad.intermediate_values) == [0, 1]  # its last fold never ran
    assert all(bad.intermediate_values[f] < good.intermediate_values[f] for f in range(2))
    reason = bad.user_attrs["pruned_reason"]
    assert "after fold 2 of 3" in reason and "wilcoxon" in reason
    # A pruned trial is no ensemble member: its fold weights are gone, its outputs stay on record.
    store = open_artifact_store(tmp_path / "artifacts")
    for record in read_trial_record(bad).folds:
        with pytest.raises(Exception):  # noqa: B017 - the store's own not-found error
            store.open_reader(record["weights_artifact"])
        store.open_reader(record["outputs_artifact"]).close()


@pytest.mark.slow
@pytest.mark.inprocess
def test_a_retried_trial_resumes_at_its_first_unfinished_fold(study_file, tmp_path):
    path = study_file("resume", data={"folds": 3}, study={"n_trials": 1})

    def interrupt_in_fold_2(trial, metrics) -> None:
        if len(read_trial_record(trial).folds) == 2:
            raise KeyboardInterrupt("test: stop in fold 2")

    _, _, study, objective = start(path, tmp_path, on_epoch=interrupt_in_fold_2)
    with pytest.raises(KeyboardInterrupt):
        run_trials(study, objective, 1)
    original, queued = study.trials
    assert original.state == TrialState.FAIL and original.user_attrs[keys.INTERRUPTED]
    assert queued.state == TrialState.WAITING
    assert [r["fold"] for r in read_trial_record(original).folds] == [0, 1]

    _, _, study, objective = start(path, tmp_path)
    run_trials(study, objective, 1)
    original, retry = study.trials
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs[keys.RESUMED_FROM] == {"trial": 0, "epochs_done": 0, "folds_done": 2}
    records = list(read_trial_record(retry).folds)
    assert [r["fold"] for r in records] == [0, 1, 2]
    # Folds 0 and 1 are the original's models (not retrained); fold 2 was trained by the retry.
    assert records[:2] == list(read_trial_record(original).folds)
    assert [r["uploaded_by"] for r in records] == [0, 0, 1]
    assert sorted(retry.intermediate_values) == [0, 1, 2]
    assert retry.value == pytest.approx(np.mean([r["val_accuracy"] for r in records]))
    assert retry.user_attrs[keys.SEED] == original.user_attrs[keys.SEED]


@pytest.mark.slow
@pytest.mark.inprocess
def test_keep_weights_deletes_every_fold_model_of_a_trial_outside_the_best(study_file, tmp_path):
    path = study_file("keep", data={"folds": 2}, study={"n_trials": 3, "keep_weights": 1})
    _, _, study, objective = start(path, tmp_path)
    run_trials(study, objective, 3)

    store = open_artifact_store(tmp_path / "artifacts")
    ranked = sorted(study.trials, key=lambda t: (-t.value, t.number))
    assert all(t.state == TrialState.COMPLETE for t in ranked)

    def exists(artifact: str) -> bool:
        try:
            store.open_reader(artifact).close()
        except Exception:  # the store's own not-found error
            return False
        return True

    for place, trial in enumerate(ranked):
        records = list(read_trial_record(trial).folds)
        assert len(records) == 2
        assert [exists(r["weights_artifact"]) for r in records] == [place == 0] * 2, place
        assert all(exists(r["outputs_artifact"]) for r in records)  # outputs stay: the study's record is whole


@pytest.mark.slow
@pytest.mark.inprocess
def test_a_retry_continues_the_checkpoint_of_its_unfinished_fold(study_file, tmp_path):
    path = study_file("ckpt", data={"folds": 2}, study={"n_trials": 1}, train={"epochs": 2, "checkpoint_every": 1})

    def interrupt_in_fold_1_epoch_2(trial, metrics) -> None:
        if len(read_trial_record(trial).folds) == 1 and metrics.epoch == 1:
            raise KeyboardInterrupt("test: stop in fold 1, after its checkpoint of epoch 1")

    _, _, study, objective = start(path, tmp_path, on_epoch=interrupt_in_fold_1_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_trials(study, objective, 1)
    original = study.trials[0]
    assert original.user_attrs[keys.CHECKPOINT_FOLD] == 1 and original.user_attrs[keys.CHECKPOINT_EPOCH] == 1

    _, _, study, objective = start(path, tmp_path)
    run_trials(study, objective, 1)
    retry = study.trials[1]
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs[keys.RESUMED_FROM] == {"trial": 0, "epochs_done": 1, "folds_done": 1}
    fold_1 = read_trial_record(retry).folds[1]
    assert fold_1["uploaded_by"] == 1 and fold_1["epochs_run"] == 2
    store = open_artifact_store(tmp_path / "artifacts")
    with pytest.raises(Exception):  # noqa: B017 - the continued checkpoint is deleted once the trial is done
        store.open_reader(original.user_attrs[keys.CHECKPOINT])
