"""A database outage while a trial runs: real `hpsearch worker` processes on the real PostgreSQL server, the study's
database made unreachable (connections refused and dropped) while a trial is held after its first epoch.

- shorter than `[study] storage_patience`: the trial waits for the storage and completes; nothing is lost;
- longer: the trial ends FAIL with its reason and checkpoint kept, once the storage answers again, and its one
  retry resumes from that checkpoint; the run finishes its budget and exits 0.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from optuna.trial import TrialState

from hpsearch._testhooks import HOLD_ENV
from tests.support import (
    DatabaseOutage,
    Procs,
    held_trials,
    hpsearch_argv,
    postgres_database,
    process_env,
    states_of,
    trials_of,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(420)]


def _worker(url: str, path: Path, tmp_path: Path, procs: Procs, name: str) -> subprocess.Popen[bytes]:
    release = tmp_path / "release"
    argv = hpsearch_argv("worker", str(path), "--storage", url, "--artifacts", str(tmp_path / "artifacts"))
    with open(tmp_path / f"{name}.out", "wb") as out:
        worker = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                                  env={**process_env(), HOLD_ENV: f"1:{release}"})
    worker.name = name  # type: ignore[attr-defined]
    procs.started.append(worker)
    return worker


def _outage_while_held(url: str, name: str, worker: subprocess.Popen[bytes], procs: Procs, tmp_path: Path,
                       seconds: float) -> int:
    """Hold the trial after epoch 1, take the database away, let the trial go on into the outage, and end the
    outage `seconds` after the trial's first storage call failed; the held trial's number."""
    victim = held_trials(url, name, 1, worker, procs)[0]
    with DatabaseOutage(url):
        (tmp_path / "release").touch()
        # The trial's own call: its report of epoch 2 (a stop watch or a heartbeat may meet the outage first).
        wait_until("the trial's storage call meets the outage",
                   lambda: "set_trial_intermediate_value failed" in procs.output(worker, tail=100_000), timeout=180)
        time.sleep(seconds)
    return victim.number


def test_an_outage_within_the_patience_loses_nothing(study_file: Callable[..., Path], tmp_path: Path,
                                                      procs: Procs) -> None:
    databases = postgres_database()
    url = next(databases)
    try:
        path = study_file("blip", study={"n_trials": 1, "heartbeat_interval": 1, "heartbeat_grace": 120,
                                         "storage_patience": 120}, train={"epochs": 3, "checkpoint_every": 1})
        worker = _worker(url, path, tmp_path, procs, "blip")
        number = _outage_while_held(url, "blip", worker, procs, tmp_path, seconds=4)

        assert procs.wait(worker, timeout=240) == 0, procs.output(worker)
        trials = trials_of(url, "blip")
        assert states_of(trials) == {"COMPLETE": 1}, (states_of(trials), procs.output(worker))
        trial = trials[number]
        assert len(trial.intermediate_values) == 3 and "resumed_from" not in trial.user_attrs
    finally:
        databases.close()


def test_an_outage_past_the_patience_ends_the_trial_and_its_retry_resumes(study_file: Callable[..., Path],
                                                                          tmp_path: Path, procs: Procs) -> None:
    databases = postgres_database()
    url = next(databases)
    try:
        path = study_file("outage", study={"n_trials": 1, "heartbeat_interval": 1, "heartbeat_grace": 120,
                                           "storage_patience": 2, "max_consecutive_failures": 1},
                          train={"epochs": 3, "checkpoint_every": 1})
        worker = _worker(url, path, tmp_path, procs, "outage")
        number = _outage_while_held(url, "outage", worker, procs, tmp_path, seconds=6)

        # Exit 0: the lost trial is outside the failure streak (max_consecutive_failures = 1 would stop the run).
        assert procs.wait(worker, timeout=240) == 0, procs.output(worker)
        trials = trials_of(url, "outage")
        assert states_of(trials) == {"FAIL": 1, "COMPLETE": 1}, procs.output(worker, tail=20000)
        lost = trials[number]
        assert lost.state == TrialState.FAIL
        assert lost.user_attrs.get("storage_lost") is True
        assert "storage unavailable" in lost.user_attrs["fail_reason"], lost.user_attrs
        assert lost.user_attrs.get("checkpoint_artifact"), "the checkpoint is kept for the retry"
        retry = next(t for t in trials if t.state == TrialState.COMPLETE)
        assert retry.system_attrs.get("failed_trial") == number
        assert retry.params == lost.params
        assert retry.user_attrs["resumed_from"] == {"trial": number, "epochs_done": 1}
        assert "storage unavailable" in procs.output(worker)
    finally:
        databases.close()
