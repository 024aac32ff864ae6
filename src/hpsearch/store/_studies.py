"""Reading a study: open one that `run` created, count and rank its trials, follow its retries.

What `status`, `stop`, `dashboard`, the reports and the supervisor need, and nothing of training: this module
imports no torch, so the commands that only read a study start in about a second (`hpsearch.search`, which
creates studies and runs their trials, builds on it).
"""

from __future__ import annotations

import copy
import math

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from hpsearch import keys
from hpsearch.config import StudyConfig, read_study_file
from hpsearch.errors import UsageError
from hpsearch.record import read_trial_record
from hpsearch.store._storage import open_storage, redact, resolve_storage_url, retry_callback


def metric_name(metric: str) -> str:
    """The name of a study's objective (`[study] metric`), as Optuna and the dashboard show it: val_<metric>."""
    return f"val_{metric}"


METRIC_NAME = metric_name("accuracy")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def study_storage_name(storage: optuna.storages.BaseStorage) -> str:
    url = getattr(storage, "url", None)
    return redact(url) if url else type(storage).__name__


def load_existing(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def open_existing(study_file: str, storage: str | None = None) -> tuple[StudyConfig, optuna.Study, str]:
    """(config, study, storage url) for the commands that read a study `run` created; one line if it is absent."""
    cfg = read_study_file(study_file)
    url = resolve_storage_url(storage, cfg.study.storage)
    study = load_existing(open_storage(url, existing=True), cfg.study.name)
    if study is None:
        raise UsageError(f"study {cfg.study.name!r} does not exist in {redact(url)}; start it with "
                         f"`hpsearch run {study_file}` or pass the right --storage")
    return cfg, study, url


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def ranked_trials(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE trials with a finite value, best first by the study's direction (its metric's: highest accuracy,
    or lowest loss), ties: lower trial number first. Every ranking (status, keep_weights, the ensemble's
    candidates, the report) goes through here."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    return sorted(complete, key=lambda t: (sign * t.value, t.number))


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    ranked = ranked_trials(study)
    return ranked[0] if ranked else None


def has_retry(study: optuna.Study, number: int) -> bool:
    """Whether some trial already retries trial `number`."""
    history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history
    return any(history(t)[-1:] == [number] for t in study.get_trials(deepcopy=False))

def retry_failed(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue the one retry of a FAIL trial (same parameters and seed, resuming its checkpoint); the retry
    inherits its user attrs but not why it failed nor the worker that ran it."""
    failed = copy.copy(trial)
    failed.user_attrs = keys.without_failure(trial.user_attrs)
    retry_callback()(study, failed)


def fail_trials_of(storage: optuna.storages.BaseStorage, study: optuna.Study, tag: str, reason: str, *,
                   retry: bool = True) -> list[int]:
    """End the RUNNING trials of one (dead or stopped) worker FAIL and queue one retry of each (with `retry`);
    returns their numbers. A trial that finished first, by its worker or a heartbeat check, is left alone."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if read_trial_record(trial).worker == tag and fail_running_trial(storage, study, trial, reason, retry=retry):
            failed.append(trial.number)
    return failed


def fail_running_trial(storage: optuna.storages.BaseStorage, study: optuna.Study, trial: FrozenTrial, reason: str,
                       *, retry: bool) -> bool:
    """End another process's RUNNING trial FAIL with `reason`, and queue its retry unless one exists; False,
    changing nothing, when the trial finished first."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                               trial.number)
    try:
        storage.set_trial_user_attr(trial_id, keys.FAIL_REASON, reason)  # a finished trial refuses it
    except UpdateFinishedTrialError:
        return False
    told = study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    if told.state != TrialState.FAIL or read_trial_record(told).fail_reason != reason:
        return False
    if retry and not has_retry(study, trial.number):
        retry_failed(study, told)
    return True
