"""`hpsearch run --workers N`, its workers supervised: real processes, real signals, real SQLite.

- `hpsearch run --workers 4` reaches its 20 trials with unique trial numbers, no crashed worker, and memory
  that stays flat trial after trial;
- SIGINT/SIGTERM to `hpsearch run --workers 2`: it exits, its workers are gone, no trial stays RUNNING.
- a second signal during the shutdown (SIGTERM, then SIGINT after SIGINT) does not abort it.

Every wait has a deadline, and every process a test starts is killed (with its process group) at teardown. A
signal never races a trial's progress: the test hold (HPSEARCH_TEST_HOLD) stops each trial after its first
epoch's checkpoint, and the signal lands there. The signal test bounds how long `run` takes to exit
(SIGNAL_TO_EXIT_S).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from optuna.trial import FrozenTrial, TrialState

from hpsearch._testhooks import HOLD_ENV
from tests.support import (
    Procs,
    alive,
    held_trials,
    hpsearch_argv,
    is_descendant,
    pid_of,
    session_members,
    states_of,
    trials_of,
    wait_until,
)

# An upper bound, generous for a loaded 2-core machine: the supervisor polls its workers every 0.5 s.
SIGNAL_TO_EXIT_S = 45.0


# ---------------------------------------------------------------------------------- 1. run --workers 4


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_four_workers_reaches_n_trials(study_file: Callable[..., Path], tmp_path: Path, procs: Procs) -> None:
    n_workers, n_trials = 4, 20
    # Small, fast trials: the point is many workers sharing one SQLite file.
    path = study_file("tiny", study={"n_trials": n_trials}, data={"subset": 120, "image_size": 16},
                      model={"arch": "resnet18"})
    url = f"sqlite:///{tmp_path / 'four.db'}"
    run = procs.start(hpsearch_argv("run", str(path), "--workers", str(n_workers), "--storage", url,
                                "--artifacts", str(tmp_path / "artifacts")), "run")
    code = procs.wait(run, timeout=400)
    output = procs.output(run, tail=20000)
    assert code == 0, output
    assert "restarting" not in output, "no worker may crash"
    trials = trials_of(url, "tiny")
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # Each worker stops after the trial that brings the study to n_trials; the others may finish one more each.
    assert n_trials <= len(finished) <= n_trials + n_workers - 1, states_of(trials)
    assert not [t for t in trials if t.state == TrialState.FAIL], states_of(trials)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert len({t.user_attrs["worker"] for t in finished}) == n_workers, "every worker ran trials"
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], states_of(trials)
    assert not any(alive(pid_of(t.user_attrs["worker"])) for t in finished)
    _assert_memory_stays_flat(trials)


def _assert_memory_stays_flat(trials: list[FrozenTrial]) -> None:
    """A worker frees what each trial held: what it holds when a trial starts does not grow trial after trial.

    The first trial warms up allocators and caches. After it, one leaked ResNet-18 (45 MiB of weights, three
    times that with Adam's state) per trial raises the resident set by at least 45 MiB a trial, every trial;
    the allocator's own growth is a step now and then (measured: +98 MiB once, then flat, then -45). So a
    worker leaks when every step from its second trial on grows by 45 MiB or more (3 steps' worth of trials).
    """
    by_worker: dict[str, list[FrozenTrial]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        by_worker.setdefault(t.user_attrs["worker"], []).append(t)
    compared = 0
    for worker, runs in by_worker.items():
        held = [t.user_attrs["memory_at_start"]["host_rss_mib"] for t in runs[1:]]
        if len(held) < 3:
            continue
        compared += 1
        steps = [after - before for before, after in itertools.pairwise(held)]
        assert min(steps) < 45, f"worker {worker}: resident MiB at each trial's start {held}"
    assert compared >= 2, "at least two workers ran four trials or more"


# ----------------------------------------------------------------------------- 2. SIGINT and SIGTERM


@pytest.mark.slow
@pytest.mark.timeout(300)
# SIGINT to `run` alone takes the supervisor's one handler that SIGTERM takes (and a worker's SIGINT, the one
# that Ctrl-C to the group sends too): two cases cover the three ways.
@pytest.mark.parametrize(("signum", "to_group"), [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGTERM", "ctrl-c-to-group"])
def test_signal_stops_run_and_its_workers(signum: signal.Signals, to_group: bool, study_file: Callable[..., Path],
                                           tmp_path: Path, procs: Procs) -> None:
    """The signal goes to `hpsearch run` alone (kill PID), or to its whole process group as Ctrl-C does."""
    path = study_file("stop", study={"n_trials": 8}, train={"epochs": 2, "checkpoint_every": 1})
    url = f"sqlite:///{tmp_path / 'stop.db'}"
    # Both workers hold mid-trial (never released): the signal finds two running trials every time.
    run = procs.start(hpsearch_argv("run", str(path), "--workers", "2", "--storage", url,
                                "--artifacts", str(tmp_path / "artifacts")), "run",
                      **{HOLD_ENV: f"1:{tmp_path / 'never'}"})

    running = {t.number: t.user_attrs["worker"] for t in held_trials(url, "stop", 2, run, procs)}
    children = [pid_of(tag) for tag in running.values()]
    assert all(is_descendant(pid, run.pid) for pid in children)
    signalled_at = time.monotonic()
    if to_group:
        os.killpg(run.pid, signum)
    else:
        os.kill(run.pid, signum)

    code = procs.wait(run, timeout=SIGNAL_TO_EXIT_S)
    assert time.monotonic() - signalled_at < SIGNAL_TO_EXIT_S
    output = procs.output(run)
    assert code == 130 if signum == signal.SIGINT else code in (130, 143), (code, output)
    wait_until("the workers to be gone", lambda: not any(alive(pid) for pid in children), timeout=10, every=0.1)
    assert not session_members(run.pid), "workers outlived `hpsearch run`"
    trials = trials_of(url, "stop")
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], states_of(trials)
    # The trials that were running (held) when the signal came ended FAIL, and each has exactly one queued
    # retry with its parameters: the next `hpsearch run` continues it from the kept checkpoint.
    ended = {t.number: t.state for t in trials if t.number in running}
    assert set(ended.values()) == {TrialState.FAIL}, ended
    by_number = {t.number: t for t in trials}
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    retried = sorted(t.system_attrs["failed_trial"] for t in waiting)
    assert retried == sorted(n for n, state in ended.items() if state == TrialState.FAIL), states_of(trials)
    assert all(t.params == by_number[t.system_attrs["failed_trial"]].params for t in waiting)


# ---------------------------------------------------------------- 3. a second signal during the shutdown


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_second_signal_does_not_abort_the_shutdown(study_file: Callable[..., Path], tmp_path: Path,
                                                   procs: Procs) -> None:
    """SIGTERM to `hpsearch run --workers 2`, then SIGINT after SIGINT (an impatient user) until its workers are
    gone: the supervisor still waits for every worker and fails what they held; `run` exits 130, after them."""
    path = study_file("again", study={"n_trials": 8}, data={"subset": 120, "image_size": 16},
                      train={"epochs": 2, "checkpoint_every": 1})
    url = f"sqlite:///{tmp_path / 'again.db'}"
    run = procs.start(hpsearch_argv("run", str(path), "--workers", "2", "--storage", url,
                                "--artifacts", str(tmp_path / "artifacts")), "run",
                      **{HOLD_ENV: f"1:{tmp_path / 'never'}"})
    running = {t.number: t.user_attrs["worker"] for t in held_trials(url, "again", 2, run, procs)}
    children = [pid_of(tag) for tag in running.values()]
    signalled_at = time.monotonic()
    os.kill(run.pid, signal.SIGTERM)
    # Every 0.1 s while a worker lives: at least one SIGINT lands while the supervisor stops its workers.
    sent = 0
    while run.poll() is None and any(alive(pid) for pid in children) and sent < 300:
        time.sleep(0.1)
        if run.poll() is None:
            os.kill(run.pid, signal.SIGINT)
            sent += 1
    code = procs.wait(run, timeout=SIGNAL_TO_EXIT_S)
    # No grace here: `run` returns only once its workers have exited.
    workers_left = [pid for pid in children if alive(pid)]
    output = procs.output(run)
    assert time.monotonic() - signalled_at < SIGNAL_TO_EXIT_S
    assert code == 130, (code, output)
    assert "Traceback" not in output, output
    assert not workers_left, f"`run` exited before its workers {workers_left} ({sent} SIGINTs sent)"
    wait_until("the run's helpers to be gone", lambda: not session_members(run.pid), timeout=10, every=0.1)
    trials = trials_of(url, "again")
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], states_of(trials)
    assert {t.state for t in trials if t.number in running} == {TrialState.FAIL}, states_of(trials)
    retried = sorted(t.system_attrs["failed_trial"] for t in trials if t.state == TrialState.WAITING)
    assert retried == sorted(running), states_of(trials)


# --------------------------------------------------------------------- 4. a signal during the preparation


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("signum", "to_group"), [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGTERM", "ctrl-c-to-group"])
def test_signal_during_the_preparation_ends_its_child_and_exits_130(signum: signal.Signals, to_group: bool,
                                                                    study_file: Callable[..., Path], tmp_path: Path,
                                                                    procs: Procs) -> None:
    """The study's preparation runs in a child of the forkserver (the supervisor never imports torch): a signal
    while it runs (held once the study is open) ends the child, and `run` exits 130 as a single-process run does,
    with no worker started, no trial, nothing left running."""
    path = study_file("early", study={"n_trials": 4})
    url = f"sqlite:///{tmp_path / 'early.db'}"
    run = procs.start(hpsearch_argv("run", str(path), "--workers", "2", "--storage", url,
                                    "--artifacts", str(tmp_path / "artifacts")), "run",
                      **{HOLD_ENV: f"prepared:{tmp_path / 'never'}"})

    def preparing() -> list[int]:
        assert run.poll() is None, procs.output(run)
        return [pid for pid in session_members(run.pid) if _comm(pid) == "hpsearch-prep"]

    child = wait_until("the preparation's child", preparing, timeout=240, every=0.2)[0]
    wait_until("the study to be open", lambda: _has_study(tmp_path / "early.db", "early"), timeout=240)
    if to_group:
        os.killpg(run.pid, signum)
    else:
        os.kill(run.pid, signum)
    code = procs.wait(run, timeout=SIGNAL_TO_EXIT_S)
    output = procs.output(run)
    assert code == 130, (code, output)
    assert "interrupted" in output and "Traceback" not in output, output
    wait_until("the run's helpers to be gone", lambda: not session_members(run.pid), timeout=10, every=0.1)
    wait_until("the preparation's child to be gone", lambda: not alive(child), timeout=10, every=0.1)
    assert trials_of(url, "early") == []


def _has_study(db: Path, name: str) -> bool:
    """Whether the SQLite file holds the study, read only: never creating the file or Optuna's tables, which the
    preparation creates meanwhile."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            return conn.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone() is not None
    except sqlite3.OperationalError:  # no file yet, or no table yet
        return False


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
