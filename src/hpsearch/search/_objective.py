"""One trial: suggest → train → report every epoch (the pruner may stop it) → store its artifacts → value.

With `[data] folds` the training is `hpsearch.cv_trial`'s: K fold models, one reported step per fold; the rest
(seed, retries, how a trial ends) is the same.

The objective is the only place a trial's training meets Optuna: `hpsearch.train` knows nothing of trials. A
trial records who runs it, its seed and starting weights first; a retried trial trains with its original's
seed and continues from its last checkpoint. A diverged trial ends PRUNED, one that ran out of memory FAIL with
`out_of_memory` (and is retried once), one whose files found no room in the store FAIL with `store_full` (the
run stops; retried once, from its kept checkpoint), any other crash FAIL with its reason and traceback.
"""

from __future__ import annotations

import logging
import os
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from hpsearch import keys
from hpsearch._testhooks import hold_at
from hpsearch.config import SpaceSection, StudyConfig
from hpsearch.data import StudyData, TrialData, trial_data
from hpsearch.errors import StorageUnavailableError, StoreFullError, first_line
from hpsearch.model import init_weights_tag
from hpsearch.record import read_trial_record
from hpsearch.search._cv_trial import CrossValidation
from hpsearch.search._memory import TrialOutOfMemory, free_device_memory, memory_in_use
from hpsearch.search._tracking import TrialLogs, TrialTracker
from hpsearch.store import (
    OUTPUTS_FILE,
    WEIGHTS_FILE,
    RetryingStorage,
    StudyArtifacts,
    TrialOutputs,
    download_to,
    free_bytes,
    remove_artifact,
    store_full_reason,
    upload_trial_artifacts,
)
from hpsearch.train import (
    Checkpoint,
    CheckpointWriter,
    EpochMetrics,
    Hyperparams,
    NonFiniteLoss,
    TrainResult,
    checkpoint_policy,
    gpu_identity,
    is_out_of_memory,
    is_sticky_device_error,
    out_of_memory_cause,
    out_of_memory_where,
    peak_memory_mib,
    reset_peak_memory,
    train_trial,
)
from hpsearch.units import size_text

_log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------- the space


def suggest(trial: optuna.Trial, space: SpaceSection) -> Hyperparams:
    """The space's parameters (`SpaceSection.parameters`: lr, optimizer, scheduler, dropout, each optional key it
    gives, and the chosen scheduler's own parameters, named uniquely per branch), suggested in that order."""
    params: dict[str, Any] = {}
    for param in space.parameters():
        if param.when is not None and param.when != params["scheduler"]:
            continue
        if param.kind == "choice":
            params[param.name] = trial.suggest_categorical(param.name, param.choices)
        elif param.kind == "int":
            params[param.name] = trial.suggest_int(param.name, int(param.low), int(param.high))
        else:
            params[param.name] = trial.suggest_float(param.name, param.low, param.high, log=param.log)
    return Hyperparams(**params)


Prepared = StudyData  # what every trial of a process shares: the data pool, the study's split and folds


@dataclass(frozen=True)
class _TrialStart:
    """How a trial starts: its hyperparameters and seed, the checkpoint it continues and the trial that wrote it."""

    hp: Hyperparams
    seed: int
    resume: Checkpoint | None
    resumed_from: FrozenTrial | None


# ------------------------------------------------------------------------------------------ objective


class Objective:
    """suggest → train → report every epoch (the pruner may stop it) → store artifacts → value."""

    def __init__(self, cfg: StudyConfig, prepared: Prepared, device: torch.device, files: StudyArtifacts,
                 on_epoch: Callable[[FrozenTrial | optuna.Trial, EpochMetrics], None] | None = None) -> None:
        self.cfg = cfg
        self.prepared = prepared
        self.device = device
        self.files = files
        self.store = files.store
        self.state_bytes = 0  # the model's weights in bytes, once a trial has saved some
        self.on_epoch = on_epoch
        self._writer: CheckpointWriter | None = None  # the running trial's background checkpoint writes
        # Recorded per trial: a greedy soup (hpsearch.soup) needs trials that started from the same weights. Per
        # architecture: with `[space] arch` a torchvision weights name means each one's own weights.
        self.init_weights = {arch: init_weights_tag(cfg.trial_model({"arch": arch}))
                             for arch in cfg.searched_archs or (cfg.model.arch,)}
        # The splits move to the device once per process, not once per trial.
        self.data = _place(prepared, cfg, device)
        # Built with the objective, when the run starts: a relative [tracking] log_dir is that moment's folder.
        self.trial_logs = TrialLogs(cfg.tracking, cfg.study.name)
        self.folds = None if prepared.folds is None else CrossValidation(
            cfg, prepared.pool, prepared.split, prepared.folds, self.data, device, files, self._checkpoint,
            self._drop_checkpoint, on_epoch)

    def __call__(self, trial: optuna.Trial) -> float:
        log = self.trial_logs.open(trial.number)
        value: float | None = None
        try:
            value = self._run_trial(trial, log)
            return value
        finally:
            # However the trial ends (pruned, crashed, interrupted): its parameters are written, the files flushed.
            log.finish(trial.params, value)

    def _run_trial(self, trial: optuna.Trial, log: TrialTracker) -> float:
        start = self._start(trial)
        out_of_memory: str | None = None
        try:
            with self._checkpoint_writes():  # leaving it, the last checkpoint is written: the attrs below see it
                value = self._train(trial, start, log)
        except NonFiniteLoss as err:
            # A diverged trial teaches the sampler "this region is bad": PRUNED, not FAIL (which TPE ignores).
            trial.set_user_attr(keys.PRUNED_REASON, str(err))
            self._discard(trial)
            raise optuna.TrialPruned(str(err)) from None
        except optuna.TrialPruned:
            self._discard(trial)
            raise
        except KeyboardInterrupt as stop:
            # Ctrl-C or SIGTERM (the CLI turns both into this): Optuna ends the trial FAIL; its checkpoint is
            # kept for the retry run_trials queues, which continues where this one stopped.
            trial.set_user_attr(keys.FAIL_REASON, f"interrupted ({stop or 'Ctrl-C'}); queued for retry")
            trial.set_user_attr(keys.INTERRUPTED, True)
            raise
        except StorageUnavailableError as outage:
            self._storage_lost(trial, outage)
            raise
        except Exception as err:
            out_of_memory = self._crashed(trial, err)
        if out_of_memory is not None:
            # Out here the exception and its frames (holding the trial's tensors) are gone: free them.
            free_device_memory()
            trial.set_user_attr(keys.FAIL_REASON, out_of_memory)
            trial.set_user_attr(keys.OUT_OF_MEMORY, True)
            raise TrialOutOfMemory(out_of_memory)
        self._drop_checkpoint(trial)
        if start.resumed_from is not None:
            self._drop_checkpoint(start.resumed_from)
        peak = peak_memory_mib(self.device)
        if peak is not None:
            trial.set_user_attr(keys.PEAK_GPU_MIB, peak)  # what --workers-per-gpu and batch_size are chosen by
        return value

    def _start(self, trial: optuna.Trial) -> _TrialStart:
        """Record who runs the trial, on what, from which seed and weights; find where a retry resumes."""
        # First: a supervisor finds a dead worker's trial by this tag.
        trial.set_user_attr(keys.WORKER, keys.worker_tag())
        hp = suggest(trial, self.cfg.space)
        # A retry trains with its original's seed: the same configuration, and a checkpoint it continues
        # reproduces the original exactly.
        retried = self._retried_trials(trial)
        seed = self.cfg.study.seed + (retried[0] if retried else trial).number
        recorded_seed = read_trial_record(retried[0]).seed if retried else None
        seed = recorded_seed if recorded_seed is not None else seed
        trial.set_user_attr(keys.SEED, seed)
        trial.set_user_attr(keys.DEVICE, str(self.device))
        if self.device.type == "cuda":  # which physical GPU: status tells GPUs apart
            trial.set_user_attr(keys.GPU, {**gpu_identity(self.device),
                                           "visible": os.environ.get("CUDA_VISIBLE_DEVICES")})
        trial.set_user_attr(keys.MEMORY_AT_START, memory_in_use(self.device))
        reset_peak_memory(self.device)
        trial.set_user_attr(keys.INIT_WEIGHTS, self.init_weights[self.cfg.trial_model(trial.params).arch])
        resume, resumed_from = self._resume_point(trial, retried)
        record = read_trial_record(trial)
        folds_done = len(record.folds)  # a retry inherits its original's finished folds
        if resume is not None or folds_done:
            epochs_done = resume.epoch + 1 if resume is not None else 0
            trial.set_user_attr(keys.RESUMED_FROM, {"trial": resumed_from.number if resumed_from else
                                                    (retried[-1].number if retried else None),
                                                    "epochs_done": epochs_done,
                                                    **({"folds_done": folds_done} if self.folds else {})})
        # A checkpoint of another fold than the first unfinished one is not this run's to continue.
        fold_resume = resume if record.checkpoint_fold == folds_done else None
        return _TrialStart(hp, seed, resume if self.folds is None else fold_resume, resumed_from)

    def _reporter(self, trial: optuna.Trial, log: TrialTracker) -> Callable[[EpochMetrics], None]:
        """Each epoch's metrics to the log, to Optuna (whose pruner may stop the trial here) and to on_epoch."""
        def report(metrics: EpochMetrics) -> None:
            log.epoch(metrics)
            trial.report(metrics.score, metrics.epoch)  # the study's metric: the pruner follows its direction
            if self.on_epoch is not None:
                self.on_epoch(trial, metrics)
            if trial.should_prune():
                reason = (f"pruned at epoch {metrics.epoch + 1}: val_{self.cfg.study.metric} {metrics.score:.4f} "
                          f"by the {self.cfg.study.pruner} pruner")
                trial.set_user_attr(keys.PRUNED_REASON, reason)
                raise optuna.TrialPruned(reason)

        return report

    def _train(self, trial: optuna.Trial, start: _TrialStart, log: TrialTracker) -> float:
        """Train (a single split, or the unfinished folds) and store the artifacts; the trial's value."""
        if self.folds is not None:
            return self.folds.run(trial, start.hp, start.seed, log, start.resume)
        result = train_trial(self.cfg.trial_model(trial.params), self.cfg.train, self.data, start.hp, seed=start.seed,
                             device=self.device, on_epoch=self._reporter(trial, log), resume=start.resume,
                             on_checkpoint=lambda c: self._checkpoint(trial, c),
                             checkpoint=checkpoint_policy(self.cfg.train), metric=self.cfg.study.metric)
        # Inside the try: a store that cannot be written must FAIL the trial with its reason too.
        self._store(trial, result)
        return result.best.score

    def _crashed(self, trial: optuna.Trial, err: Exception) -> str:
        """Record why the trial failed and re-raise `err`; an out-of-memory comes back as one line instead (the
        exception would keep the trial's tensors alive: the caller frees them once it is gone)."""
        if isinstance(err, StoreFullError) or store_full_reason(err) is not None:
            # Not the trial's fault: it is queued again (StopOnFullStore), its checkpoint kept for it.
            trial.set_user_attr(keys.FAIL_REASON, self._full_store_line(trial, err))
            trial.set_user_attr(keys.STORE_FULL, True)
            raise err
        if is_sticky_device_error(err):
            # The CUDA context is unusable now: every later trial of this process would fail too.
            trial.set_user_attr(keys.FAIL_REASON, f"device error ({type(err).__name__}): {err}"[:1000])
            trial.set_user_attr(keys.DEVICE_BROKEN, True)
            trial.set_user_attr(keys.FAIL_TRACEBACK, traceback.format_exc()[-4000:])
            self._discard(trial)  # not retried: its files would only take space
            raise err
        cause = out_of_memory_cause(err)
        if cause is not None:
            # The refusal itself, not what wrapped it (a compiled step's error names Inductor first).
            return f"out of memory on {out_of_memory_where(cause, self.device)}: {first_line(cause)[:500]}"
        trial.set_user_attr(keys.FAIL_REASON, f"{type(err).__name__}: {err}"[:1000])
        trial.set_user_attr(keys.FAIL_TRACEBACK, traceback.format_exc()[-4000:])
        self._discard(trial)  # nothing retries a crashed trial: its files would only take space
        raise err

    @staticmethod
    def _storage_lost(trial: optuna.Trial, outage: StorageUnavailableError) -> None:
        """The storage was away past `[study] storage_patience`: wait until it answers, then end the trial like a
        stop: FAIL, its checkpoint kept, one retry queued (RetryAfterStorageOutage), outside the failure streak."""
        storage = trial.study._storage
        _log.warning("trial %s: %s; waiting for it to answer, then the trial is queued for retry", trial.number,
                     outage)
        waited = storage.wait_until_answering(trial.study.study_name) if isinstance(storage, RetryingStorage) else 0
        reason = f"{outage} (answered again after {waited:.0f} s more); queued for retry"
        trial.set_user_attr(keys.FAIL_REASON, reason[:1000])
        trial.set_user_attr(keys.STORAGE_LOST, True)

    @staticmethod
    def _retried_trials(trial: optuna.Trial) -> list[FrozenTrial]:
        """The trials this one retries (same parameters), the first original first; [] for a new trial."""
        trials = trial.study.get_trials(deepcopy=False)  # numbered 0..n-1 in order: a list index is a number
        history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trials[trial.number])
        return [trials[number] for number in history]

    def _resume_point(self, trial: optuna.Trial,
                      retried: list[FrozenTrial]) -> tuple[Checkpoint | None, FrozenTrial | None]:
        """The last checkpoint among the trials this one retries, if any survived."""
        for original in reversed(retried):
            artifact = read_trial_record(original).checkpoint
            if not artifact:
                continue
            with tempfile.TemporaryDirectory(prefix="hpsearch-") as tmp:
                try:
                    path = download_to(self.store, artifact, Path(tmp), CHECKPOINT_FILE)
                    return Checkpoint.load(str(path)), original
                except Exception as err:  # a lost or unreadable checkpoint means starting over, not failing
                    _log.warning("trial %s: checkpoint of trial %s unusable (%s); starting from epoch 1",
                                 trial.number, original.number, err)
        return None, None

    @contextmanager
    def _checkpoint_writes(self) -> Iterator[None]:
        with CheckpointWriter() as self._writer:
            try:
                yield
            finally:
                self._writer = None

    def _checkpoint(self, trial: optuna.Trial, checkpoint: Checkpoint, hold_point: str | None = None,
                    **attrs: Any) -> None:
        """Write `checkpoint` (and then `attrs`) on the trial's writer thread while the next epoch trains."""
        writer = self._writer
        assert writer is not None, "checkpoints are taken only inside _checkpoint_writes"
        writer.submit(lambda: self._write_checkpoint(trial, checkpoint, attrs))
        # A test holding the trial here wants the checkpoint written when it kills or signals the worker.
        hold_at(hold_point or str(checkpoint.epoch + 1), before=writer.wait)

    def _write_checkpoint(self, trial: optuna.Trial, checkpoint: Checkpoint, attrs: dict[str, Any]) -> None:
        previous = read_trial_record(trial).checkpoint
        self.state_bytes = _nbytes(checkpoint.model)
        with tempfile.TemporaryDirectory(prefix="hpsearch-") as tmp:
            path = Path(tmp) / CHECKPOINT_FILE
            checkpoint.save(str(path))
            # Not listed for the dashboard: a checkpoint lives only until the next one.
            artifact = self.files.upload(trial.number, path, listed=False)
        trial.set_user_attr(keys.CHECKPOINT, artifact)
        trial.set_user_attr(keys.CHECKPOINT_EPOCH, checkpoint.epoch + 1)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if previous:
            remove_artifact(self.store, previous)

    def _discard(self, trial: optuna.Trial) -> None:
        """A trial that ends without a retry and is no ensemble member: its checkpoint, and its fold weights."""
        self._drop_checkpoint(trial)
        if self.folds is not None:
            self.folds.drop_weights(trial)

    def _drop_checkpoint(self, trial: optuna.Trial | FrozenTrial) -> None:
        if self._writer is not None and isinstance(trial, optuna.Trial):
            self._writer.wait()  # a write still pending would bring the checkpoint back after the drop
        artifact = read_trial_record(trial).checkpoint
        if artifact:
            remove_artifact(self.store, artifact)

    def _store(self, trial: optuna.Trial, result: TrainResult) -> None:
        # Test outputs are stored for the ensemble's final report only; no test metric is set anywhere. The
        # calibration outputs are the ensemble's to fit on; nothing here reads them.
        calibration = self.data.calibration
        outputs = TrialOutputs(result.val_logits, result.test_logits, self.prepared.split.sha256(),
                               self.data.val.labels.cpu(), self.data.test.labels.cpu(),
                               calibration_logits=result.calibration_logits,
                               calibration_labels=None if calibration is None else calibration.labels.cpu())
        metadata = {"arch": self.cfg.trial_model(trial.params).arch, "num_classes": str(self.data.num_classes),
                    "trial": str(trial.number)}
        self.state_bytes = _nbytes(result.state_dict)
        upload_trial_artifacts(self.files, trial, result.state_dict, outputs, metadata)
        for key, value in result.summary().items():
            trial.set_user_attr(key, value)

    def _full_store_line(self, trial: optuna.Trial, err: Exception) -> str:
        """One line: the store, its free space, what a trial needs, the fix, and the retry."""
        why = str(err) if isinstance(err, StoreFullError) else f"{store_full_reason(err)} writing {err}"
        free = free_bytes(self.files.location)
        sizes = self.files.sizes
        weights = sizes.get(WEIGHTS_FILE, self.state_bytes)
        outputs = sizes.get(OUTPUTS_FILE, 0)
        checkpoint = sizes.get(CHECKPOINT_FILE, 0)
        # While a trial runs, its new checkpoint is written before the last one is deleted: two at once.
        need = weights + outputs + 2 * checkpoint
        parts = [f"weights {size_text(weights)}", f"outputs {size_text(outputs)}"] + (
            [f"2 checkpoints of {size_text(checkpoint)}"] if checkpoint else [])
        return (f"artifacts: the store is full ({why}): {size_text(free) if free is not None else 'its quota'} free, a "
                f"trial needs about {size_text(need)} ({', '.join(parts)}); free space there or move the store "
                f"(--artifacts or HPSEARCH_ARTIFACTS), then run again: trial {trial.number} is queued for retry")


CHECKPOINT_FILE = "checkpoint.pt"
GPU_SHARERS_ENV = "HPSEARCH_GPU_SHARERS"  # set by `run --workers` for each GPU worker (hpsearch.workers)


def _place(prepared: Prepared, cfg: StudyConfig, device: torch.device) -> TrialData:
    """The worker's splits on its device, resident within its share of the GPU when they fit. Out of memory
    here comes before any trial, where no retry would help and a restarted worker would only run out again:
    the splits stream from the host instead, said in one line."""
    sharers = int(os.environ.get(GPU_SHARERS_ENV) or 1)
    try:
        return trial_data(prepared.pool, prepared.split, cfg.data, cfg.model.pretrained, device, sharers=sharers)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        failed = first_line(out_of_memory_cause(err) or err)[:300]  # a string: no frame outlives the block
    free_device_memory()  # out of the except block: the partial copies its frames held are gone
    _log.warning("data: the splits did not fit on %s (%s); streaming them from the host instead (set [data] "
                 "placement = \"stream\" to skip the attempt)", device, failed)
    return trial_data(prepared.pool, prepared.split, cfg.data, cfg.model.pretrained, device, placement="stream")


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))

