"""The study: creation and resume checks, samplers, pruners, running trials and the callbacks around them.

Everything about a study that later stages rely on is recorded in it as user attrs (names in `hpsearch.keys`):
the search-space fingerprint (a resumed study must keep its space), the split's sha256 and sizes, the classes,
the normalization its trials train with, the artifact store's location, and the study file it was created from.
One trial's work is `hpsearch.objective`; this module decides which trials run, retries and ranks them.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from hpsearch import __version__, keys
from hpsearch.config import ConfigError, StudyConfig, StudySection, read_study_file
from hpsearch.data import load_pool, make_folds, make_split, preprocess_for
from hpsearch.errors import DeviceBrokenError, StoreFullError, StudyRecordError
from hpsearch.model import build_model, check_study_model
from hpsearch.preprocess import Preprocess
from hpsearch.search._cv_trial import trial_weights
from hpsearch.search._objective import Objective, Prepared, free_device_memory
from hpsearch.store import (
    FINISHED,
    METRIC_NAME,
    ArtifactStore,
    StopWatch,
    StopWhenAsked,
    StudyArtifacts,
    finished_trials,
    has_retry,
    load_existing,
    open_artifact_store,
    open_storage,
    pinned,
    ranked_trials,
    resolve_artifacts,
    resolve_storage_url,
    retry_failed,
    study_storage_name,
    target_reached,
)
from hpsearch.train import resolve_device

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


def make_pruner(cfg: StudySection, epochs: int, folds: int = 0) -> optuna.pruners.BasePruner:
    """With folds, a trial's steps are its folds (step k: fold k's validation accuracy), not its epochs."""
    if cfg.pruner == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=cfg.pruner_p_threshold)
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                           n_warmup_steps=cfg.pruner_warmup_epochs)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=folds or epochs)
    return optuna.pruners.NopPruner()


def sampler_seed(study_seed: int, worker: int, existing_trials: int) -> int:
    """Distinct per worker and per resume, so no two samplers replay the same random startup points."""
    return int(np.random.SeedSequence([study_seed, worker, existing_trials]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------ the study


def prepare(cfg: StudyConfig) -> Prepared:
    """Load the data and check the model's weights once, before any trial exists."""
    pool = load_pool(cfg.data, cfg.study.seed)
    split = make_split(pool, cfg.data, cfg.study.seed)
    # Fails here (clear ConfigError), not in every trial, when weights cannot be loaded.
    build_model(cfg.model, pool.num_classes, cfg.data.image_size)
    folds = make_folds(pool.labels.numpy(), split, cfg.data.folds, cfg.study.seed) if cfg.data.folds else None
    return Prepared(pool, split, folds)


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
        pruner=make_pruner(cfg.study, cfg.train.epochs, cfg.data.folds), load_if_exists=True,
    )
    attrs = study.user_attrs
    space = json.loads(json.dumps(cfg.space.fingerprint_data()))
    split_sha = prepared.split.sha256()
    folds_sha = prepared.folds.sha256() if prepared.folds is not None else None
    if keys.SPACE_FINGERPRINT in attrs:
        if attrs[keys.SPACE_FINGERPRINT] != cfg.space_fingerprint():
            changes = "; ".join(_space_diff(attrs.get(keys.SPACE, {}), space)) or "space changed"
            raise ConfigError("space", f"differs from study {cfg.study.name!r} in {study_storage_name(storage)} "
                              f"({changes}); Optuna cannot mix the two spaces: give the study a new [study] name "
                              f"or delete it (optuna delete-study --study-name {cfg.study.name} --storage URL)",
                              cfg.source)
        if keys.split_sha256(study) not in (None, split_sha):
            raise ConfigError("data", f"the split differs from the one study {cfg.study.name!r} recorded (the dataset, "
                              "subset, fractions or seed changed); trials' outputs would not line up: use a new "
                              "[study] name", cfg.source)
        _check_folds(cfg, study, folds_sha)
    else:
        study.set_user_attr(keys.SPACE_FINGERPRINT, cfg.space_fingerprint())
        study.set_user_attr(keys.SPACE, space)
        study.set_user_attr(keys.SPLIT_SHA256, split_sha)
        study.set_user_attr(keys.SPLIT_SIZES, prepared.split.sizes())
        if prepared.folds is not None:
            study.set_user_attr(keys.FOLDS_SHA256, folds_sha)
            study.set_user_attr(keys.FOLD_SIZES, prepared.folds.sizes())
        study.set_user_attr(keys.CLASSES, prepared.pool.classes)
        if prepared.pool.skipped:
            study.set_user_attr(keys.SKIPPED_IMAGES, list(prepared.pool.skipped))
        study.set_user_attr(keys.CONFIG, cfg.model_dump(mode="json"))
        # The normalization every trial trains with, for exports (study_preprocess reads it back).
        pre = preprocess_for(prepared.pool, prepared.split, cfg.data, cfg.model.pretrained)
        study.set_user_attr(keys.PREPROCESS, pre.record())
        study.set_user_attr(keys.HPSEARCH_VERSION, __version__)
    if keys.ARTIFACTS not in attrs:
        study.set_user_attr(keys.ARTIFACTS, str(artifacts))
    study.set_metric_names([METRIC_NAME])
    existing = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(cfg.study, sampler_seed(cfg.study.seed, worker, existing))
    return study


def _check_folds(cfg: StudyConfig, study: optuna.Study, folds_sha: str | None) -> None:
    """A resumed study keeps its folds: the same K over the same images (or none, as it was created)."""
    recorded = keys.folds_sha256(study)
    if recorded == folds_sha:
        return
    if recorded is None:
        why = f"study {cfg.study.name!r} was created without folds, so its trials are single-split"
    elif folds_sha is None:
        why = f"study {cfg.study.name!r} was created with {len(study.user_attrs.get(keys.FOLD_SIZES, []))} folds"
    else:
        why = f"the fold assignment differs from the one study {cfg.study.name!r} recorded (folds or seed changed)"
    raise ConfigError("data.folds", f"{why}; trials' folds would not line up: restore the setting or use a new "
                      "[study] name", cfg.source)


def study_preprocess(study: optuna.Study) -> Preprocess:
    """The Preprocess the study's trials trained with: recorded at creation, else recomputed from its config."""
    recorded = study.user_attrs.get(keys.PREPROCESS)
    if recorded:
        return Preprocess.of(**recorded)
    cfg = StudyConfig.model_validate(keys.recorded_config(study))
    pool = load_pool(cfg.data, cfg.study.seed)
    split = make_split(pool, cfg.data, cfg.study.seed)
    if split.sha256() != keys.split_sha256(study):
        raise StudyRecordError(f"study {study.study_name!r} records no preprocessing and its data no longer gives "
                               "its split; cannot tell the normalization its trials used")
    return preprocess_for(pool, split, cfg.data, cfg.model.pretrained)


# ------------------------------------------------------------------------------- opening a command's study


@dataclass
class Run:
    """Everything `run` and `worker` share: validated config, storage, data, the study (created or resumed)."""

    cfg: StudyConfig
    url: str
    storage: optuna.storages.BaseStorage
    study: optuna.Study
    prepared: Prepared
    artifacts: str  # a folder or s3://bucket/prefix
    store: ArtifactStore  # opened once per process: for S3 that is one client and one bucket check
    device: torch.device
    n_trials: int

    def objective(self, **kwargs: Any) -> Objective:
        files = StudyArtifacts(self.store, self.storage, self.study.study_name, self.artifacts)
        return Objective(self.cfg, self.prepared, self.device, files, **kwargs)


def open_run(study_file: str, *, storage: str | None = None, artifacts: str | None = None,
             device: str | None = None, n_trials: int | None = None, worker: int = 0) -> Run:
    """Read the study file, open its storage and artifact store, load the data, create or resume the study.

    Every check runs here, before any trial exists: a bad file, device, URL, store or dataset is one line."""
    cfg = read_study_file(study_file)
    check_study_model(cfg)
    resolved = resolve_device(device or cfg.train.device)
    threads = os.environ.get("HPSEARCH_THREADS")
    if resolved.type == "cpu" and threads:
        torch.set_num_threads(int(threads))
    url = resolve_storage_url(storage, cfg.study.storage)
    opened = open_storage(url, heartbeat_interval=cfg.study.heartbeat_interval,
                          heartbeat_grace=cfg.study.heartbeat_grace)
    prepared = prepare(cfg)
    location = resolve_artifacts(artifacts, load_existing(opened, cfg.study.name), cfg.study.artifacts)
    store = open_artifact_store(location)  # a store that cannot be used stops here, before any study or trial
    study = open_study(cfg, opened, prepared, location, worker=worker)
    return Run(cfg, url, opened, study, prepared, location, store, resolved, n_trials or cfg.study.n_trials)


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



class RetryOutOfMemory:
    """A trial that ran out of memory (GPU or host) is retried once with the same parameters (no searched parameter
    changes memory, so PRUNED would teach the sampler the wrong lesson); a second OOM stays FAIL."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and trial.user_attrs.get(keys.OUT_OF_MEMORY):
            retry_failed(study, trial)


class KeepBestWeights:
    """Disk stays bounded: weights of COMPLETE trials outside the best `keep` are deleted as the study runs.
    Outputs (small) stay, so the study's record is whole; a deleted trial is simply no ensemble candidate.
    Weights a running `hpsearch ensemble` has pinned (hpsearch.pins) wait until it is done."""

    def __init__(self, files: StudyArtifacts, keep: int) -> None:
        self.files = files
        self.keep = keep
        self.removed: set[str] = set()  # not asked of the store again at every later trial

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not self.keep:
            return
        # With folds a trial keeps one weights file per fold; each is listed under the trial that uploaded it.
        losers = [pair for t in ranked_trials(study)[self.keep:] for pair in trial_weights(t)]
        losers = [(number, artifact) for number, artifact in losers if artifact not in self.removed]
        if not losers:
            return
        held = pinned(study.user_attrs)  # read after the ranking: a pin set since then is seen here
        for number, artifact in losers:
            if artifact not in held:
                self.files.delete(number, artifact)
                self.removed.add(artifact)


class StopOnFullStore:
    """The first trial whose files found no room in the store (ENOSPC, an S3 quota) stops the run at once: it
    is queued for retry (its checkpoint kept), and `line` says why; every later trial would only fail too."""

    def __init__(self) -> None:
        self.line: str | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and trial.user_attrs.get(keys.STORE_FULL):
            if not has_retry(study, trial.number):
                retry_failed(study, trial)
            self.line = str(trial.user_attrs.get(keys.FAIL_REASON, "artifacts: the store is full"))
            study.stop()


class StopOnBrokenDevice:
    """A trial that ended on a sticky device error stops this process's run at once (its CUDA context is
    unusable); it is not retried (the same configuration would likely break the next context too)."""

    def __init__(self) -> None:
        self.line: str | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and trial.user_attrs.get(keys.DEVICE_BROKEN):
            self.line = (f"trial {trial.number}: {trial.user_attrs.get(keys.FAIL_REASON, 'device error')}"[:300]
                         + "; this process's GPU context is unusable: it exits to start with a fresh one")
            study.stop()


@dataclass(frozen=True)
class Outcome:
    """How `run_trials` ended: a failure streak (`tripped`, after `limit` failures in a row), or a stop on
    purpose (`stopped`: the target reached, or `hpsearch stop`), or neither (the budget or the timeout)."""

    tripped: bool
    limit: int
    stopped: str | None = None


def run_trials(study: optuna.Study, objective: Objective, n_trials: int, *, timeout: float | None = None,
               callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = ()) -> Outcome:
    """Run until the study holds n_trials finished (COMPLETE + PRUNED) trials, the timeout, a failure streak,
    the study's target, or `hpsearch stop`; a full artifact store stops it at once with a StoreFullError."""
    started_at = time.time()
    cfg = objective.cfg
    guard = StopAfterFailures(cfg.study.max_consecutive_failures)
    reached = target_reached(study, cfg.study.target)
    if reached is not None:
        return Outcome(False, guard.limit, f"target {cfg.study.target} already reached by trial {reached.number}")
    if finished_trials(study) >= n_trials:
        return Outcome(False, guard.limit)
    stop_at_n = optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)
    keep = KeepBestWeights(objective.files, cfg.study.keep_weights if cfg.study.keep_weights is not None
                           else cfg.ensemble.top_k + 3)
    full = StopOnFullStore()
    broken = StopOnBrokenDevice()
    asked = StopWhenAsked(started_at, cfg.study.target)
    # What is alive now lives as long as the process (modules, the data pool, the study): frozen out of the
    # cycle collector, the collect after each trial (_free_after_trial) scans only what trials made. A full
    # collect over torch's import-time objects took a quarter of a second, twice a trial. Collected first:
    # garbage frozen would never be freed (a process, like the tests', may run this more than once).
    gc.collect()
    gc.freeze()
    with StopWatch(study, started_at) as watch:
        try:
            study.optimize(objective, timeout=timeout, catch=(Exception,),
                           callbacks=[RetryOutOfMemory(), full, broken, keep, *callbacks, stop_at_n, guard, asked,
                                      _free_after_trial])
        except KeyboardInterrupt:
            retry_interrupted(study)
            if watch.fired is None:
                raise
            return Outcome(False, guard.limit, watch.fired.line())  # `hpsearch stop --now`: asked, not a crash
    if full.line is not None:
        raise StoreFullError(full.line)
    if broken.line is not None:
        raise DeviceBrokenError(broken.line)
    return Outcome(guard.tripped, guard.limit, asked.request.line() if asked.request else None)


def retry_interrupted(study: optuna.Study) -> list[int]:
    """Queue the retry of each trial this process was running when Ctrl-C or SIGTERM came (Optuna has ended it
    FAIL); it resumes from the checkpoint the trial kept. Returns the interrupted trials' numbers."""
    me = keys.worker_tag()
    interrupted = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                   if t.user_attrs.get(keys.INTERRUPTED) and t.user_attrs.get(keys.WORKER) == me]
    for trial in interrupted:
        if not has_retry(study, trial.number):
            retry_failed(study, trial)
    return [t.number for t in interrupted]


def _free_after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    free_device_memory()
