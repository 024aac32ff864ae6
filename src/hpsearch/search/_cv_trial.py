"""One cross-validated trial (`[data] folds = K`): K models, one per fold, reported one step per fold.

Fold k trains on the other folds of train+val and validates on fold k; the trial reports fold k's best-epoch
validation accuracy at step k, so a pruner (WilcoxonPruner above all) compares trials fold by fold and may stop a
bad one after a few folds. Its value is the mean fold validation accuracy. Each finished fold uploads its model's
best-epoch weights and its outputs (its out-of-fold validation logits with their pool indices, and its test
logits) and appends a record to the trial's `folds` attr: accuracy, loss, best epoch, the per-epoch curves and
the artifact ids. A retried trial inherits those records and resumes at the first unfinished fold (from that
fold's checkpoint when one was kept). Nothing here decides whether to prune or retry: `hpsearch.objective` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial

from hpsearch import keys
from hpsearch._testhooks import hold_at
from hpsearch.config import StudyConfig
from hpsearch.data import DeviceData, Folds, ImagePool, Split, TrialData
from hpsearch.record import read_trial_record
from hpsearch.search._tracking import TrialTracker
from hpsearch.store import StudyArtifacts, TrialOutputs, upload_model_files
from hpsearch.train import Checkpoint, EpochMetrics, Hyperparams, TrainResult, checkpoint_policy, train_trial


def fold_seed(seed: int, fold: int) -> int:
    """Each fold's model starts from its own seed (fold models of one member are not the same initialisation)."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0] % 2**31)


def trial_weights(trial: FrozenTrial) -> list[tuple[int, str]]:
    """(trial number that uploaded it, artifact id) of every weights file a trial keeps: one, or one per fold."""
    record = read_trial_record(trial)
    if record.folds:
        return [(int(r.get("uploaded_by", trial.number)), str(r["weights_artifact"])) for r in record.folds]
    return [(trial.number, record.weights)] if record.weights else []


class CrossValidation:
    """Runs a trial's folds; one per process, beside the Objective that owns the trial."""

    def __init__(self, cfg: StudyConfig, pool: ImagePool, split: Split, folds: Folds, base: TrialData,
                 device: torch.device, files: StudyArtifacts,
                 on_checkpoint: Callable[..., None],  # Objective._checkpoint(trial, checkpoint, hold_point, **attrs)
                 drop_checkpoint: Callable[[optuna.Trial], None],
                 on_epoch: Callable[[optuna.Trial, EpochMetrics], None] | None = None) -> None:
        self.cfg = cfg
        self.pool = pool
        self.split_sha = split.sha256()
        self.folds = folds
        self.folds_sha = folds.sha256()
        self.base = base  # test split, preprocessing, augmentations: shared by every fold
        self.device = device
        self.files = files
        self.on_checkpoint = on_checkpoint
        self.drop_checkpoint = drop_checkpoint
        self.on_epoch = on_epoch

    def fold_data(self, fold: int) -> TrialData:
        """Fold `fold`'s training and validation images on the device; test and preprocessing are the study's."""
        # Placed as the study's splits are (streamed from the shared cache on the CPU: no copy per fold).
        placement = self.base.train.placement
        return TrialData(train=DeviceData(self.pool, self.folds.train(fold), self.device, placement),
                         val=DeviceData(self.pool, self.folds.val(fold), self.device, placement), test=self.base.test,
                         preprocess=self.base.preprocess, augment=self.base.augment,
                         num_classes=self.base.num_classes)

    def run(self, trial: optuna.Trial, hp: Hyperparams, seed: int, log: TrialTracker,
            resume: Checkpoint | None) -> float:
        """Train the trial's unfinished folds (resuming the first from `resume`); the mean of the folds' validation
        metric (the study's: accuracy, balanced_accuracy, macro_f1 or loss)."""
        records = list(read_trial_record(trial).folds)
        reported = trial.study.get_trials(deepcopy=False)[trial.number].intermediate_values
        for record in records:  # a retry inherits its original's steps; report any it lacks
            if int(record["fold"]) not in reported:
                trial.report(_score(record), int(record["fold"]))
        for fold in range(len(records), self.folds.k):
            result = self._train_fold(trial, hp, fold_seed(seed, fold), fold, log, resume)
            resume = None  # only the first unfinished fold continues a checkpoint
            records.append(self._store(trial, fold, result, fold_seed(seed, fold)))
            trial.set_user_attr(keys.FOLDS, records)
            self.drop_checkpoint(trial)  # the fold is stored: its checkpoint would only take space
            trial.set_user_attr(keys.CHECKPOINT, None)  # ... and a retry must not look for it
            trial.report(result.best.score, fold)
            hold_at(f"fold-{fold + 1}")
            if fold + 1 < self.folds.k and trial.should_prune():
                mean = float(np.mean([_score(r) for r in records]))
                reason = (f"pruned after fold {fold + 1} of {self.folds.k}: mean val_{self.cfg.study.metric} "
                          f"{mean:.4f} so far, by the {self.cfg.study.pruner} pruner")
                trial.set_user_attr(keys.PRUNED_REASON, reason)
                raise optuna.TrialPruned(reason)
        for key, value in summary(records).items():
            trial.set_user_attr(key, value)
        return float(np.mean([_score(r) for r in records]))

    def _train_fold(self, trial: optuna.Trial, hp: Hyperparams, seed: int, fold: int, log: TrialTracker,
                    resume: Checkpoint | None) -> TrainResult:
        def on_epoch(metrics: EpochMetrics) -> None:
            log.epoch(metrics, fold)
            if self.on_epoch is not None:
                self.on_epoch(trial, metrics)

        def on_checkpoint(checkpoint: Checkpoint) -> None:
            # The fold is recorded with the checkpoint, after it is written: never a fold without its file.
            self.on_checkpoint(trial, checkpoint, f"fold-{fold}-epoch-{checkpoint.epoch + 1}",
                               **{keys.CHECKPOINT_FOLD: fold})

        data = self.fold_data(fold)
        return train_trial(self.cfg.trial_model(trial.params), self.cfg.train, data, hp, seed=seed, device=self.device,
                           on_epoch=on_epoch, resume=resume, on_checkpoint=on_checkpoint,
                           checkpoint=checkpoint_policy(self.cfg.train), metric=self.cfg.study.metric)

    def _store(self, trial: optuna.Trial, fold: int, result: TrainResult, seed: int) -> dict[str, Any]:
        val_index = torch.from_numpy(self.folds.val(fold).astype(np.int64))
        outputs = TrialOutputs(result.val_logits, result.test_logits, self.split_sha,
                               self.pool.labels[val_index], self.base.test.labels.cpu(), val_index,
                               self.folds_sha, fold)
        metadata = {"arch": self.cfg.trial_model(trial.params).arch, "num_classes": str(self.base.num_classes),
                    "trial": str(trial.number), "fold": str(fold)}
        ids = upload_model_files(self.files, trial.number, result.state_dict, outputs, metadata)
        return {"fold": fold, "val_accuracy": result.best.val_accuracy, "val_loss": result.best.val_loss,
                "score": result.best.score,
                keys.BEST_EPOCH: result.best.epoch, "epochs_run": len(result.history), "seed": seed,
                "weights_artifact": ids[keys.WEIGHTS], "outputs_artifact": ids[keys.OUTPUTS],
                "uploaded_by": trial.number,
                "history": [{k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(m).items()}
                            for m in result.history]}

    def drop_weights(self, trial: optuna.Trial) -> None:
        """A pruned trial is no ensemble member: its fold weights go (its outputs, small, stay on record)."""
        for record in read_trial_record(trial).folds:
            self.files.delete(int(record.get("uploaded_by", trial.number)), str(record["weights_artifact"]))


def _score(record: dict[str, Any]) -> float:
    """A fold's value by the study's metric (a fold recorded by an older hpsearch: its accuracy, the only metric)."""
    return float(record.get("score", record["val_accuracy"]))


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial-level attrs a single-split trial has too, over its folds: mean accuracy and loss, epochs run."""
    return {"val_accuracy": float(np.mean([r["val_accuracy"] for r in records])),
            "val_loss": float(np.mean([r["val_loss"] for r in records])),
            "epochs_run": int(sum(int(r["epochs_run"]) for r in records)),
            keys.FOLD_VAL_ACCURACY: [float(r["val_accuracy"]) for r in records]}
