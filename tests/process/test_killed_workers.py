"""A worker killed mid-trial, or its database connection dropped: real processes, real signals, real SQLite and
PostgreSQL.

- kill -9 of a supervised worker mid-trial: its trial ends FAIL and a retry with the same params completes;
- a lone `hpsearch worker` killed: the heartbeat fails its trial, and the retry resumes its checkpoint;
- kill -9 of `run --workers 2` itself: its workers end their trials FAIL (retries queued) and exit, and its
  forkserver and resource tracker go too;
- dropped PostgreSQL connections do not fail a running trial.

Every wait has a deadline, and every process a test starts is killed (with its process group) at teardown. A
kill never races a trial's progress: the test hold (HPSEARCH_TEST_HOLD) stops each trial after its
first epoch's checkpoint until the test releases it, and the kill lands there. Each kill test bounds how long
the storage takes to show the killed trial FAIL (KILL_TO_FAIL_S and friends): a broken supervisor or heartbeat
path exceeds them on any machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from optuna.trial import FrozenTrial, TrialState

from hpsearch._testhooks import HOLD_ENV
from tests.support import (
    PG_ADMIN_URL,
    Procs,
    held_trials,
    hpsearch_argv,
    is_descendant,
    pid_of,
    postgres_database,
    process_env,
    session_members,
    states_of,
    trials_of,
    wait_until,
)

# Upper bounds, generous for a loaded 2-core machine: the supervisor polls its workers every 0.5 s; a lone
# worker's trial waits out a 3 s heartbeat grace, then the next worker's start (imports, data) fails it.
KILL_TO_FAIL_S = 15.0
HEARTBEAT_KILL_TO_FAIL_S = 60.0


# ------------------------------------------------------------------------------------------ helpers


def _seconds_until_fail(url: str, name: str, number: int, killed_at: float, bound: float) -> float:
    """Seconds from the kill until the storage shows the killed trial FAIL; at most `bound`."""

    def failed() -> bool:
        return {t.number: t.state for t in trials_of(url, name)}[number] == TrialState.FAIL

    wait_until(f"trial {number} FAIL within {bound:.0f} s of the kill", failed, timeout=bound, every=0.1)
    return time.monotonic() - killed_at


def _report_kill(kind: str, url: str, trials: list[FrozenTrial], n_trials: int, kill_to_fail: float) -> None:
    """The figures a kill test is judged by, printed for the record (pytest -s shows them)."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # A duplicate: the same parameters evaluated to the end twice, other than a failed trial and its retry.
    keys = Counter(tuple(sorted(t.params.items())) for t in finished)
    duplicates = sum(n - 1 for n in keys.values() if n > 1)
    lost = len([t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)])
    backend = url.split(":", 1)[0]
    print(f"\nKILL FIGURES [{kind}, {backend}]: trials run {len(trials)} ({states_of(trials)}), finished "
          f"{len(finished)}/{n_trials}, duplicates {duplicates}, lost {lost}, kill to FAIL {kill_to_fail:.1f} s")
    assert duplicates == 0 and lost == 0


# ------------------------------------------------------------------------------- 1. kill -9 a worker


@pytest.mark.slow
@pytest.mark.timeout(420)
# PostgreSQL only, the storage of many machines: the supervisor's fail-and-retry of a dead worker's trial is
# driven on both storages by tests/workers/test_supervisor.py, and a supervised run on SQLite by the signal tests.
@pytest.mark.parametrize("storage_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_kill_9_worker_mid_trial_fails_and_retries_its_trial(storage_url: str, study_file: Callable[..., Path],
                                                              tmp_path: Path, procs: Procs) -> None:
    # 2 workers, 2 trials: the survivor brings one, the retry (queued within a poll of the kill, popped by the
    # first free worker: the survivor or the restarted one) brings the other.
    n_trials = 2
    # Every trial holds after its first epoch (of two) until released: the kill lands mid-trial every time.
    release = tmp_path / "release"
    path = study_file("kill", study={"n_trials": n_trials}, train={"epochs": 2, "checkpoint_every": 1})
    run = procs.start(hpsearch_argv("run", str(path), "--workers", "2", "--storage", storage_url,
                                "--artifacts", str(tmp_path / "artifacts")), "run", **{HOLD_ENV: f"1:{release}"})

    victim = held_trials(storage_url, "kill", 1, run, procs)[0]
    pid = pid_of(victim.user_attrs["worker"])
    assert is_descendant(pid, run.pid), "the trial's worker tag should name a worker of `hpsearch run`"
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    kill_to_fail = _seconds_until_fail(storage_url, "kill", victim.number, killed_at, KILL_TO_FAIL_S)
    release.touch()

    code = procs.wait(run, timeout=300)
    output = procs.output(run)
    assert code == 0, output
    assert f"trial {victim.number} FAIL" in output
    trials = trials_of(storage_url, "kill")
    by_number = {t.number: t for t in trials}
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], states_of(trials)
    killed = by_number[victim.number]
    assert killed.state == TrialState.FAIL
    assert "died (signal 9)" in killed.user_attrs.get("fail_reason", "")
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1, [(t.number, t.state.name) for t in retries]
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE, (retry.number, retry.state.name, states_of(trials))
    assert retry.params == killed.params
    assert retry.user_attrs["worker"] != victim.user_attrs["worker"]
    assert "fail_reason" not in retry.user_attrs, "the retry must not inherit its failed original's fail_reason"
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= n_trials, states_of(trials)
    assert not session_members(run.pid), "workers outlived `hpsearch run`"
    _report_kill("supervised", storage_url, trials, n_trials, kill_to_fail)


# ------------------------------------------- 2. a lone `hpsearch worker` killed: heartbeat, retry, resume


@pytest.mark.slow
@pytest.mark.timeout(420)
# Pairwise, not the full product: each storage and each store once (the product doubles the time, and the
# storage x store combinations share no code path that these two pairs leave untested).
# Through the storage proxy too: there the proxy, not the next worker, finds the stale heartbeat.
@pytest.mark.parametrize(("storage_url", "artifacts_location"),
                         [("sqlite", "folder"), pytest.param("postgresql", "s3", marks=pytest.mark.postgres),
                          pytest.param("grpc", "folder", marks=pytest.mark.postgres)],
                         indirect=True)
def test_lone_worker_killed_is_failed_by_heartbeat_and_retry_resumes_its_checkpoint(
        storage_url: str, artifacts_location: str, study_file: Callable[..., Path], procs: Procs) -> None:
    # No supervisor here (another machine's worker): only the heartbeat can tell that the trial's worker died.
    # The checkpoint the retry resumes from is in the shared store: a folder, or S3 for workers on many machines.
    path = study_file("lone", study={"n_trials": 1, "heartbeat_interval": 1, "heartbeat_grace": 3},
                      train={"epochs": 3, "checkpoint_every": 1})
    args = [str(path), "--storage", storage_url, "--artifacts", artifacts_location]
    first = procs.start(hpsearch_argv("worker", *args), "first", **{HOLD_ENV: f"1:{procs.folder / 'never'}"})

    victim = held_trials(storage_url, "lone", 1, first, procs)[0]
    os.kill(pid_of(victim.user_attrs["worker"]), signal.SIGKILL)
    killed_at = time.monotonic()
    procs.wait(first, timeout=30)
    assert {t.number: t.state for t in trials_of(storage_url, "lone")}[victim.number] == TrialState.RUNNING

    time.sleep(4)  # past the grace period: the trial's heartbeat is stale now
    second = procs.start(hpsearch_argv("worker", *args, "--worker-index", "1"), "second")
    kill_to_fail = _seconds_until_fail(storage_url, "lone", victim.number, killed_at, HEARTBEAT_KILL_TO_FAIL_S)
    code = procs.wait(second, timeout=300)
    assert code == 0, procs.output(second)

    trials = trials_of(storage_url, "lone")
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], states_of(trials)
    assert {t.number: t.state for t in trials}[victim.number] == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1, states_of(trials)
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == victim.params
    # It continued after the dead trial's last checkpoint (epoch 1 done), with the original's seed.
    assert retry.user_attrs["resumed_from"] == {"trial": victim.number, "epochs_done": 1}
    assert retry.user_attrs["seed"] == victim.user_attrs["seed"]
    assert sorted(retry.intermediate_values) == [0, 1, 2]
    store = "s3" if artifacts_location.startswith("s3://") else "folder"
    _report_kill(f"lone worker (heartbeat), artifacts in {store}", storage_url, trials, 1, kill_to_fail)


# ------------------------------------------------------------- 3. kill -9 of the supervisor itself

# From the supervisor's kill -9 until every process it started is gone: each worker looks for its supervisor every
# second, then ends its trial FAIL and queues its retry (the storage writes of a stop); then the forkserver's
# and resource tracker's pipes close.
SUPERVISOR_KILL_TO_GONE_S = 30.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_of_run_stops_its_workers_and_fails_their_trials(study_file: Callable[..., Path], tmp_path: Path,
                                                                 procs: Procs) -> None:
    path = study_file("orphans", study={"n_trials": 8}, data={"subset": 120, "image_size": 16},
                      train={"epochs": 2, "checkpoint_every": 1})
    url = f"sqlite:///{tmp_path / 'orphans.db'}"
    run = procs.start(hpsearch_argv("run", str(path), "--workers", "2", "--storage", url,
                                    "--artifacts", str(tmp_path / "artifacts")), "run",
                      **{HOLD_ENV: f"1:{tmp_path / 'never'}"})
    held = held_trials(url, "orphans", 2, run, procs)
    helpers = session_members(run.pid)
    assert len(helpers) >= 4, "run, its forkserver, its resource tracker and two workers"
    os.kill(run.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert procs.wait(run, timeout=10) == -signal.SIGKILL

    wait_until("no worker, forkserver or resource tracker of the killed run", lambda: not session_members(run.pid),
               timeout=SUPERVISOR_KILL_TO_GONE_S, every=0.1)
    gone_in = time.monotonic() - killed_at
    trials = trials_of(url, "orphans")
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], states_of(trials)
    by_number = {t.number: t for t in trials}
    for trial in held:
        ended = by_number[trial.number]
        assert ended.state == TrialState.FAIL, states_of(trials)
        assert "supervisor" in ended.user_attrs.get("fail_reason", ""), ended.user_attrs
    retried = sorted(t.system_attrs["failed_trial"] for t in trials if t.state == TrialState.WAITING)
    assert retried == sorted(t.number for t in held), states_of(trials)
    print(f"\nkill -9 of run: its {len(helpers) - 1} processes gone, trials FAIL and queued {gone_in:.1f} s after")


# -------------------------------------------- 4. a dropped PostgreSQL connection does not fail a trial


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_dropped_postgres_connections_do_not_fail_a_running_trial(study_file: Callable[..., Path], tmp_path: Path,
                                                                   procs: Procs) -> None:
    import sqlalchemy as sa

    databases = postgres_database()
    url = next(databases)
    try:
        path = study_file("drop", study={"n_trials": 1, "heartbeat_interval": 1, "heartbeat_grace": 5},
                          train={"epochs": 3, "checkpoint_every": 1})
        release = tmp_path / "release"
        argv = hpsearch_argv("worker", str(path), "--storage", url, "--artifacts", str(tmp_path / "artifacts"))
        app = f"hpsearch-drop-{os.getpid()}"
        with open(tmp_path / "drop.out", "wb") as out:
            # Held after epoch 1 while its connections are dropped: the heartbeat meets the dropped connection.
            worker = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                                      env={**process_env(), "HPSEARCH_APP_NAME": app, HOLD_ENV: f"1:{release}"})
        worker.name = "drop"  # type: ignore[attr-defined]
        procs.started.append(worker)

        victim = held_trials(url, "drop", 1, worker, procs)[0]
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            dropped = conn.execute(sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                           "WHERE application_name = :app"), {"app": app}).scalar()
        admin.dispose()
        assert dropped >= 1, "the worker's connections carry its application_name"
        time.sleep(2)  # two heartbeats on the dropped connection while the trial is held
        release.touch()

        assert procs.wait(worker, timeout=240) == 0, procs.output(worker)
        trial = {t.number: t for t in trials_of(url, "drop")}[victim.number]
        assert trial.state == TrialState.COMPLETE, (trial.state, procs.output(worker))
        assert len(trial.intermediate_values) == 3
    finally:
        databases.close()
