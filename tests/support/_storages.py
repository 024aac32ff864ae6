"""The storages and artifact stores tests run against: SQLite, the PostgreSQL server (a fresh database
per test), a real `hpsearch storage-proxy` process in front of it, a folder and S3 (moto's server)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support._studies import cli_env

PG_ADMIN_URL = os.environ.get("HPSEARCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

# Every storage backend tests run against; PostgreSQL is the real server on 127.0.0.1:5432.
STORAGES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
# ... and, for what a worker does through the storage API, the same through a real `hpsearch storage-proxy`
# process in front of a fresh PostgreSQL database (its heartbeat grace is 3 s, like the kill tests' studies).
PROXIED = pytest.param("grpc", marks=pytest.mark.postgres)
STORAGES_AND_PROXY = [*STORAGES, PROXIED]
PROXY_GRACE_S = 3


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


def postgres_database() -> Iterator[str]:
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


class DatabaseOutage:
    """A PostgreSQL database made unreachable, as a restart or a failover makes it: new connections refused
    (`ALLOW_CONNECTIONS false`), open ones terminated; `end()` (or leaving the `with`) lets connections in again."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.name = url.rsplit("/", 1)[1]
        self._admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        self._sa = sa

    def begin(self) -> int:
        """Refuse the database and drop its connections; how many were dropped."""
        with self._admin.connect() as conn:
            conn.execute(self._sa.text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false'))
            return int(conn.execute(self._sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                                  "WHERE datname = :db"), {"db": self.name}).scalar() or 0)

    def end(self) -> None:
        with self._admin.connect() as conn:
            conn.execute(self._sa.text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true'))

    def __enter__(self) -> DatabaseOutage:
        self.begin()
        return self

    def __exit__(self, *_: object) -> None:
        self.end()
        self._admin.dispose()


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


def s3_keys(bucket: str, prefix: str = "") -> dict[str, int]:
    """Key -> size of every object under `prefix` in the test S3 server's `bucket`."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"]: obj["Size"] for page in pages for obj in page.get("Contents", [])}
