"""The Optuna side: study creation, samplers, pruners, the objective (suggest → train → report → store).

Everything about a study that later stages rely on is recorded in it as user attrs: the search-space
fingerprint (a resumed study must keep its space), the split's sha256 and sizes, the artifact store's
location, and the study file it was created from.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import os
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.artifacts import upload_artifact
from optuna.trial import FrozenTrial, TrialState

from hpsearch import __version__
from hpsearch.artifacts import (
    ATTR_ARTIFACTS,
    ATTR_CHECKPOINT,
    ATTR_WEIGHTS,
    ArtifactStore,
    TrialOutputs,
    download_to,
    remove_artifact,
    upload_trial_artifacts,
)
from hpsearch.config import ConfigError, SpaceSection, StudyConfig, StudySection
from hpsearch.data import ImagePool, Split, load_pool, make_split, preprocess_for, trial_data
from hpsearch.model import build_model, init_weights_tag
from hpsearch.train import Checkpoint, EpochMetrics, Hyperparams, NonFiniteLoss, TrainResult, train_trial
from hpsearch.workers import ATTR_WORKER, worker_tag

_log = logging.getLogger(__name__)

METRIC_NAME = "val_accuracy"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
ATTR_INIT_WEIGHTS = "init_weights"


# ------------------------------------------------------------------------------------- sampler, pruner


def make_sampler(cfg: StudySection, seed: int) -> optuna.samplers.BaseSampler:
    if cfg.sampler == "tpe":
        # group=True splits the conditional scheduler branches into their own joint spaces;
        # constant_liar keeps parallel workers from proposing the same point.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=min(10, max(3, cfg.n_trials // 4)))
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=min(10, max(3, cfg.n_trials // 4)))


def make_pruner(cfg: StudySection, epochs: int) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                           n_warmup_steps=cfg.pruner_warmup_epochs)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


def sampler_seed(study_seed: int, worker: int, existing_trials: int) -> int:
    """Distinct per worker and per resume, so no two samplers replay the same random startup points."""
    return int(np.random.SeedSequence([study_seed, worker, existing_trials]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------- the space


def suggest(trial: optuna.Trial, space: SpaceSection) -> Hyperparams:
    """lr (log), optimizer, scheduler with its own parameters (names unique per branch), dropout."""
    params: dict[str, Any] = {
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "optimizer": trial.suggest_categorical("optimizer", space.optimizer),
        "scheduler": trial.suggest_categorical("scheduler", space.scheduler),
        "dropout": trial.suggest_float("dropout", *space.dropout),
    }
    if space.weight_decay is not None:
        params["weight_decay"] = trial.suggest_float("weight_decay", *space.weight_decay, log=True)
    if params["scheduler"] == "step":
        params["step_size"] = trial.suggest_int("step_size", *space.step.step_size)
        params["step_gamma"] = trial.suggest_float("step_gamma", *space.step.gamma, log=True)
    elif params["scheduler"] == "exponential":
        params["exp_gamma"] = trial.suggest_float("exp_gamma", *space.exponential.gamma, log=True)
    elif params["scheduler"] == "plateau":
        params["plateau_factor"] = trial.suggest_float("plateau_factor", *space.plateau.factor, log=True)
        params["plateau_patience"] = trial.suggest_int("plateau_patience", *space.plateau.patience)
    return Hyperparams(**params)


# ------------------------------------------------------------------------------------------ the study


@dataclass(frozen=True)
class Prepared:
    """What every trial of a process shares: the data pool and the study's split."""

    pool: ImagePool
    split: Split


def prepare(cfg: StudyConfig) -> Prepared:
    """Load the data and check the model's weights once, before any trial exists."""
    pool = load_pool(cfg.data, cfg.study.seed)
    split = make_split(pool, cfg.data, cfg.study.seed)
    # Fails here (clear ConfigError), not in every trial, when weights cannot be loaded.
    build_model(cfg.model, pool.num_classes, cfg.data.image_size)
    return Prepared(pool, split)


def _space_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "space") -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _space_diff(a, b, f"{prefix}.{key}")
        elif a != b:
            changes.append(f"{prefix}.{key} {json.dumps(a)} -> {json.dumps(b)}")
    return changes


def open_study(cfg: StudyConfig, storage: optuna.storages.BaseStorage, prepared: Prepared,
               artifacts: str | Path, worker: int = 0) -> optuna.Study:
    """Create the study, or resume it if its search space and split are unchanged."""
    study = optuna.create_study(
        study_name=cfg.study.name, storage=storage, direction=cfg.study.direction,
        pruner=make_pruner(cfg.study, cfg.train.epochs), load_if_exists=True,
    )
    attrs = study.user_attrs
    space = json.loads(json.dumps(cfg.space.fingerprint_data()))
    split_sha = prepared.split.sha256()
    if "space_fingerprint" in attrs:
        if attrs["space_fingerprint"] != cfg.space_fingerprint():
            changes = "; ".join(_space_diff(attrs.get("space", {}), space)) or "space changed"
            raise ConfigError("space", f"differs from study {cfg.study.name!r} in {study_storage_name(storage)} "
                              f"({changes}); Optuna cannot mix the two spaces: give the study a new [study] name "
                              f"or delete it (optuna delete-study --study-name {cfg.study.name} --storage URL)",
                              cfg.source)
        if attrs.get("split_sha256") not in (None, split_sha):
            raise ConfigError("data", f"the split differs from the one study {cfg.study.name!r} recorded (the dataset, "
                              "subset, fractions or seed changed); trials' outputs would not line up: use a new "
                              "[study] name", cfg.source)
    else:
        study.set_user_attr("space_fingerprint", cfg.space_fingerprint())
        study.set_user_attr("space", space)
        study.set_user_attr("split_sha256", split_sha)
        study.set_user_attr("split_sizes", prepared.split.sizes())
        study.set_user_attr("classes", prepared.pool.classes)
        study.set_user_attr("config", cfg.model_dump(mode="json"))
        # The normalization every trial trains with, for exports (hpsearch.export reads it back).
        pre = preprocess_for(prepared.pool, prepared.split, cfg.data, cfg.model.pretrained)
        study.set_user_attr("preprocess", {"image_size": pre.image_size, "mean": list(pre.mean), "std": list(pre.std),
                                           "interpolation": pre.interpolation})
        study.set_user_attr("hpsearch_version", __version__)
    if ATTR_ARTIFACTS not in attrs:
        study.set_user_attr(ATTR_ARTIFACTS, str(artifacts))
    study.set_metric_names([METRIC_NAME])
    existing = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(cfg.study, sampler_seed(cfg.study.seed, worker, existing))
    return study


def study_storage_name(storage: optuna.storages.BaseStorage) -> str:
    url = getattr(storage, "url", None)
    if url:
        from hpsearch.storage import redact

        return redact(url)
    return type(storage).__name__


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


# ------------------------------------------------------------------------------------------ objective


class Objective:
    """suggest → train → report every epoch (the pruner may stop it) → store artifacts → value."""

    def __init__(self, cfg: StudyConfig, prepared: Prepared, device: torch.device, store: ArtifactStore,
                 on_epoch: Callable[[FrozenTrial | optuna.Trial, EpochMetrics], None] | None = None) -> None:
        self.cfg = cfg
        self.prepared = prepared
        self.device = device
        self.store = store
        self.on_epoch = on_epoch
        pretrained = cfg.model.pretrained
        # Recorded per trial: a greedy soup (hpsearch.soup) needs trials that started from the same weights.
        self.init_weights = init_weights_tag(cfg.model)
        # The splits move to the device once per process, not once per trial.
        self.data = trial_data(prepared.pool, prepared.split, cfg.data, pretrained, device)

    def __call__(self, trial: optuna.Trial) -> float:
        # First: a supervisor finds a dead worker's trial by this tag.
        trial.set_user_attr(ATTR_WORKER, worker_tag())
        hp = suggest(trial, self.cfg.space)
        # A retry trains with its original's seed: the same configuration, and a checkpoint it continues
        # reproduces the original exactly.
        retried = self._retried_trials(trial)
        seed = (int(retried[0].user_attrs.get("seed", self.cfg.study.seed + retried[0].number)) if retried
                else self.cfg.study.seed + trial.number)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("device", str(self.device))
        trial.set_user_attr("memory_at_start", memory_in_use(self.device))
        trial.set_user_attr(ATTR_INIT_WEIGHTS, self.init_weights)
        resume, resumed_from = self._resume_point(trial, retried)
        if resume is not None:
            trial.set_user_attr("resumed_from", {"trial": resumed_from.number if resumed_from else None,
                                                 "epochs_done": resume.epoch + 1})

        def report(metrics: EpochMetrics) -> None:
            trial.report(metrics.val_accuracy, metrics.epoch)
            if self.on_epoch is not None:
                self.on_epoch(trial, metrics)
            if trial.should_prune():
                reason = (f"pruned at epoch {metrics.epoch + 1}: val_accuracy {metrics.val_accuracy:.4f} "
                          f"by the {self.cfg.study.pruner} pruner")
                trial.set_user_attr("pruned_reason", reason)
                raise optuna.TrialPruned(reason)

        out_of_memory: str | None = None
        try:
            result = train_trial(self.cfg.model, self.cfg.train, self.data, hp, seed=seed, device=self.device,
                                 on_epoch=report, resume=resume, on_checkpoint=lambda c: self._checkpoint(trial, c),
                                 checkpoint_every=self.cfg.train.checkpoint_every)
            # Inside the try: a store that cannot be written must FAIL the trial with its reason too.
            self._store(trial, result)
        except NonFiniteLoss as err:
            # A diverged trial teaches the sampler "this region is bad": PRUNED, not FAIL (which TPE ignores).
            trial.set_user_attr("pruned_reason", str(err))
            self._drop_checkpoint(trial)
            raise optuna.TrialPruned(str(err)) from None
        except optuna.TrialPruned:
            self._drop_checkpoint(trial)
            raise
        except Exception as err:
            if _out_of_memory(err):
                # Only a string leaves this block: the exception would keep the trial's tensors alive.
                where = self.device if isinstance(err, torch.OutOfMemoryError) else "cpu"
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                out_of_memory = f"out of memory on {where}: {first[:500]}"
            else:
                trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}"[:1000])
                trial.set_user_attr("fail_traceback", traceback.format_exc()[-4000:])
                self._drop_checkpoint(trial)  # nothing retries a crashed trial: its checkpoint would only take space
                raise
        if out_of_memory is not None:
            # Out here the exception and its frames (holding the trial's tensors) are gone: free them.
            free_device_memory()
            trial.set_user_attr("fail_reason", out_of_memory)
            trial.set_user_attr("out_of_memory", True)
            raise TrialOutOfMemory(out_of_memory)
        self._drop_checkpoint(trial)
        if resumed_from is not None:
            self._drop_checkpoint(resumed_from)
        return result.best.val_accuracy

    @staticmethod
    def _retried_trials(trial: optuna.Trial) -> list[FrozenTrial]:
        """The trials this one retries (same parameters), the first original first; [] for a new trial."""
        frozen = trial.study._storage.get_trial(trial._trial_id)
        history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(frozen)
        if not history:
            return []
        trials = trial.study.get_trials(deepcopy=False)
        return [trials[number] for number in history]

    def _resume_point(self, trial: optuna.Trial,
                      retried: list[FrozenTrial]) -> tuple[Checkpoint | None, FrozenTrial | None]:
        """The last checkpoint among the trials this one retries, if any survived."""
        for original in reversed(retried):
            artifact = original.user_attrs.get(ATTR_CHECKPOINT)
            if not artifact:
                continue
            with tempfile.TemporaryDirectory(prefix="hpsearch-") as tmp:
                try:
                    path = download_to(self.store, artifact, Path(tmp), "checkpoint.pt")
                    return Checkpoint.load(str(path)), original
                except Exception as err:  # a lost or unreadable checkpoint means starting over, not failing
                    _log.warning("trial %s: checkpoint of trial %s unusable (%s); starting from epoch 1",
                                 trial.number, original.number, err)
        return None, None

    def _checkpoint(self, trial: optuna.Trial, checkpoint: Checkpoint) -> None:
        previous = trial.study._storage.get_trial_user_attrs(trial._trial_id).get(ATTR_CHECKPOINT)
        with tempfile.TemporaryDirectory(prefix="hpsearch-") as tmp:
            path = Path(tmp) / "checkpoint.pt"
            checkpoint.save(str(path))
            artifact = upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial,
                                       mimetype="application/octet-stream")
        trial.set_user_attr(ATTR_CHECKPOINT, artifact)
        trial.set_user_attr("checkpoint_epoch", checkpoint.epoch + 1)
        if previous:
            remove_artifact(self.store, previous)

    def _drop_checkpoint(self, trial: optuna.Trial | FrozenTrial) -> None:
        attrs = trial.user_attrs
        if attrs.get(ATTR_CHECKPOINT):
            remove_artifact(self.store, attrs[ATTR_CHECKPOINT])

    def _store(self, trial: optuna.Trial, result: TrainResult) -> None:
        # Test outputs are stored for the ensemble's final report only; no test metric is set anywhere.
        outputs = TrialOutputs(result.val_logits, result.test_logits, self.prepared.split.sha256(),
                               self.data.val.labels.cpu(), self.data.test.labels.cpu())
        metadata = {"arch": self.cfg.model.arch, "num_classes": str(self.data.num_classes),
                    "trial": str(trial.number)}
        upload_trial_artifacts(self.store, trial, result.state_dict, outputs, metadata)
        for key, value in result.summary().items():
            trial.set_user_attr(key, value)


# -------------------------------------------------------------------------------------------- running


class StopAfterFailures:
    """Stop the study after `limit` trials of this process failed in a row (a broken setup, not bad luck)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.tripped = False

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.in_a_row = self.in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.in_a_row >= self.limit:
            self.tripped = True
            study.stop()


class TrialOutOfMemory(RuntimeError):
    """A trial ran out of memory, on its GPU or on the host (see `_out_of_memory`); the worker lives on and the
    trial is retried once."""


# On the host, PyTorch's allocator failure is no torch.OutOfMemoryError but a plain RuntimeError with this text.
_CPU_ALLOCATOR_OOM = "DefaultCPUAllocator: can't allocate memory"


def _out_of_memory(err: BaseException) -> bool:
    """An allocator refused: torch.OutOfMemoryError (CUDA and other accelerators), or the CPU allocator's
    RuntimeError. Any other error is a crash, not out of memory."""
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                        and _CPU_ALLOCATOR_OOM in str(err))


def free_device_memory() -> None:
    """Between trials (and after an OOM): drop what the last trial held, host and device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_in_use(device: torch.device) -> dict[str, float]:
    """What this process holds now, in MiB: host resident set (Linux), and tensors on its CUDA device.

    Recorded when each trial starts, it is what earlier trials left behind: flat over a worker's trials
    unless something leaks (a user sees it per trial in the dashboard; the tests check it).
    """
    held: dict[str, float] = {}
    try:
        with open("/proc/self/statm") as statm:
            held["host_rss_mib"] = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # no procfs (not Linux): the host figure is simply absent
        pass
    if device.type == "cuda":
        held["cuda_allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
    return {k: round(v, 1) for k, v in held.items()}


_FAILURE_ATTRS = ("fail_reason", "fail_traceback", "out_of_memory", ATTR_WORKER)


class RetryOutOfMemory:
    """A trial that ran out of memory (GPU or host) is retried once with the same parameters (no searched parameter
    changes memory, so PRUNED would teach the sampler the wrong lesson); a second OOM stays FAIL."""

    def __init__(self) -> None:
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1,
                                                                      inherit_intermediate_values=True)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and trial.user_attrs.get("out_of_memory"):
            # The retry copies user attrs: not the failure's own.
            failed = copy.copy(trial)
            failed.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in _FAILURE_ATTRS}
            self.retry(study, failed)


class KeepBestWeights:
    """Disk stays bounded: weights of COMPLETE trials outside the best `keep` are deleted as the study runs.
    Outputs (small) stay, so the study's record is whole; a deleted trial is simply no ensemble candidate."""

    def __init__(self, store: ArtifactStore, keep: int) -> None:
        self.store = store
        self.keep = keep
        self.removed: set[str] = set()  # not asked of the store again at every later trial

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not self.keep:
            return
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.value is not None and math.isfinite(t.value)]
        complete.sort(key=lambda t: (-t.value, t.number))
        for loser in complete[self.keep:]:
            artifact = loser.user_attrs.get(ATTR_WEIGHTS)
            if artifact and artifact not in self.removed:
                remove_artifact(self.store, artifact)
                self.removed.add(artifact)


def run_trials(study: optuna.Study, objective: Objective, n_trials: int, *, timeout: float | None = None,
               callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = ()) -> StopAfterFailures:
    """Run until the study holds n_trials finished (COMPLETE + PRUNED) trials, the timeout, or a failure streak."""
    guard = StopAfterFailures(objective.cfg.study.max_consecutive_failures)
    if finished_trials(study) >= n_trials:
        return guard
    stop_at_n = optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)
    cfg = objective.cfg
    keep = KeepBestWeights(objective.store, cfg.study.keep_weights if cfg.study.keep_weights is not None
                           else cfg.ensemble.top_k + 3)
    study.optimize(objective, timeout=timeout, catch=(Exception,), gc_after_trial=True,
                   callbacks=[RetryOutOfMemory(), keep, *callbacks, stop_at_n, guard, _free_after_trial])
    return guard


def _free_after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    free_device_memory()


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None
