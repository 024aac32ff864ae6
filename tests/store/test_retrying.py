"""A storage call rides out a database outage (RetryingStorage): against the real PostgreSQL server, a database
made unreachable as a restart or failover makes it (connections refused and dropped)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import optuna
import pytest

from hpsearch.errors import StorageUnavailableError
from hpsearch.store import open_storage, retrying
from tests.support import DatabaseOutage, postgres_database

pytestmark = pytest.mark.postgres


@pytest.fixture
def database() -> Iterator[str]:
    yield from postgres_database()


def _end_after(outage: DatabaseOutage, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, outage.end)
    timer.start()
    return timer


def test_a_call_waits_out_an_outage_shorter_than_its_patience(database: str) -> None:
    bare = open_storage(database)
    study = optuna.create_study(study_name="blip", storage=bare)
    storage = retrying(open_storage(database), patience_s=60)
    assert [s.study_name for s in storage.get_all_studies()] == ["blip"]  # its pooled connection exists now
    with DatabaseOutage(database) as outage:
        # The fault is real: the bare storage fails the call at once.
        with pytest.raises(optuna.exceptions.StorageInternalError):
            bare.get_all_studies()
        timer = _end_after(outage, 2.0)
        started = time.monotonic()
        study_id = storage.get_study_id_from_name("blip")
        waited = time.monotonic() - started
        timer.join()
    assert study_id == study._study_id
    assert 1.5 <= waited < 30, waited
    storage.set_study_user_attr(study_id, "after", 1)  # writes go on too
    assert optuna.load_study(study_name="blip", storage=bare).user_attrs == {"after": 1}


def test_past_its_patience_a_call_fails_in_one_line_naming_the_storage(database: str) -> None:
    optuna.create_study(study_name="down", storage=open_storage(database))
    storage = retrying(open_storage(database), patience_s=1.5)
    with DatabaseOutage(database):
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError) as caught:
            storage.get_study_id_from_name("down")
        elapsed = time.monotonic() - started
    line = str(caught.value)
    assert "\n" not in line
    assert database.rsplit("/", 1)[1] in line and "storage unavailable" in line, line
    assert 1.5 <= elapsed < 15, elapsed


def test_what_is_not_an_outage_is_raised_at_once(database: str) -> None:
    storage = retrying(open_storage(database), patience_s=60)
    started = time.monotonic()
    with pytest.raises(KeyError):
        storage.get_study_id_from_name("no-such-study")
    assert time.monotonic() - started < 5


def test_wait_until_answering_returns_once_the_database_is_back(database: str) -> None:
    optuna.create_study(study_name="wait", storage=open_storage(database))
    storage = retrying(open_storage(database), patience_s=1)
    with DatabaseOutage(database) as outage:
        timer = _end_after(outage, 3.0)
        waited = storage.wait_until_answering("wait")
        timer.join()
    assert 2.5 <= waited < 40, waited
    assert storage.get_study_id_from_name("wait") >= 0
