"""The supervisor's own decisions, driven by real (tiny) worker processes and a real storage: a trial that
finished first is left alone, a worker stopped by its failure streak is not restarted, restarts wait a growing
delay within a budget, a frozen (SIGSTOP) worker is killed and restarted."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch.errors import ExitCode
from hpsearch.store import fail_running_trial, fail_trials_of, open_storage
from hpsearch.workers._forkserver import forkserver_launch, stop_forkserver
from hpsearch.workers._restarts import Backoff, RestartPolicy
from hpsearch.workers._supervisor import Supervisor, Worker
from tests.support import STORAGES_AND_PROXY, tiny_tables, write_study


def _study(url: str) -> tuple[optuna.storages.BaseStorage, optuna.Study]:
    storage = open_storage(url)
    return storage, optuna.create_study(study_name="sup", storage=storage)


def _exits_with(code: int, after_s: float = 0.0) -> list[str]:
    return [sys.executable, "-c", f"import sys, time; time.sleep({after_s}); sys.exit({int(code)})"]


@pytest.mark.parametrize("storage_url", STORAGES_AND_PROXY, indirect=True)
def test_a_trial_its_worker_finished_first_is_left_alone(storage_url: str) -> None:
    storage, study = _study(storage_url)
    trial = study.ask()
    trial.set_user_attr("worker", "host:1")
    seen_running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))[0]
    study.tell(trial, 0.5)  # the worker told its result between the supervisor's read and its write

    assert fail_running_trial(storage, study, seen_running, "worker died", retry=True) is False
    [after] = study.get_trials()
    assert after.state == TrialState.COMPLETE and after.value == 0.5
    assert "fail_reason" not in after.user_attrs


@pytest.mark.parametrize("storage_url", STORAGES_AND_PROXY, indirect=True)
def test_a_dead_workers_trial_is_failed_and_retried_once(storage_url: str) -> None:
    storage, study = _study(storage_url)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr("worker", "host:2")
    assert fail_trials_of(storage, study, "host:2", "worker host:2 died (signal 9)") == [trial.number]
    assert fail_trials_of(storage, study, "host:2", "again") == [], "a FAIL trial is not failed twice"
    failed, retry = study.get_trials()
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"] == "worker host:2 died (signal 9)"
    assert retry.state == TrialState.WAITING and retry.params == failed.params
    assert "fail_reason" not in retry.user_attrs and "worker" not in retry.user_attrs


def _supervise(tmp_path, command: list[str], n: int = 2, max_restarts: int = 3) -> tuple[int, list[str], list[Worker]]:
    storage, study = _study(f"sqlite:///{tmp_path / 'sup.db'}")
    events: list[str] = []
    workers = [Worker(i, command, {}) for i in range(n)]
    quick = RestartPolicy(first_s=0.05, cap_s=0.2, max_in_window=max_restarts)  # the budget, not the delays
    code = Supervisor(study, storage, workers, done=lambda: False, on_event=events.append, poll_s=0.05,
                      restart_policy=quick).run()
    return code, events, workers


@pytest.mark.timeout(60)
def test_a_worker_stopped_by_its_failure_streak_is_not_restarted(tmp_path) -> None:
    code, events, workers = _supervise(tmp_path, _exits_with(ExitCode.WORKER_FAILURE_STREAK))
    assert code == ExitCode.FAILURE_STREAK, "the study did not reach its trials"
    assert [w.restarts for w in workers] == [0, 0]
    assert sorted(events) == [f"worker {i} stopped: its trials failed in a row" for i in range(2)], events


@pytest.mark.timeout(60)
def test_a_failure_streak_is_told_once_while_another_worker_still_runs(tmp_path) -> None:
    storage, study = _study(f"sqlite:///{tmp_path / 'sup.db'}")
    events: list[str] = []
    early = Worker(0, _exits_with(ExitCode.WORKER_FAILURE_STREAK), {})
    late = Worker(1, _exits_with(ExitCode.WORKER_FAILURE_STREAK, after_s=1), {})
    code = Supervisor(study, storage, [early, late], done=lambda: False, on_event=events.append, poll_s=0.05).run()
    assert code == 1
    # Many polls see worker 0 gone while worker 1 sleeps: its exit is dealt with once, not at every poll.
    assert events == [f"worker {i} stopped: its trials failed in a row" for i in range(2)], events


@pytest.mark.timeout(60)
def test_a_crashing_worker_is_restarted_up_to_the_cap(tmp_path) -> None:
    code, events, workers = _supervise(tmp_path, _exits_with(3), max_restarts=3)
    assert code == 1
    assert [w.restarts for w in workers] == [3, 3]
    assert sum("exited with 3; restarting it" in e for e in events) == 6, events
    given_up = sorted(e for e in events if "not restarted" in e)
    assert given_up == [f"worker {i} exited with 3; not restarted: it was restarted 3 times within 60 min"
                        for i in range(2)], events


@pytest.mark.timeout(60)
def test_a_worker_whose_gpu_context_broke_is_restarted_not_taken_for_a_streak(tmp_path) -> None:
    code, events, workers = _supervise(tmp_path, _exits_with(ExitCode.DEVICE_BROKEN), max_restarts=2)
    assert [w.restarts for w in workers] == [2, 2]
    assert sum("its GPU context broke (a sticky device error); restarting it" in e for e in events) == 4, events
    assert code == 1


@pytest.mark.timeout(60)
def test_a_full_artifact_store_stops_every_worker_at_once(tmp_path) -> None:
    storage, study = _study(f"sqlite:///{tmp_path / 'sup.db'}")
    events: list[str] = []
    full = Worker(0, _exits_with(ExitCode.WORKER_STORE_FULL, after_s=0.5), {})
    busy = Worker(1, [sys.executable, "-c", "import time; time.sleep(60)"], {})
    started = time.monotonic()
    code = Supervisor(study, storage, [full, busy], done=lambda: False, on_event=events.append, poll_s=0.05).run()
    assert code == 2
    assert time.monotonic() - started < 30, "the other worker was stopped, not waited for"
    assert busy.process is not None and busy.process.returncode == -signal.SIGTERM
    assert [w.restarts for w in (full, busy)] == [0, 0]
    assert events == ["worker 0 found the artifact store full; stopping every worker"]


@pytest.mark.timeout(120)
def test_a_forked_worker_gets_its_environment_and_reports_its_exit_code(tmp_path: Path,
                                                                        capfd: pytest.CaptureFixture[str]) -> None:
    """`run --workers` on the CPU forks its workers from a preloaded forkserver: each still gets the
    environment a fresh process would (its storage URL travels there), its exit code and its output."""
    study = write_study(tmp_path / "forked.toml", tiny_tables("forked"))
    env = {**os.environ, "HPSEARCH_STORAGE": "nosuchdb://somewhere/x"}
    launch = forkserver_launch()
    try:
        worker = launch([str(study)], env)
        assert worker.wait(timeout=90) == 2
    finally:
        stop_forkserver()
    err = capfd.readouterr().err
    assert "nosuchdb" in err and "Traceback" not in err, err


def test_restart_delays_double_up_to_a_cap_and_a_healthy_run_resets_them() -> None:
    backoff = Backoff(RestartPolicy())
    delays = [backoff.next_delay(ran_s=0.1, now=float(t)) for t in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert backoff.next_delay(ran_s=900, now=10.0) == 1, "a worker that ran 15 min died of something new"


def test_the_restart_budget_counts_one_window_not_the_whole_run() -> None:
    backoff = Backoff(RestartPolicy(max_in_window=3, window_s=3600))
    assert all(backoff.next_delay(ran_s=1, now=t) is not None for t in (0.0, 100.0, 200.0))
    assert backoff.next_delay(ran_s=1, now=300.0) is None, "a fourth restart within the hour"
    assert backoff.next_delay(ran_s=1, now=3601.0) is not None, "the first restart left the window"


@pytest.mark.timeout(120)
def test_a_worker_that_exits_at_once_is_restarted_with_growing_delays_and_a_signal_still_stops_at_once(
        tmp_path) -> None:
    storage, study = _study(f"sqlite:///{tmp_path / 'sup.db'}")
    events: list[tuple[float, str]] = []
    stopped_at: list[float] = []

    def stop_once_waiting_four_seconds() -> None:
        while not any(e.endswith("restarting it in 4 s") for _, e in events):
            time.sleep(0.05)
        stopped_at.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)  # while the restart waits out its 4 s

    threading.Thread(target=stop_once_waiting_four_seconds, daemon=True).start()
    code = Supervisor(study, storage, [Worker(0, _exits_with(1), {})], done=lambda: False,
                      on_event=lambda e: events.append((time.monotonic(), e))).run()
    assert code == ExitCode.INTERRUPTED
    assert time.monotonic() - stopped_at[0] < 2.0, "the signal waited for the pending restart"
    assert [e for _, e in events] == [f"worker 0 exited with 1; restarting it in {d} s" for d in (1, 2, 4)]
    seen = [t for t, _ in events]
    assert seen[1] - seen[0] >= 1.0 and seen[2] - seen[1] >= 2.0, "restarted before its delay"


# A worker that takes a trial and freezes (SIGSTOP) inside a SQLite write transaction on its first start, as one
# frozen mid-statement; started again, it finishes the retry of that trial.
_FREEZES_ONCE = """
import os, signal, sqlite3, sys
import optuna
from hpsearch import keys
from hpsearch.store import open_storage
db, marker = sys.argv[1], sys.argv[2]
study = optuna.load_study(study_name="sup", storage=open_storage("sqlite:///" + db))
trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
trial.set_user_attr(keys.WORKER, keys.worker_tag())
if os.path.exists(marker):
    study.tell(trial, 1.0)
    sys.exit(0)
open(marker, "w").close()
sqlite3.connect(db, isolation_level=None).execute("BEGIN IMMEDIATE")
os.kill(os.getpid(), signal.SIGSTOP)
"""


@pytest.mark.timeout(120)
def test_a_worker_frozen_holding_the_sqlite_write_lock_is_killed_its_trial_retried_and_it_restarted(
        tmp_path) -> None:
    db = tmp_path / "sup.db"
    storage, study = _study(f"sqlite:///{db}")
    events: list[str] = []
    worker = Worker(0, [sys.executable, "-c", _FREEZES_ONCE, str(db), str(tmp_path / "froze")], dict(os.environ))

    def done() -> bool:
        return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    code = Supervisor(study, storage, [worker], done=done, on_event=events.append, poll_s=0.1, frozen_limit_s=1.0,
                      restart_policy=RestartPolicy(first_s=0.1)).run()
    assert code == ExitCode.OK, events
    frozen, retry = study.get_trials()
    assert frozen.state == TrialState.FAIL and frozen.user_attrs["fail_reason"].endswith("died (signal 9)")
    assert retry.state == TrialState.COMPLETE and retry.params == frozen.params
    assert len(events) == 3, events
    assert re.fullmatch(r"worker 0 \(pid \d+\) stayed stopped \(SIGSTOP\) for 1 s; killed it: its trial is "
                        r"retried, the worker restarted", events[0]), events
    assert events[1:] == ["trial 0 FAIL: its worker died (signal 9); queued a retry with the same params",
                          "worker 0 died of signal 9; restarting it in 0.1 s"]
