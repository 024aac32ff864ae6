"""`hpsearch storage-proxy`: Optuna's gRPC proxy server in front of the database, failing the silent trials of
the workers behind it.

The client side (`grpc://` storages) is `_proxy`; this server opens the database through `_storage`, which opens
a client for `grpc://` URLs: apart, the two modules make no import circle.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

from hpsearch.errors import StorageError, first_line
from hpsearch.store._proxy import DEFAULT_HEARTBEAT_GRACE_S, DEFAULT_POOL_SIZE, PROXY_WAIT_S, is_proxy_url
from hpsearch.store._redact import redact
from hpsearch.store._retrying import retrying
from hpsearch.store._storage import open_storage

_log = logging.getLogger(__name__)


def serve(url: str, *, host: str, port: int, pool_size: int = DEFAULT_POOL_SIZE,
          heartbeat_grace: int = DEFAULT_HEARTBEAT_GRACE_S, echo: Any = print) -> None:
    """Run Optuna's proxy server for the database at `url` until interrupted (Ctrl-C or SIGTERM)."""
    if is_proxy_url(url) or url.startswith("journal:"):
        raise StorageError(f"storage-proxy: --storage {redact(url)} must be a database (postgresql+psycopg://... "
                           "or sqlite:///...); Optuna's proxy cannot serve a journal file or another proxy")
    check_s = max(1, heartbeat_grace // 10)
    backing = open_storage(url, heartbeat_interval=check_s, heartbeat_grace=heartbeat_grace, pool_size=pool_size)
    # Optuna's own advice: the proxy serves the cached storage (get_storage), not the bare RDBStorage. Its calls
    # ride out a database blip for a little less than a worker's call waits for the proxy: past that, the
    # worker is told the storage is unavailable (StorageUnavailableError.MARK) and retries on its own patience.
    storage = retrying(backing, PROXY_WAIT_S - 10)
    stop = threading.Event()
    checker = threading.Thread(target=_fail_stale_trials_every, args=(storage, check_s, stop), daemon=True,
                               name="hpsearch-stale-trials")
    checker.start()
    echo(f"storage proxy on grpc://{host}:{port} for {redact(url)} (at most {pool_size} database connections; "
         f"trials silent for {heartbeat_grace} s fail and are retried); workers use --storage grpc://"
         f"{host if host not in ('0.0.0.0', '::') else 'THIS-HOST'}:{port}; Ctrl-C stops it")
    try:
        optuna.storages.run_grpc_proxy_server(storage, host=host, port=port,
                                              thread_pool=ThreadPoolExecutor(max_workers=2 * pool_size))
    except RuntimeError as err:
        if "bind" in str(err).lower() or "port" in str(err).lower():
            raise StorageError(f"storage-proxy: cannot listen on {host}:{port} (in use?); pick another --port"
                               ) from None
        raise
    finally:
        stop.set()


def _fail_stale_trials_every(storage: BaseStorage, every_s: float, stop: threading.Event) -> None:
    """The heartbeat check the workers behind the proxy cannot run: fail their silent trials, queue retries."""
    while not stop.wait(every_s):
        try:
            for summary in storage.get_all_studies():
                study = optuna.load_study(study_name=summary.study_name, storage=storage)
                for trial in _stale_failed(study):
                    _log.warning("trial %s of %s FAIL: its worker stopped beating; queued a retry", trial.number,
                                 summary.study_name)
        except Exception as err:  # the database may be down for a while: check again later
            _log.warning("stale-trial check failed (%s); retrying in %.0f s",
                         first_line(err), every_s)


def _stale_failed(study: optuna.Study) -> list[FrozenTrial]:
    from optuna.trial import TrialState

    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    optuna.storages.fail_stale_trials(study)
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in before]
