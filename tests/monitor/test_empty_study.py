"""A study with nothing to combine yet: `ensemble` says so in one line (exit 2); `status` and the dashboard
show it as it is, with no trial at all and with one trial still RUNNING."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from hpsearch.cli._main import main
from hpsearch.config import read_study_file
from hpsearch.search._study import open_study, prepare
from hpsearch.store import open_storage
from tests.support import dashboard_artifacts, dashboard_http


@pytest.fixture
def empty(study_file, tmp_path: Path) -> tuple[Path, str, Path]:
    """A study `run` created (its record, split and store) before any trial finished."""
    path = study_file("empty")
    url, store = f"sqlite:///{tmp_path / 'empty.db'}", tmp_path / "store"
    store.mkdir()
    cfg = read_study_file(path)
    open_study(cfg, open_storage(url), prepare(cfg), store)
    return path, url, store


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("running", [False, True], ids=["no trial", "one RUNNING"])
def test_ensemble_on_a_study_with_no_usable_trial_is_one_line(empty, running, tmp_path, capsys) -> None:
    path, url, store = empty
    if running:
        optuna.load_study(study_name="empty", storage=open_storage(url)).ask()
    rc = main(["ensemble", str(path), "--storage", url, "--artifacts", str(store), "--out", str(tmp_path / "ens")])
    assert rc == 2
    line = _one_line_error(capsys)
    assert line.startswith("error: study 'empty' has 0 usable trial(s)") and "at least 2" in line, line
    assert not (tmp_path / "ens").exists()


@pytest.mark.parametrize("running", [False, True], ids=["no trial", "one RUNNING"])
def test_status_and_dashboard_show_a_study_without_finished_trials(empty, running, capsys) -> None:
    path, url, store = empty
    if running:
        optuna.load_study(study_name="empty", storage=open_storage(url)).ask()
    assert main(["status", str(path), "--storage", url]) == 0
    out = capsys.readouterr().out
    assert "study 'empty'" in out and "best:" not in out
    assert ("running trials of 'empty'" in out) == running
    assert "no trial yet" in out if not running else "no finished trial yet" in out

    with dashboard_http(url, store) as get:
        status, body = get("/api/studies")
        assert status == 200 and b'"study_name": "empty"' in body.replace(b'":"', b'": "')
        study_id = open_storage(url).get_study_id_from_name("empty")
        assert dashboard_artifacts(get, study_id) == ({0: set()} if running else {})
