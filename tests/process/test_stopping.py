"""Stopping on purpose: `[study] target` reached, and `hpsearch stop` (after the current trial, or `--now`) with
two real workers held mid-trial; a later `run` resumes the study."""

from __future__ import annotations

import getpass
import socket
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch._testhooks import HOLD_ENV
from hpsearch.cli._main import main
from hpsearch.store import StopWhenAsked, open_storage, pending, request_stop, stop_request
from tests.support import Procs, held_trials, hpsearch_argv, run_cli, states_of, tiny_tables, trials_of, write_study

STOP_NOW_TO_FAIL_S = 30.0  # the watch looks every 2 s; then the interrupted trial is told FAIL


def test_a_request_applies_to_processes_started_before_it() -> None:
    study = optuna.create_study(direction="maximize")
    before = time.time()
    request = request_stop(study, "hpsearch stop", now=True)
    assert request.by == f"{getpass.getuser()}@{socket.gethostname()}"
    assert stop_request(study.user_attrs) == request
    assert pending(study.user_attrs, started_at=before) == request
    assert pending(study.user_attrs, started_at=time.time() + 1) is None, "a later run resumes the study"

    asked = StopWhenAsked(started_at=before, target=None)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=5, callbacks=[asked])
    assert len(study.trials) == 1 and asked.request == request


def test_the_target_stops_every_worker() -> None:
    study = optuna.create_study(direction="maximize")
    values = iter([0.5, 0.95, 0.7])
    asked = StopWhenAsked(started_at=time.time(), target=0.9)
    study.optimize(lambda t: next(values), n_trials=3, callbacks=[asked])
    assert len(study.trials) == 2
    assert asked.request is not None and asked.request.by == "target"
    assert asked.request.reason == "target 0.9 reached by trial 1 (val_accuracy 0.9500)"
    # The request is in the study, so a worker that started before it stops after its current trial.
    assert pending(study.user_attrs, started_at=0.0) == asked.request


@pytest.mark.slow
@pytest.mark.inprocess
def test_run_stops_at_the_target_and_a_later_run_has_nothing_to_do(study_file, tmp_path: Path, capsys) -> None:
    path = study_file("target", study={"n_trials": 6, "target": 0.01})
    url, store = f"sqlite:///{tmp_path / 't.db'}", tmp_path / "store"
    assert main(["run", str(path), "--storage", url, "--artifacts", str(store)]) == 0
    err = capsys.readouterr().err
    study = optuna.load_study(study_name="target", storage=open_storage(url))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    assert "stopped: target 0.01 reached by trial 0" in err
    assert main(["status", str(path), "--storage", url]) == 0
    assert "target 0.01: reached by trial 0" in capsys.readouterr().out
    assert main(["run", str(path), "--storage", url, "--artifacts", str(store)]) == 0
    assert "stopped: target 0.01 already reached by trial 0" in capsys.readouterr().err
    assert len(study.get_trials()) == 1


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
