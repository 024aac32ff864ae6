"""`open_storage` on real storages (a SQLite file, a fresh PostgreSQL database, a journal file), its refusals,
`resolve_storage_url` precedence and `redact`."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa

from hpsearch.store._storage import DEFAULT_STORAGE, StorageError, open_storage, redact, resolve_storage_url
from tests.support import PG_ADMIN_URL, STORAGES_AND_PROXY, require_postgres

POSTGRES_ONLY = pytest.mark.parametrize("storage_url", [pytest.param("postgresql", marks=pytest.mark.postgres)],
                                        indirect=True)


def one_trial(storage: optuna.storages.BaseStorage, name: str = "s") -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study.set_user_attr("split_sha256", "ab" * 32)
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True), n_trials=1)
    return study


def pg_activity(application_name: str) -> int:
    """Connections the server lists under this application_name (what a DBA sees in pg_stat_activity)."""
    admin = sa.create_engine(PG_ADMIN_URL)
    try:
        with admin.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
                                {"n": application_name}).scalar_one()
    finally:
        admin.dispose()


def pg_terminate(application_name: str) -> int:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            return len(conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                             "WHERE application_name = :n"), {"n": application_name}).all())
    finally:
        admin.dispose()


# ---------------------------------------------------------------------------------------- every kind


@pytest.mark.parametrize("storage_url", STORAGES_AND_PROXY, indirect=True)
def test_a_study_written_through_one_storage_is_read_through_another(storage_url):
    one_trial(open_storage(storage_url), "roundtrip")

    # A second process (a worker, the dashboard) opens the same URL afresh.
    study = optuna.load_study(study_name="roundtrip", storage=open_storage(storage_url))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]
    assert 1e-4 <= study.trials[0].params["lr"] <= 1e-1
    assert study.user_attrs["split_sha256"] == "ab" * 32
    # Plain Optuna reads it too (what `optuna trials --storage URL` does; a proxy through Optuna's own client).
    if storage_url.startswith("grpc://"):
        host, port = storage_url.removeprefix("grpc://").split(":")
        plain = optuna.storages.GrpcStorageProxy(host=host, port=int(port))
        assert optuna.get_all_study_names(storage=plain) == ["roundtrip"]
    else:
        assert optuna.get_all_study_names(storage=storage_url) == ["roundtrip"]


def test_engine_is_configured_for_its_backend(storage_url, monkeypatch):
    app = f"hpsearch-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("HPSEARCH_APP_NAME", app)
    storage = open_storage(storage_url)
    assert isinstance(storage, optuna.storages.RDBStorage)
    with storage.engine.connect() as conn:
        if storage_url.startswith("sqlite"):
            # WAL on every pooled connection (the dashboard reads beside a writer) and a busy timeout.
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60_000
        else:
            assert storage.engine.pool._pre_ping is True
            name = conn.execute(sa.text("SELECT application_name FROM pg_stat_activity "
                                        "WHERE pid = pg_backend_pid()")).scalar_one()
            assert name == app
            assert pg_activity(app) >= 1  # visible to anyone looking at the server, while held


def test_sqlite_wal_persists_in_the_file(tmp_path):
    path = tmp_path / "study.db"
    one_trial(open_storage(f"sqlite:///{path}"))
    # WAL is a property of the database file: a plain connection that set nothing sees it too.
    import sqlite3

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@POSTGRES_ONLY
def test_postgresql_default_application_name_carries_the_pid(storage_url, monkeypatch):
    monkeypatch.delenv("HPSEARCH_APP_NAME", raising=False)
    storage = open_storage(storage_url)
    with storage.engine.connect():
        assert pg_activity(f"hpsearch-{os.getpid()}") >= 1


@POSTGRES_ONLY
def test_postgresql_survives_the_server_dropping_its_pooled_connection(storage_url, monkeypatch):
    app = f"hpsearch-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("HPSEARCH_APP_NAME", app)
    storage = open_storage(storage_url)
    study = one_trial(storage, "dropped")
    assert pg_terminate(app) >= 1  # a restart, an idle timeout, a failover: the pooled connection is dead

    # pool_pre_ping: the next use reconnects instead of raising "server closed the connection".
    assert [s.study_name for s in storage.get_all_studies()] == ["dropped"]
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True), n_trials=1)
    assert len(study.trials) == 2


@POSTGRES_ONLY
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_postgresql_heartbeat_is_recorded_after_a_dropped_connection(storage_url, monkeypatch):
    app = f"hpsearch-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("HPSEARCH_APP_NAME", app)
    storage = open_storage(storage_url, heartbeat_interval=1, heartbeat_grace=1)
    assert storage.get_heartbeat_interval() == 1
    assert isinstance(storage.get_heartbeat_stale_trial_callback(), optuna.storages.RetryHeartbeatStaleTrialCallback)
    study = optuna.create_study(study_name="beat", storage=storage)
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    assert pg_terminate(app) >= 1
    storage.record_heartbeat(trial._trial_id)  # must not raise: the beating thread would die with it

    # Only a trial that has beaten can go stale: once the grace passes it is failed and retried once.
    time.sleep(1.5)
    optuna.storages.fail_stale_trials(study)
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert study.trials[1].params == study.trials[0].params


def test_storage_without_heartbeat_by_default(tmp_path):
    assert open_storage(f"sqlite:///{tmp_path / 'study.db'}").get_heartbeat_interval() is None


def test_journal_file_storage_round_trips(tmp_path):
    log = tmp_path / "journal.log"
    url = f"journal://{log}"
    storage = open_storage(url)
    assert isinstance(storage, optuna.storages.JournalStorage)
    one_trial(storage, "journaled")
    assert log.is_file() and log.stat().st_size > 0

    study = optuna.load_study(study_name="journaled", storage=open_storage(url))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("url, words", [
    ("hpsearch.db", ["'hpsearch.db' is not a database URL", "sqlite:///hpsearch.db"]),
    ("", ["is not a database URL"]),
    ("redis://localhost:6379/0", ["'redis' databases are not supported", "postgresql+psycopg://"]),
])
def test_bad_url_is_one_clear_line(url, words):
    with pytest.raises(StorageError) as raised:
        open_storage(url)
    message = str(raised.value)
    assert message.startswith("storage: ")
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://hp:s3cret-pw@db.example:notaport/hp",  # parses up to the port, then fails
    "postgres ql://hp:s3cret-pw@db.example/hp",  # no URL at all
    "hp:s3cret-pw@db.example/hp",  # no scheme
])
def test_a_url_that_does_not_parse_is_refused_without_its_password(url):
    with pytest.raises(StorageError) as raised:
        open_storage(url)
    message = str(raised.value)
    assert "s3cret-pw" not in message and "hp:***@db.example" in message, message
    assert "is not a database URL" in message and "\n" not in message


def test_missing_sqlite_folder_is_named_and_not_created(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(StorageError) as raised:
        open_storage(f"sqlite:///{missing / 'study.db'}")
    assert str(missing) in str(raised.value) and "create it first" in str(raised.value)
    assert not (tmp_path / "no").exists()


def test_missing_journal_folder_is_named(tmp_path):
    with pytest.raises(StorageError) as raised:
        open_storage(f"journal://{tmp_path / 'nope' / 'journal.log'}")
    assert str(tmp_path / "nope") in str(raised.value) and "create it first" in str(raised.value)


@pytest.mark.postgres
def test_unreachable_postgresql_is_one_line_without_the_password():
    url = "postgresql+psycopg://hp:s3cret-pw@127.0.0.1:1/hp"  # nothing listens on port 1
    with pytest.raises(StorageError) as raised:
        open_storage(url)
    message = str(raised.value)
    assert "s3cret-pw" not in message
    assert "cannot open postgresql+psycopg://hp:***@127.0.0.1:1/hp" in message
    assert "Connection refused" in message and "\n" not in message


@pytest.mark.postgres
def test_missing_postgresql_database_is_named():
    require_postgres()
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/hpsearch_absent_{uuid.uuid4().hex[:8]}"
    with pytest.raises(StorageError) as raised:
        open_storage(url)
    assert "does not exist" in str(raised.value) and url.rsplit("/", 1)[1] in str(raised.value)


# --------------------------------------------------------------------------------- resolve, redact


def test_storage_url_precedence(monkeypatch):
    monkeypatch.delenv("HPSEARCH_STORAGE", raising=False)
    assert resolve_storage_url(None, None) == DEFAULT_STORAGE == "sqlite:///hpsearch.db"
    assert resolve_storage_url(None, "sqlite:///from-file.db") == "sqlite:///from-file.db"
    monkeypatch.setenv("HPSEARCH_STORAGE", "postgresql+psycopg://env@db/hp")
    assert resolve_storage_url(None, "sqlite:///from-file.db") == "postgresql+psycopg://env@db/hp"
    assert resolve_storage_url("sqlite:///cli.db", "sqlite:///from-file.db") == "sqlite:///cli.db"
    monkeypatch.setenv("HPSEARCH_STORAGE", "")  # set but empty counts as unset
    assert resolve_storage_url(None, "sqlite:///from-file.db") == "sqlite:///from-file.db"


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg://hp:s3cret@db.example:5432/hp", "postgresql+psycopg://hp:***@db.example:5432/hp"),
    ("postgresql+psycopg://hp@db.example/hp", "postgresql+psycopg://hp@db.example/hp"),
    ("sqlite:///hpsearch.db", "sqlite:///hpsearch.db"),
    ("journal:///shared/hp.log", "journal:///shared/hp.log"),
    ("not a url", "not a url"),
])
def test_redact_hides_only_the_password(url, shown):
    assert redact(url) == shown


def test_redact_hides_a_password_with_special_characters():
    shown = redact("postgresql+psycopg://hp:p%40ss%2Fw0rd@db/hp")
    assert "p%40ss" not in shown and "p@ss" not in shown and "w0rd" not in shown
    assert shown == "postgresql+psycopg://hp:***@db/hp"


@pytest.mark.parametrize("url, shown", [
    # SQLAlchemy parses this one, but ends the password at its first @ (its host would be "ss-s3cret@db").
    ("postgresql+psycopg://hp:p@ss-s3cret@db/hp", "postgresql+psycopg://hp:***@db/hp"),
    ("postgresql+psycopg://hp:p@ss-s3cret@db:5432/hp", "postgresql+psycopg://hp:***@db:5432/hp"),
    # ...and cannot parse these (a port that is no number; a : after the @ in the password).
    ("postgresql+psycopg://hp:p@ss-s3cret@db:port/hp", "postgresql+psycopg://hp:***@db:port/hp"),
    ("postgresql+psycopg://hp:p@s:s-s3cret@db/hp", "postgresql+psycopg://hp:***@db/hp"),
    # A / or ? in the password besides the @ (SQLAlchemy would read "s/ss-s3cret@db" as host and database).
    ("postgresql+psycopg://hp:p@s/ss-s3cret@db/hp", "postgresql+psycopg://hp:***@db/hp"),
    ("postgresql+psycopg://hp:p@s?s-s3cret@db/hp", "postgresql+psycopg://hp:***@db/hp"),
    ("postgresql+psycopg://hp:p@ss-s3cret@@db/hp", "postgresql+psycopg://hp:***@db/hp"),
    # A user name with an @ (user@server), and libpq's password query parameter.
    ("postgresql+psycopg://hp@server:s3cret@db/hp", "postgresql+psycopg://hp@server:***@db/hp"),
    ("postgresql+psycopg://hp@db/hp?sslmode=require&password=s3cret",
     "postgresql+psycopg://hp@db/hp?sslmode=require&password=***"),
    ("hp:p@ss-s3cret@db/hp", "hp:***@db/hp"),  # no scheme
])
def test_redact_hides_a_password_holding_an_unencoded_at(url, shown):
    assert redact(url) == shown
    assert "s3cret" not in redact(url)


def test_relative_sqlite_path_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_trial(open_storage("sqlite:///relative.db"))
    assert Path("relative.db").is_file()


def test_sqlite_reader_reads_while_a_worker_holds_the_write_lock(tmp_path: Path) -> None:
    """The dashboard's storage (reader=True) must not queue behind a worker's BEGIN IMMEDIATE (WAL readers)."""
    import sqlite3
    import threading

    url = f"sqlite:///{tmp_path / 'wal.db'}"
    optuna.create_study(study_name="watched", storage=open_storage(url))
    writer = sqlite3.connect(tmp_path / "wal.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # what a worker's transaction holds while it writes
    try:
        result: list[object] = []
        reader = threading.Thread(
            target=lambda: result.append(open_storage(url, reader=True).get_all_studies()), daemon=True)
        reader.start()
        reader.join(timeout=20)
        assert result and [s.study_name for s in result[0]] == ["watched"], "the reader waited for the writer"
        # A worker's storage, by contrast, queues for the lock (that is what makes trial pops exactly-once).
        blocked: list[object] = []
        worker = threading.Thread(target=lambda: blocked.append(open_storage(url).get_all_studies()), daemon=True)
        worker.start()
        worker.join(timeout=2)
        assert not blocked, "a worker's transaction should wait for the write lock"
    finally:
        writer.execute("ROLLBACK")
        writer.close()
