"""Stopping on purpose: `hpsearch stop` (after the current trial, or `--now`) with two real workers held mid-trial;
a later `run` resumes the study. Stop requests themselves and `[study] target` are in tests/store/test_stopping.py."""

from __future__ import annotations

import getpass
import socket
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch._testhooks import HOLD_ENV
from hpsearch.store import open_storage, stop_request
from tests.support import Procs, held_trials, hpsearch_argv, run_cli, states_of, tiny_tables, trials_of, write_study

STOP_NOW_TO_FAIL_S = 30.0  # the watch looks every 2 s; then the interrupted trial is told FAIL


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("now", [False, True], ids=["after-the-trial", "now"])
def test_stop_reaches_both_workers(now: bool, tmp_path: Path, procs: Procs) -> None:
    path = write_study(tmp_path / "halt.toml", tiny_tables("halt", study={"n_trials": 8},
                                                           train={"epochs": 2, "checkpoint_every": 1}))
    url, store, release = f"sqlite:///{tmp_path / 'halt.db'}", tmp_path / "store", tmp_path / "release"
    run = procs.start(hpsearch_argv("run", str(path), "--workers", "2", "--storage", url, "--artifacts", str(store)),
                      "run", **{HOLD_ENV: f"1:{release}"})
    held = held_trials(url, "halt", 2, run, procs)  # both workers mid-trial

    asked_at = time.monotonic()
    stop = run_cli("stop", str(path), "--storage", url, *(["--now"] if now else []), cwd=tmp_path)
    assert stop.returncode == 0, stop.stderr
    assert "asked every worker of study 'halt' to stop" in stop.stderr
    if now:
        for trial in held:  # no release: only the stop ends these trials
            deadline = asked_at + STOP_NOW_TO_FAIL_S
            while {t.number: t.state for t in trials_of(url, "halt")}[trial.number] != TrialState.FAIL:
                assert time.monotonic() < deadline, f"trial {trial.number} still not FAIL"
                time.sleep(0.2)
    else:
        release.touch()
    assert procs.wait(run, timeout=120) == 0, procs.output(run)
    output = procs.output(run, tail=20000)
    assert output.count("stopped: hpsearch stop") >= 2, output  # each worker says why it stopped

    trials = trials_of(url, "halt")
    states = {t.number: t.state for t in trials}
    assert not [t for t in trials if t.state == TrialState.RUNNING], states_of(trials)
    if now:
        assert [states[t.number] for t in held] == [TrialState.FAIL, TrialState.FAIL]
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        assert sorted(t.system_attrs["failed_trial"] for t in waiting) == sorted(t.number for t in held)
        # A later run resumes the study: the old request does not stop it, and the retries continue.
        again = run_cli("run", str(path), "--storage", url, "--artifacts", str(store), "--n-trials", "2",
                        cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        retries = [t for t in trials_of(url, "halt") if t.system_attrs.get("failed_trial") in states]
        assert [t.state for t in retries] == [TrialState.COMPLETE] * 2
        assert all(t.user_attrs["resumed_from"]["epochs_done"] == 1 for t in retries)
    else:
        # Each worker finished the trial it held, then started no other.
        assert sorted(t.number for t in trials if t.state == TrialState.COMPLETE) == sorted(t.number for t in held)
        assert len(trials) == 2
    study = optuna.load_study(study_name="halt", storage=open_storage(url))
    assert stop_request(study.user_attrs).by == f"{getpass.getuser()}@{socket.gethostname()}"
