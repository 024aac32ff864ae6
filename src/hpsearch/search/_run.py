"""Running a study: `open_run` (everything `run` and `worker` share, every check before any trial) and
`run_trials` (which trials run, until what; the callbacks around them are hpsearch.search._callbacks).

One trial's work is hpsearch.search._objective; the study's creation and resume checks hpsearch.search._study.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from hpsearch import keys
from hpsearch.config import StudyConfig, read_study_file
from hpsearch.data import StudyData
from hpsearch.errors import DeviceBrokenError, StoreFullError, UsageError
from hpsearch.model import check_study_model
from hpsearch.record import read_trial_record
from hpsearch.search._callbacks import (
    KeepBestWeights,
    RetryAfterStorageOutage,
    RetryOutOfMemory,
    StopAfterFailures,
    StopOnBrokenDevice,
    StopOnFullStore,
)
from hpsearch.search._memory import free_device_memory
from hpsearch.search._objective import Objective
from hpsearch.search._study import open_study, prepare
from hpsearch.slurm import cpus_per_task
from hpsearch.store import (
    FINISHED,
    ArtifactStore,
    RetryingStorage,
    StopWatch,
    StopWhenAsked,
    StudyArtifacts,
    fail_trials_of,
    finished_trials,
    has_retry,
    load_existing,
    open_artifact_store,
    open_storage,
    removed_if_refused,
    resolve_artifacts,
    resolve_storage_url,
    retry_failed,
    retrying,
    stop_generation,
    storage_outage,
    target_reached,
)
from hpsearch.train import resolve_device

_log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------- opening a command's study


@dataclass
class Run:
    """Everything `run` and `worker` share: validated config, storage, data, the study (created or resumed)."""

    cfg: StudyConfig
    url: str
    storage: optuna.storages.BaseStorage
    study: optuna.Study
    prepared: StudyData
    artifacts: str  # a folder or s3://bucket/prefix
    store: ArtifactStore  # opened once per process: for S3 that is one client and one bucket check
    device: torch.device
    n_trials: int
    overrides: tuple[str, ...] = ()  # `--set section.key=value` over the study file: its workers get them too

    def objective(self, **kwargs: Any) -> Objective:
        files = StudyArtifacts(self.store, self.storage, self.study.study_name, self.artifacts)
        return Objective(self.cfg, self.prepared, self.device, files, **kwargs)


def thread_share() -> int | None:
    """The CPU threads this process's torch may use: its supervisor's share of the machine (HPSEARCH_THREADS),
    else the CPUs its SLURM job holds (torch's default, every core of the node, would take other jobs' cores);
    None (torch's default) when neither says."""
    threads = os.environ.get("HPSEARCH_THREADS", "").strip()
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise UsageError(f"HPSEARCH_THREADS={threads!r} is not a number of threads; give a whole number from 1 "
                             f"or unset it")
        return int(threads)
    return cpus_per_task()


def open_run(study_file: str, *, storage: str | None = None, artifacts: str | None = None,
             device: str | None = None, n_trials: int | None = None, worker: int = 0,
             overrides: Sequence[str] = ()) -> Run:
    """Read the study file, open its storage and artifact store, load the data, create or resume the study.

    Every check runs here, before any trial exists: a bad file, device, URL, store or dataset is one line."""
    cfg = read_study_file(study_file, overrides)
    check_study_model(cfg)
    resolved = resolve_device(device or cfg.train.device)
    threads = thread_share()
    if threads is not None:
        use_threads(threads)
    url = resolve_storage_url(storage, cfg.study.storage)
    # Every call of this process (its trials', Optuna's, the supervisor's) rides out a storage outage; a SQLite
    # file made only to be refused (bad data, an unusable store) is not left behind.
    with removed_if_refused(url):
        opened = retrying(open_storage(url, heartbeat_interval=cfg.study.heartbeat_interval,
                                       heartbeat_grace=cfg.study.heartbeat_grace), cfg.study.storage_patience)
        prepared = prepare(cfg)
        location = resolve_artifacts(artifacts, load_existing(opened, cfg.study.name), cfg.study.artifacts)
        store = open_artifact_store(location)  # a store that cannot be used stops here, before any study or trial
        study = open_study(cfg, opened, prepared, location, worker=worker)
    return Run(cfg, url, opened, study, prepared, location, store, resolved, n_trials or cfg.study.n_trials,
               tuple(overrides))


def use_threads(threads: int) -> None:
    """This process's share of the CPU (HPSEARCH_THREADS, set by `run --workers N` for each worker): intra-op
    and inter-op threads alike. GPU workers too: each gathers batches, computes statistics and copies to its
    GPU on the host, and N workers each taking every core would fight over them."""
    torch.set_num_threads(threads)
    # Settable once, before any inter-op work: a second open_run in one process keeps the first's.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)


# -------------------------------------------------------------------------------------------- running


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
    started_at = time.monotonic()
    seen = stop_generation(study.user_attrs)  # the requests made before this start do not apply to it
    cfg = objective.cfg
    guard = StopAfterFailures(cfg.study.max_consecutive_failures)
    # First the trials whose worker died unseen (kill -9 of a whole `run`, a lost machine): FAIL, retry queued,
    # even when the study already holds its trials and Optuna's own check (at the next trial) would never come.
    optuna.storages.fail_stale_trials(study)
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
    asked = StopWhenAsked(seen, cfg.study.target)
    # What is alive now lives as long as the process (modules, the data pool, the study): frozen out of the
    # cycle collector, the collect after each trial (_free_after_trial) scans only what trials made. A full
    # collect over torch's import-time objects took a quarter of a second, twice a trial. Collected first:
    # garbage frozen would never be freed (a process, like the tests', may run this more than once).
    gc.collect()
    gc.freeze()
    every = [RetryOutOfMemory(), RetryAfterStorageOutage(), full, broken, keep, *callbacks, stop_at_n, guard, asked,
             _free_after_trial]
    with StopWatch(study, seen) as watch:
        while True:
            try:
                left = None if timeout is None else timeout - (time.monotonic() - started_at)
                if left is None or left > 0:
                    study.optimize(objective, timeout=left, catch=(Exception,), callbacks=every)
            except KeyboardInterrupt:
                retry_interrupted(study)
                if watch.fired is None:
                    raise
                return Outcome(False, guard.limit, watch.fired.line())  # `hpsearch stop --now`: asked, not a crash
            except Exception as err:
                outage = storage_outage(err)
                if outage is None:
                    raise
                # Outside a trial (Optuna's ask or tell, a callback): wait for the storage, end what this process
                # left RUNNING like a stop, and go on with the study.
                resume_after_outage(study, outage)
                continue
            break
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
                   if (record := read_trial_record(t)).interrupted and record.worker == me]
    for trial in interrupted:
        if not has_retry(study, trial.number):
            retry_failed(study, trial)
    return [t.number for t in interrupted]


def resume_after_outage(study: optuna.Study, outage: Exception) -> None:
    """After the storage was away past its patience: wait until it answers, then end FAIL (a retry queued, the
    checkpoint kept) the trials this process was running, which Optuna could not tell."""
    storage = study._storage
    _log.warning("%s; waiting for it to answer, then the study goes on", outage)
    waited = storage.wait_until_answering(study.study_name) if isinstance(storage, RetryingStorage) else 0.0
    reason = f"{outage} (answered again after {waited:.0f} s more); queued for retry"
    mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if read_trial_record(t).worker == keys.worker_tag()]
    for trial in mine:
        study._storage.set_trial_user_attr(trial._trial_id, keys.STORAGE_LOST, True)
    for number in fail_trials_of(storage, study, keys.worker_tag(), reason):
        _log.warning("trial %s FAIL: %s", number, reason)


def _free_after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    free_device_memory()
