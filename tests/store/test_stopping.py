"""Stop requests in the study: one applies to the processes started before it (by its number, whatever the
machines' clocks say), `[study] target` reached stops every worker, and a run stopped at its target leaves a
later run nothing to do. `hpsearch stop` to real workers
held mid-trial is in tests/process/test_stopping.py.
"""

from __future__ import annotations

import getpass
import socket
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch import keys
from hpsearch.cli._main import main
from hpsearch.store import StopWhenAsked, open_storage, pending, request_stop, stop_generation, stop_request


def test_a_request_applies_to_processes_started_before_it() -> None:
    study = optuna.create_study(direction="maximize")
    seen = stop_generation(study.user_attrs)
    request = request_stop(study, "hpsearch stop", now=True)
    assert request.by == f"{getpass.getuser()}@{socket.gethostname()}"
    assert stop_request(study.user_attrs) == request
    assert pending(study.user_attrs, seen) == request
    assert pending(study.user_attrs, stop_generation(study.user_attrs)) is None, "a later run resumes the study"

    asked = StopWhenAsked(seen, target=None)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=5, callbacks=[asked])
    assert len(study.trials) == 1 and asked.request == request


def test_the_target_stops_every_worker() -> None:
    study = optuna.create_study(direction="maximize")
    values = iter([0.5, 0.95, 0.7])
    asked = StopWhenAsked(stop_generation(study.user_attrs), target=0.9)
    study.optimize(lambda t: next(values), n_trials=3, callbacks=[asked])
    assert len(study.trials) == 2
    assert asked.request is not None and asked.request.by == "target"
    assert asked.request.reason == "target 0.9 reached by trial 1 (val_accuracy 0.9500)"
    # The request is in the study, so a worker that started before it stops after its current trial.
    assert pending(study.user_attrs, 0) == asked.request


# What `hpsearch stop` records on a machine whose clock is an hour off, its `at` the only thing that differs.
def _stop_from_a_skewed_clock(study: optuna.Study, skew_s: float, reason: str) -> None:
    request_stop(study, reason)
    recorded = dict(study.user_attrs[keys.STOP_REQUEST])
    study.set_user_attr(keys.STOP_REQUEST, {**recorded, "at": time.time() + skew_s})


@pytest.mark.parametrize("skew_s", [-3600.0, 3600.0], ids=["requester-behind", "requester-ahead"])
def test_a_stop_is_obeyed_or_ignored_by_its_order_never_by_clocks(skew_s: float, tmp_path: Path) -> None:
    study = optuna.create_study(study_name="skew", storage=open_storage(f"sqlite:///{tmp_path / 's.db'}"))
    _stop_from_a_skewed_clock(study, skew_s, "old")  # made before the worker below started

    worker = StopWhenAsked(stop_generation(study.user_attrs), target=None)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2, callbacks=[worker])
    assert len(study.trials) == 2 and worker.request is None, "an old request stopped a worker started after it"

    def stopped_by_another_machine(trial: optuna.Trial) -> float:
        _stop_from_a_skewed_clock(study, skew_s, "new")  # during this worker's trial
        return trial.suggest_float("x", 0, 1)

    study.optimize(stopped_by_another_machine, n_trials=3, callbacks=[worker])
    assert len(study.trials) == 3, "a new request was missed"
    assert worker.request is not None and worker.request.reason == "new"


def test_a_request_recorded_before_requests_were_numbered_counts_as_the_first() -> None:
    study = optuna.create_study()
    study.set_user_attr(keys.STOP_REQUEST, {"at": time.time(), "by": "u@h", "reason": "hpsearch stop", "now": False})
    assert stop_generation(study.user_attrs) == 1 and pending(study.user_attrs, 1) is None
    assert request_stop(study, "again").generation == 2


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
@pytest.mark.inprocess
def test_a_run_resumes_a_study_stopped_from_a_machine_whose_clock_is_ahead(study_file, tmp_path: Path) -> None:
    path = study_file("ahead", study={"n_trials": 1})
    url, store = f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "store"
    assert main(["run", str(path), "--storage", url, "--artifacts", str(store)]) == 0
    study = optuna.load_study(study_name="ahead", storage=open_storage(url))
    _stop_from_a_skewed_clock(study, 3600.0, "hpsearch stop")  # stamped an hour after this run starts
    assert main(["run", str(path), "--storage", url, "--artifacts", str(store), "--n-trials", "3"]) == 0
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 3, "the old request stopped the run"
