"""Shared fixtures: tiny study files, every storage and artifact store the product supports (one list, one
fixture each), the processes a test starts, and the exports the export and predict tests read; the hooks that run
the process-level tests one at a time. Plain helpers are in tests/support/."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    ARTIFACT_STORES,
    STORAGES,
    Exported,
    Lab,
    Procs,
    build_export,
    free_port,
    make_lab,
    postgres_database,
    storage_proxy,
    tiny_tables,
    write_study,
)

# Two cores, and worker subprocesses beside the test process: one torch thread each keeps timings steady
# (with two threads per process they spin-wait on each other under load).
os.environ.setdefault("HPSEARCH_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Decoded image folders go to a cache of this test run's own (kept by cli_env for the processes tests start),
# never to the user's ~/.cache.
os.environ["HPSEARCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="hpsearch-test-cache-")
atexit.register(shutil.rmtree, os.environ["HPSEARCH_CACHE_DIR"], ignore_errors=True)

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


@pytest.fixture(params=STORAGES)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty storage of each supported kind: a real SQLite file, a real PostgreSQL database (and with
    `parametrize(..., STORAGES_AND_PROXY, indirect=True)`, that database behind a real storage proxy)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'study.db'}"
    elif request.param == "grpc":
        for database in postgres_database():
            with storage_proxy(database, tmp_path / "proxy.out") as proxy:
                yield proxy.url
    else:
        yield from postgres_database()


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


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    started = Procs(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """An exported ensemble of a real, untrained study (tests.support.build_export), built once per module."""
    return build_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """A fine-tuned model and its "pretrained" weights file (tests.support.make_lab), built once per module."""
    return make_lab(tmp_path_factory.mktemp("soup"))
