"""Optuna's gRPC storage proxy in front of the database: `grpc://HOST:PORT` storages and `hpsearch storage-proxy`.

Without the proxy every worker holds its own database pool (up to 5 PostgreSQL connections); behind it, the
database sees only the proxy's pool, whatever the number of workers. Three things Optuna's proxy does not do
are added here:

- Heartbeats. `GrpcStorageProxy` is a plain storage (its protocol has no heartbeat call), so a worker that
  died behind it would stay RUNNING. A worker here beats by writing the trial system attr `keys.PROXY_BEAT`;
  the proxy's storage (`storage._RDBStorage`) records that as a heartbeat in the database, on the database's
  clock, and the proxy fails trials whose beats stopped (`--heartbeat-grace`) and queues their retries, as
  a direct worker's heartbeat check does.
- A proxy that restarts. Every call waits for the proxy to be reachable (gRPC's wait-for-ready) for at most
  `PROXY_WAIT_S`, then fails with one line; a call the proxy was answering when it went down fails at once.
- A bounded pool: the proxy's database pool has `pool_size` connections and no overflow, so `pool_size` is
  the whole of this project's connections to the database.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import optuna
from optuna.storages import BaseStorage, GrpcStorageProxy
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial

from hpsearch import keys
from hpsearch.errors import StorageError, first_line

_log = logging.getLogger(__name__)

SCHEME = "grpc://"
DEFAULT_PORT = 13000
DEFAULT_POOL_SIZE = 8
DEFAULT_HEARTBEAT_GRACE_S = 600  # the study files' own default
# How long a call waits for a proxy that is down (a restart, a redeploy) before it fails.
PROXY_WAIT_S = 60
CONNECT_TIMEOUT_S = 10

# gRPC's service config: every method waits for a ready channel instead of failing at once, up to a deadline.
_SERVICE_CONFIG = json.dumps({"methodConfig": [{"name": [{}], "waitForReady": True,
                                                "timeout": f"{PROXY_WAIT_S}s"}]})


def is_proxy_url(url: str) -> bool:
    return url.startswith(SCHEME)


def parse_proxy_url(url: str) -> tuple[str, int]:
    """`grpc://HOST[:PORT]` as (host, port); the port defaults to the proxy's."""
    from hpsearch.store._storage import redact

    rest = url.removeprefix(SCHEME).rstrip("/")
    host, colon, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host or "/" in rest or "@" in rest:  # the proxy takes no credentials: a URL with some is a mistake
        raise StorageError(f"storage: {redact(url)!r} is not a proxy URL; use grpc://HOST:PORT (e.g. grpc://"
                           f"127.0.0.1:{DEFAULT_PORT}), with no user or password")
    if not colon:
        return host, DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise StorageError(f"storage: port {port!r} of {redact(url)} is not a port number; use grpc://HOST:PORT")
    return host.strip("[]"), int(port)


class ProxyClient(GrpcStorageProxy, BaseHeartbeat):
    """Optuna's gRPC client, with heartbeats (through the proxy) and calls that ride out a proxy restart."""

    def __init__(self, host: str, port: int, heartbeat_interval: int | None = None) -> None:
        self._heartbeat_interval = heartbeat_interval
        self.url = f"{SCHEME}{host}:{port}"  # as an RDBStorage names itself, for error lines
        super().__init__(host=host, port=port)

    def _setup(self) -> None:
        super()._setup()
        # Optuna's channel fails a call at once while the proxy is down; ours waits for it (bounded). The stub
        # and cache are rebuilt on the new channel, of the same classes Optuna made.
        import grpc

        self._channel.close()
        self._channel = grpc.insecure_channel(
            f"{self._host}:{self._port}",
            options=[("grpc.max_receive_message_length", -1), ("grpc.service_config", _SERVICE_CONFIG),
                     ("grpc.enable_retries", 1)])
        self._stub = type(self._stub)(self._channel)
        self._cache = type(self._cache)(self._stub)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, keys.PROXY_BEAT, self._heartbeat_interval)
        except Exception as err:  # Optuna's heartbeat thread ends on the first error; a missed beat is no crash
            _log.warning("heartbeat of trial id %s missed (%s); retrying at the next beat", trial_id,
                         proxy_failure(err) or type(err).__name__)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return []  # the proxy finds stale trials itself, on the database's clock (see serve)

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> None:
        return None


def open_proxy(url: str, heartbeat_interval: int | None = None) -> ProxyClient:
    host, port = parse_proxy_url(url)
    client = ProxyClient(host, port, heartbeat_interval or None)
    try:
        client.wait_server_ready(timeout=CONNECT_TIMEOUT_S)
    except ConnectionError:
        client.close()
        raise StorageError(f"storage: no storage proxy answers at {url} (waited {CONNECT_TIMEOUT_S} s); start one "
                           f"with `hpsearch storage-proxy --storage URL --port {port}` on {host}") from None
    return client


def proxy_failure(err: BaseException) -> str | None:
    """One line for a call the proxy did not answer (down longer than PROXY_WAIT_S, or gone mid-call)."""
    import grpc

    if not isinstance(err, grpc.RpcError) or not hasattr(err, "code"):
        return None
    code = err.code()
    details = (err.details() or "").splitlines()[0] if hasattr(err, "details") else ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"storage: the storage proxy did not answer for {PROXY_WAIT_S} s; is `hpsearch storage-proxy` running?"
    return f"storage: the storage proxy failed a call ({code.name}: {details}); is `hpsearch storage-proxy` running?"


# ---------------------------------------------------------------------------------------------- server


def serve(url: str, *, host: str, port: int, pool_size: int = DEFAULT_POOL_SIZE,
          heartbeat_grace: int = DEFAULT_HEARTBEAT_GRACE_S, echo: Any = print) -> None:
    """Run Optuna's proxy server for the database at `url` until interrupted (Ctrl-C or SIGTERM)."""
    from hpsearch.store._storage import open_storage, redact

    if is_proxy_url(url) or url.startswith("journal:"):
        raise StorageError(f"storage-proxy: --storage {redact(url)} must be a database (postgresql+psycopg://... "
                           "or sqlite:///...); Optuna's proxy cannot serve a journal file or another proxy")
    check_s = max(1, heartbeat_grace // 10)
    backing = open_storage(url, heartbeat_interval=check_s, heartbeat_grace=heartbeat_grace, pool_size=pool_size)
    # Optuna's own advice: the proxy serves the cached storage (get_storage), not the bare RDBStorage.
    storage = optuna.storages.get_storage(backing)
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
