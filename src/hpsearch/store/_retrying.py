"""Storage calls that ride out an outage: a dropped connection, a database restart or failover, the storage proxy
restarting, SQLite's write lock held past its busy timeout.

`RetryingStorage` wraps the storage of every process that runs trials (`run`, `worker`, the supervisor) and of
the storage proxy. A call that fails on a transient error (`transient_reason`) is retried with exponential
backoff (BACKOFF_S doubling up to BACKOFF_CAP_S) until `patience` seconds have passed since its first failure;
then it raises `StorageUnavailableError`. Any other error (a missing study, a finished trial) is raised at once.
What a trial does past the patience is hpsearch.search's business: it waits for the storage, then ends FAIL with
its checkpoint kept and one retry queued.

Writes are retried too. A write whose commit reached the database while its answer was lost is repeated:
setting an attribute, a parameter or a value twice is harmless, and a state change found already made is taken
as done. Creating a trial is the one write a lost answer can double: the extra trial stays WAITING or RUNNING
with no heartbeat and no worker, and `status` shows it (rare: the answer must be lost after the commit).
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

from hpsearch.errors import StorageUnavailableError, first_line
from hpsearch.store._redact import redact

_log = logging.getLogger(__name__)

DEFAULT_PATIENCE_S = 120.0
BACKOFF_S = 0.5  # the first wait after a failed call; it doubles at each retry ...
BACKOFF_CAP_S = 15.0  # ... up to this
WAIT_LOG_EVERY_S = 300.0  # how often `wait_until_answering` says it is still waiting

# Every storage call that reaches the database (or the proxy). The heartbeat's own beat is not here: it swallows
# its errors and beats again at the next interval, and must never hold up Optuna's heartbeat thread.
_STORAGE_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_all_studies", "create_new_trial", "set_trial_param", "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id", "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials", "get_n_trials",
    "get_best_trial", "get_trial_params", "get_trial_user_attrs", "get_trial_system_attrs",
    "_get_stale_trial_ids",
)

_C = TypeVar("_C", bound=type)


def transient_reason(err: BaseException) -> str | None:
    """One line when `err`, or an error it was raised from, is one a later call may not meet (a connection
    dropped or refused, a database restarting, a lock held too long, the proxy down); None otherwise."""
    import sqlalchemy.exc as sa_exc

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa_exc.DBAPIError) and (
                current.connection_invalidated or isinstance(current, sa_exc.OperationalError | sa_exc.InterfaceError)):
            return first_line(current.orig if current.orig is not None else current)
        if isinstance(current, sa_exc.DisconnectionError | sa_exc.TimeoutError):
            return first_line(current)
        grpc_line = _grpc_transient(current)
        if grpc_line is not None:
            return grpc_line
        current = current.__cause__ or current.__context__
    return None


def _grpc_transient(err: BaseException) -> str | None:
    code = getattr(err, "code", None)
    if code is None or type(err).__module__.split(".")[0] != "grpc":
        return None
    import grpc

    status = code()
    details = (err.details() or "") if hasattr(err, "details") else ""  # type: ignore[attr-defined]
    # UNKNOWN: the proxy's own storage call raised; it is transient when the proxy says its database is away.
    if status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or (
            status == grpc.StatusCode.UNKNOWN and StorageUnavailableError.MARK in details):
        return f"the storage proxy: {status.name}"
    return None


def _retried(name: str) -> Callable[..., Any]:
    def call(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        return self.call(name, *args, **kwargs)

    call.__name__ = name
    return call


def _with_storage_calls(cls: _C) -> _C:
    """Give the class one retried method per storage call (they all read alike: see `RetryingStorage.call`)."""
    for name in _STORAGE_CALLS:
        setattr(cls, name, _retried(name))
    abc.update_abstractmethods(cls)
    return cls


@_with_storage_calls
class RetryingStorage(BaseStorage, BaseHeartbeat):
    """`inner` (Optuna's cached RDB storage, the proxy client, a journal) with every call retried through a
    transient error for up to `patience_s` seconds (0: no retry). Anything else is the inner storage's."""

    def __init__(self, inner: BaseStorage, patience_s: float = DEFAULT_PATIENCE_S, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.inner = inner
        self.patience_s = patience_s
        self._sleep = sleep

    def __getattr__(self, name: str) -> Any:  # url, engine, close, ...: what callers read of the inner storage
        if name == "inner":  # not set yet (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def name(self) -> str:
        inner = getattr(self.inner, "_backend", self.inner)  # Optuna's cache in front of an RDB storage
        url = getattr(inner, "url", None)
        return redact(url) if url else type(inner).__name__

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`inner.method(*args, **kwargs)`, retried with backoff through transient errors for `patience_s`."""
        first_failure: float | None = None
        delay = BACKOFF_S
        while True:
            try:
                result = getattr(self.inner, method)(*args, **kwargs)
            except UpdateFinishedTrialError:
                if first_failure is not None and method == "set_trial_state_values" and self._already_set(
                        *args, **kwargs):
                    return True  # the first try's commit went through; only its answer was lost
                raise
            except Exception as err:
                why = transient_reason(err)
                if why is None:
                    raise
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                    _log.warning("storage %s: %s failed (%s); retrying for up to %.0f s", self.name, method, why,
                                 self.patience_s)
                waited = now - first_failure
                if waited >= self.patience_s:
                    raise StorageUnavailableError(self.name, waited, why) from err
                self._sleep(min(delay, self.patience_s - waited))
                delay = min(2 * delay, BACKOFF_CAP_S)
                continue
            if first_failure is not None:
                _log.warning("storage %s answers again after %.0f s", self.name, time.monotonic() - first_failure)
            return result

    def _already_set(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        return bool(self.inner.get_trial(trial_id).state == state)

    def wait_until_answering(self, study_name: str) -> float:
        """Block until the storage answers again (Ctrl-C stops the wait); the seconds waited."""
        started = time.monotonic()
        delay = BACKOFF_S
        said = started
        while True:
            try:
                self.inner.get_study_id_from_name(study_name)
                return time.monotonic() - started
            except Exception as err:
                why = transient_reason(err)
                if why is None:
                    raise
                if time.monotonic() - said >= WAIT_LOG_EVERY_S:
                    said = time.monotonic()
                    _log.warning("storage %s still unavailable after %.0f s (%s); waiting for it", self.name,
                                 said - started, why)
                self._sleep(delay)
                delay = min(2 * delay, BACKOFF_CAP_S)

    # -- what is not a database call: the inner storage's, unretried

    def record_heartbeat(self, trial_id: int) -> None:
        if isinstance(self.inner, BaseHeartbeat):
            self.inner.record_heartbeat(trial_id)

    def get_heartbeat_interval(self) -> int | None:
        return self.inner.get_heartbeat_interval() if isinstance(self.inner, BaseHeartbeat) else None

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None:
        if isinstance(self.inner, BaseHeartbeat):
            return self.inner.get_heartbeat_stale_trial_callback()
        return None

    def remove_session(self) -> None:
        self.inner.remove_session()

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self.inner.check_trial_is_updatable(trial_id, trial_state)


def retrying(storage: BaseStorage, patience_s: float = DEFAULT_PATIENCE_S) -> RetryingStorage:
    """`storage` as Optuna would use it (an RDB storage behind its cache), with its calls retried."""
    if isinstance(storage, RetryingStorage):
        return storage
    return RetryingStorage(optuna.storages.get_storage(storage), patience_s)


def storage_outage(err: BaseException) -> StorageUnavailableError | None:
    """The StorageUnavailableError `err` is, or was raised while handling (Optuna's tell after a failed trial
    may fail again on the way out); None when the storage was not the cause."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StorageUnavailableError):
            return current
        current = current.__context__ or current.__cause__
    return None

