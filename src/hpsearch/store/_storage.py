"""`open_storage(url)`: the one place a storage is built, in every process (workers and dashboard too).

- `sqlite:///file.db`: every transaction starts with `BEGIN IMMEDIATE` (exactly-once trial pops with
  several workers), WAL journal (the dashboard reads beside a writer) and a busy timeout.
- `postgresql+psycopg://user@host/db`: `pool_pre_ping` (Optuna sets it only for MySQL, and long trials
  otherwise find their pooled connection dropped) and a small pool per process.
- `journal:///path/file.log`: Optuna's journal file storage, for shared filesystems without a database.
- `grpc://host:13000`: Optuna's gRPC storage proxy in front of one of the above (`hpsearch storage-proxy`; see
  _proxy.py and _proxy_server.py), for many workers on one database.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from hpsearch import keys
from hpsearch.errors import HpsearchError, StorageError, first_line
from hpsearch.store._redact import redact

_log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///hpsearch.db"
SQLITE_BUSY_TIMEOUT_S = 60


def resolve_storage_url(cli: str | None, study_file: str | None) -> str:
    """--storage > HPSEARCH_STORAGE > [study] storage > sqlite:///hpsearch.db."""
    return cli or os.environ.get("HPSEARCH_STORAGE") or study_file or DEFAULT_STORAGE


class _RDBStorage(optuna.storages.RDBStorage):
    """RDBStorage whose heartbeat survives a dropped connection.

    Optuna's heartbeat thread ends on the first database error, after which a live trial looks dead and
    is failed by another worker. A missed beat is logged instead; the next one reconnects (pool_pre_ping).

    Behind the storage proxy, a worker's beat arrives as the trial system attr `keys.PROXY_BEAT`: it is
    recorded as a heartbeat (on the database's clock), never stored as an attribute.
    """

    _warned_grace = False

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if key == keys.PROXY_BEAT:  # its value: the worker's heartbeat interval
            self.record_heartbeat(trial_id)
            grace = self.grace_period
            if isinstance(value, int | float) and grace and value >= grace and not self._warned_grace:
                self._warned_grace = True
                _log.warning("workers beat every %s s but the proxy's --heartbeat-grace is %s s: their trials "
                             "will be failed as stale; raise --heartbeat-grace above the studies' "
                             "heartbeat_interval", value, grace)
            return
        super().set_trial_system_attr(trial_id, key, value)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as err:  # the thread must live on whatever the driver raised
            _log.warning("heartbeat of trial id %s missed (%s); retrying at the next beat", trial_id,
                         first_line(err))


def retry_callback() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    """How every failed trial that deserves it is retried (stale heartbeat, dead worker, out of memory): once,
    with the same parameters, inheriting the reported epochs so the retry resumes from its checkpoint."""
    return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1, inherit_intermediate_values=True)


def _heartbeat_kwargs(interval: int | None, grace: int | None) -> dict[str, Any]:
    if not interval:
        return {}
    return {
        "heartbeat_interval": interval,
        "grace_period": grace or 10 * interval,
        # A trial whose worker died on another machine becomes FAIL and is retried once, same params.
        "heartbeat_stale_trial_callback": retry_callback(),
    }


def open_storage(url: str, *, heartbeat_interval: int | None = None, heartbeat_grace: int | None = None,
                 reader: bool = False, pool_size: int | None = None,
                 existing: bool = False) -> optuna.storages.BaseStorage:
    """The storage behind `url`; with `heartbeat_interval` (seconds) RDB trials beat and stale ones retry.

    `reader=True` (the dashboard) keeps SQLite's deferred transactions: its reads then run beside a writer
    in WAL mode instead of queueing for the write lock the workers take with BEGIN IMMEDIATE. `pool_size`
    (the storage proxy) replaces PostgreSQL's small per-process pool by exactly that many connections.
    `existing=True` (the commands that only read a study) refuses a SQLite or journal file that is not there
    rather than create an empty one: a mistyped path is one line naming it, and leaves no file behind.
    """
    beat = _heartbeat_kwargs(heartbeat_interval, heartbeat_grace)
    if url.startswith("journal:"):
        return _journal(url, existing)
    if url.startswith("grpc:"):
        from hpsearch.store._proxy import open_proxy

        return open_proxy(url, heartbeat_interval)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise StorageError(f"storage: {redact(url)!r} is not a database URL; use e.g. sqlite:///hpsearch.db or "
                           "postgresql+psycopg://user@host:5432/db") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mysql"):
        raise StorageError(f"storage: {backend!r} databases are not supported ({redact(url)}); use "
                           "sqlite:///file.db, postgresql+psycopg://user@host:5432/db, journal:///path/file.log "
                           "or grpc://host:13000 (a storage proxy)")
    try:
        if backend == "sqlite":
            return _sqlite(url, parsed.database, beat, immediate=not reader, existing=existing)
        if backend == "postgresql":
            return _postgresql(url, beat, pool_size)
        return _RDBStorage(url, **beat)
    except StorageError:
        raise
    except Exception as err:
        raise StorageError(f"storage: cannot open {redact(url)} ({first_line(err)})") from None


@contextlib.contextmanager
def removed_if_refused(url: str) -> Iterator[None]:
    """Around opening a storage and what must be checked before the study is used: a SQLite or journal file that
    did not exist before and is refused within (bad data, an unusable artifact store) is removed again, so that a
    refused command leaves nothing behind."""
    path = _local_file(url)
    fresh = path is not None and not path.exists()
    try:
        yield
    except HpsearchError:
        if fresh and path is not None:
            for leftover in (path, *(path.with_name(path.name + end) for end in ("-wal", "-shm", "-journal"))):
                leftover.unlink(missing_ok=True)
        raise


def _local_file(url: str) -> Path | None:
    """The file a SQLite or journal URL names; None for a server, memory or a URL that does not parse."""
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:").removeprefix("//")).expanduser()
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return Path(database).expanduser()


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    """Give back what an opened storage holds: its database connections, or its channel to the proxy."""
    inner = getattr(storage, "_backend", storage)  # Optuna's cache wraps an RDBStorage
    if isinstance(inner, optuna.storages.RDBStorage):
        inner.engine.dispose()
    elif hasattr(inner, "close"):
        inner.close()


def _sqlite(url: str, database: str | None, beat: dict[str, Any], *,
            immediate: bool = True, existing: bool = False) -> optuna.storages.RDBStorage:
    if database and database != ":memory:":
        if existing:
            _require_file(Path(database), url)
        folder = Path(database).expanduser().resolve().parent
        if not folder.is_dir():
            raise StorageError(f"storage: folder {str(folder)!r} of {url} does not exist; create it first")
    storage = _RDBStorage(url, engine_kwargs={"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}, **beat)
    engine = storage.engine

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        # The driver's own deferred BEGIN lets two writers both read, then one fails to upgrade its lock
        # ("database is locked", or two workers popping one enqueued trial). Turn it off; see _begin.
        if immediate:
            dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.close()

    if immediate:

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            # Take the write lock up front: transactions queue on the busy timeout instead of failing midway.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    # Connections pooled before the listener existed would miss the pragmas.
    engine.dispose()
    return storage


def _postgresql(url: str, beat: dict[str, Any], pool_size: int | None = None) -> optuna.storages.RDBStorage:
    return _RDBStorage(
        url,
        **beat,
        engine_kwargs={
            "pool_pre_ping": True,
            # A worker: 2 pooled, 2 more under load. The proxy: exactly pool_size, so it bounds the project.
            "pool_size": pool_size or 2,
            "max_overflow": 0 if pool_size else 2,
            "connect_args": {"application_name": os.environ.get("HPSEARCH_APP_NAME", f"hpsearch-{os.getpid()}")},
        },
    )


def _require_file(path: Path, url: str) -> None:
    if not path.expanduser().is_file():
        raise StorageError(f"storage: {str(path)!r} does not exist ({redact(url)}); fix the path in --storage, "
                           "$HPSEARCH_STORAGE or [study] storage, or start the study with `hpsearch run STUDY.toml`")


def _journal(url: str, existing: bool = False) -> optuna.storages.JournalStorage:
    path = Path(url.removeprefix("journal:").removeprefix("//")).expanduser()
    if existing:
        _require_file(path, url)
    if not path.parent.is_dir():
        raise StorageError(f"storage: folder {str(path.parent)!r} of {url} does not exist; create it first")
    backend = optuna.storages.journal.JournalFileBackend(str(path))
    return optuna.storages.JournalStorage(backend)
