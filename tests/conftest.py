"""Shared fixtures: tiny study files, and every storage the product supports (one list, one fixture)."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

# Two cores, and worker subprocesses beside the test process: one torch thread each keeps timings steady
# (with two threads per process they spin-wait on each other under load).
os.environ.setdefault("HPSEARCH_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Decoded image folders go to a cache of this test run's own (kept by cli_env for the processes tests start),
# never to the user's ~/.cache.
os.environ["HPSEARCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="hpsearch-test-cache-")
atexit.register(shutil.rmtree, os.environ["HPSEARCH_CACHE_DIR"], ignore_errors=True)

PG_ADMIN_URL = os.environ.get("HPSEARCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

# Every storage backend tests run against; PostgreSQL is the real server on 127.0.0.1:5432.
STORAGES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
# ... and, for what a worker does through the storage API, the same through a real `hpsearch storage-proxy`
# process in front of a fresh PostgreSQL database (its heartbeat grace is 3 s, like the kill tests' studies).
PROXIED = pytest.param("grpc", marks=pytest.mark.postgres)
STORAGES_AND_PROXY = [*STORAGES, PROXIED]
PROXY_GRACE_S = 3


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def write_study(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    """Write a study file; nested dicts become sub-tables ([space.step])."""
    lines: list[str] = []

    def emit(name: str, table: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        # None leaves a key out (an override that removes one of tiny_tables' defaults).
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict | None))
        lines.append("")
        for key, sub in subs.items():
            emit(f"{name}.{key}", sub)

    for name, table in tables.items():
        emit(name, table)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def tiny_tables(name: str = "tiny", **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A study that trains in seconds: 240 digits, 16 px, 1 epoch, a small ResNet-18."""
    tables: dict[str, dict[str, Any]] = {
        "study": {"name": name, "n_trials": 2, "sampler": "random", "pruner": "none", "seed": 0},
        "data": {"dataset": "digits", "image_size": 32, "subset": 240, "augment": ["crop"]},
        "model": {"arch": "resnet18", "weights": "none"},
        # A checkpoint at every epoch end (the default is by minutes): the kill tests resume them.
        "train": {"epochs": 1, "batch_size": 32, "device": "cpu", "checkpoint_every": 1},
        "space": {"lr": [1e-3, 3e-3], "optimizer": ["adam", "rmsprop"], "scheduler": ["step", "exponential",
                  "plateau"], "dropout": [0.0, 0.3]},
        "ensemble": {"top_k": 2},
    }
    for table, values in overrides.items():
        tables.setdefault(table, {}).update(values)
    return tables


# Process-level tests start workers of their own and time what those do: one at a time (one xdist group),
# beside the fast tests, which pytest-xdist spreads over the other cores.
PROCESS_LEVEL_GROUP = "process-level"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the xdist_group marks into groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("inprocess") is None:
            item.add_marker(pytest.mark.xdist_group(PROCESS_LEVEL_GROUP))


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """pytest-xdist groups tests by a suffix it adds to their node ids; should a pytest and xdist pairing stop
    doing that, the process-level tests would run two at a time and time each other: stop the run instead."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    ungrouped = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") is not None
                 and not item.nodeid.endswith(f"@{PROCESS_LEVEL_GROUP}")]
    if ungrouped:
        raise pytest.UsageError(f"pytest-xdist did not group {len(ungrouped)} process-level tests (e.g. "
                                f"{ungrouped[0]}): install the pytest that pyproject's test extra names")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under CI a skip is a failure, except a GPU test on a machine without one: every extra the tests need
    (PostgreSQL, docker compose, moto, ONNX) is installed there, so a skip means a broken setup."""
    report = yield
    if (os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail")
            and item.get_closest_marker("gpu") is None):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"unexpected skip under CI: {reason}"
    return report


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(int(os.environ["HPSEARCH_THREADS"]))


@pytest.fixture
def dead_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every download goes to a dead local proxy, whatever network the test machine has: a test never fetches
    170 MB of CIFAR or a weights file, and its failure path is the one an offline user sees."""
    import urllib.request

    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    urllib.request.install_opener(None)  # an opener built earlier read the old proxies; the next one reads these
    yield
    urllib.request.install_opener(None)


@pytest.fixture
def study_file(tmp_path: Path) -> Callable[..., Path]:
    """study_file(name=..., study={...}, data={...}, ...) -> path of a tiny study TOML in tmp_path."""

    def make(name: str = "tiny", **overrides: dict[str, Any]) -> Path:
        return write_study(tmp_path / f"{name}.toml", tiny_tables(name, **overrides))

    return make


def cli_env(**extra: str | None) -> dict[str, str]:
    """The user's environment without hpsearch settings of its own (HPSEARCH_STORAGE, HPSEARCH_ARTIFACTS, ...),
    a wide terminal so tables are not cut, and one CPU thread for torch; a None value removes that variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_") and k != "OPTUNA_STORAGE"}
    env.update(COLUMNS="200", PYTHONUNBUFFERED="1", HPSEARCH_THREADS="1",
               HPSEARCH_CACHE_DIR=os.environ["HPSEARCH_CACHE_DIR"])
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 300, **extra: str | None) -> subprocess.CompletedProcess[str]:
    """`hpsearch ARGS` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "hpsearch", *args], cwd=cwd, env=cli_env(**extra),
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_postgres() -> None:
    """Skip (fail under CI) when the PostgreSQL server is not reachable."""
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL)
    try:
        with admin.connect():
            pass
    except sa.exc.OperationalError as err:
        _unreachable(err)
    finally:
        admin.dispose()


def _unreachable(err: Exception) -> None:
    reason = f"PostgreSQL at {PG_ADMIN_URL} is not reachable ({str(err).splitlines()[0]}); start it (see .ci/run)"
    if os.environ.get("CI"):
        pytest.fail(reason)  # CI must run the PostgreSQL tests, never skip them
    pytest.skip(reason)


def _postgres_database() -> Iterator[str]:
    import sqlalchemy as sa

    db = f"hpsearch_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{db}"'))
    except sa.exc.OperationalError as err:
        _unreachable(err)
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{db}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=STORAGES)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty storage of each supported kind: a real SQLite file, a real PostgreSQL database (and with
    `parametrize(..., STORAGES_AND_PROXY, indirect=True)`, that database behind a real storage proxy)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'study.db'}"
    elif request.param == "grpc":
        for database in _postgres_database():
            with storage_proxy(database, tmp_path / "proxy.out") as proxy:
                yield proxy.url
    else:
        yield from _postgres_database()


class Proxy:
    """A running `hpsearch storage-proxy` process; `restart()` stops it (SIGTERM) and starts it on its port."""

    def __init__(self, database: str, log: Path, grace: int, pool_size: int) -> None:
        self.database, self.log, self.port = database, log, free_port()
        self.argv = [sys.executable, "-m", "hpsearch", "storage-proxy", "--port", str(self.port),
                     "--heartbeat-grace", str(grace), "--pool-size", str(pool_size)]
        self.url = f"grpc://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            # The database URL travels in the environment, as the README tells operators to pass it.
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                            env=cli_env(HPSEARCH_STORAGE=self.database), start_new_session=True)
        deadline = time.monotonic() + 60
        while not _listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"storage proxy did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def storage_proxy(database: str, log: Path, *, grace: int = PROXY_GRACE_S, pool_size: int = 4) -> Iterator[Proxy]:
    proxy = Proxy(database, log, grace, pool_size)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# Every kind of artifact store: a folder, and S3 (moto's S3 server over HTTP, reached through boto3 exactly as
# a worker reaches AWS or MinIO: credentials and endpoint from the environment).
ARTIFACT_STORES = ["folder", "s3"]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3 API server on 127.0.0.1 for the session; this process and the workers it starts use it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "hpsearch-test", "AWS_SECRET_ACCESS_KEY": "hpsearch-test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by every `hpsearch` process a test starts
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the test S3 server."""
    import boto3

    name = f"hpsearch-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=ARTIFACT_STORES)
def artifacts_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh artifact store of each supported kind: a folder, an S3 prefix in a fresh bucket."""
    if request.param == "folder":
        return str(tmp_path / "artifacts")
    return f"s3://{request.getfixturevalue('s3_bucket')}/studies/{uuid.uuid4().hex[:8]}"


def fit_head(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int) -> None:
    """Fit a ResNet's head in closed form (ridge regression of one-hot labels on its features): trained-
    enough members for ensemble tests, without training."""
    fc = model.fc
    model.fc = nn.Identity()
    with torch.no_grad():
        f = model(x).double()
        f1 = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], dim=1)
        target = nn.functional.one_hot(y, classes).double() * 10 - 5
        w = torch.linalg.solve(f1.T @ f1 + 1e-2 * torch.eye(f1.shape[1], dtype=f.dtype), f1.T @ target)
        fc.weight.copy_(w[:-1].T.float())
        fc.bias.copy_(w[-1].float())
    model.fc = fc


@contextlib.contextmanager
def dashboard_http(url: str, artifacts: Path | str) -> Iterator[Callable[[str], tuple[int, bytes]]]:
    """optuna-dashboard (its WSGI app, as `hpsearch dashboard` serves it) on a real local port, in a thread;
    yields get(path) -> (HTTP status, body)."""
    import threading
    import urllib.error
    import urllib.request
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from optuna_dashboard import wsgi

    from hpsearch.store import open_artifact_store, open_storage

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    app = wsgi(open_storage(url, reader=True), artifact_store=open_artifact_store(artifacts, create=False))
    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(base + path, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.read()

    try:
        yield get
    finally:
        server.shutdown()
        server.server_close()


def dashboard_artifacts(get: Callable[[str], tuple[int, bytes]], study_id: int) -> dict[int, set[str]]:
    """Trial number -> the artifact ids the dashboard lists for it (its study API, as the web page reads it)."""
    import json

    status, body = get(f"/api/studies/{study_id}?after=0")
    assert status == 200, body
    return {t["number"]: {a["artifact_id"] for a in t["artifacts"]} for t in json.loads(body)["trials"]}
