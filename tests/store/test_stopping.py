"""Stop requests in the study: one applies to the processes started before it, `[study] target` reached stops
every worker, and a run stopped at its target leaves a later run nothing to do. `hpsearch stop` to real workers
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

from hpsearch.cli._main import main
from hpsearch.store import StopWhenAsked, open_storage, pending, request_stop, stop_request


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
