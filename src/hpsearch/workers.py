"""Starting, pinning and supervising worker processes on one machine.

Each worker is a real `hpsearch worker` process that opens the storage itself (a storage object never
crosses a process boundary). The supervisor restarts a worker that dies, fails the trial it held at once
(every trial records the worker that runs it) and queues one retry with the same parameters through
Optuna's `RetryHeartbeatStaleTrialCallback`. SIGINT/SIGTERM stop every worker; their trials end FAIL, never RUNNING.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

ATTR_WORKER = "worker"
# A worker's exit code when it stopped because trials failed in a row (not a crash: not restarted).
EXIT_FAILURE_STREAK = 4
STOP_GRACE_S = 30.0


def worker_tag(pid: int | None = None) -> str:
    """Who runs a trial: host and pid, recorded on the trial so a supervisor can find a dead worker's trial."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def worker_env(index: int, n_workers: int, gpus: Sequence[int], per_gpu: int) -> dict[str, str]:
    """Pin worker `index` to one GPU (round-robin), or give it its share of the CPU's threads."""
    env = dict(os.environ)
    env["HPSEARCH_WORKER"] = str(index)
    env["HPSEARCH_APP_NAME"] = f"hpsearch-worker-{index}"
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(gpus[(index // per_gpu) % len(gpus)])
    threads = max(1, (os.cpu_count() or 1) // max(1, n_workers if not gpus else 1))
    env["HPSEARCH_THREADS"] = str(threads)
    return env


def visible_gpus() -> list[int]:
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:
        return []


def fail_trials_of(storage: optuna.storages.BaseStorage, study: optuna.Study, tag: str,
                   reason: str) -> list[int]:
    """Mark the RUNNING trials of one (dead) worker FAIL and queue one retry of each; returns their numbers."""
    # The retry inherits the reported epochs; it resumes from the dead trial's last checkpoint.
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1, inherit_intermediate_values=True)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(ATTR_WORKER) != tag:
            continue
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        if storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
            # The retry copies user attrs: not this trial's fail_reason, nor the dead worker's tag.
            dead = storage.get_trial(trial._trial_id)
            dead.user_attrs = {k: v for k, v in dead.user_attrs.items() if k not in ("fail_reason", ATTR_WORKER)}
            retry(study, dead)
            failed.append(trial.number)
    return failed


@dataclass
class Worker:
    index: int
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, env=self.env, start_new_session=False)

    @property
    def tag(self) -> str:
        assert self.process is not None
        return worker_tag(self.process.pid)


@dataclass
class Supervisor:
    """Runs N workers until `done()` says the study holds its trials; restarts and cleans up after them."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    workers: list[Worker]
    done: Callable[[], bool]
    on_event: Callable[[str], None] = print
    poll_s: float = 0.5
    max_restarts: int = 10
    _stopping: bool = field(default=False, init=False)

    def run(self) -> int:
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for worker in self.workers:
                worker.start()
            return self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._shutdown()

    def _stop(self, signum: int, _frame: object) -> None:
        self._stopping = True

    def _watch(self) -> int:
        while not self._stopping:
            alive = 0
            for worker in self.workers:
                assert worker.process is not None
                code = worker.process.poll()
                if code is None:
                    alive += 1
                    continue
                if code == 0:
                    continue  # a worker returns 0 once the study holds its trials
                self._reap(worker, code)
                if code == EXIT_FAILURE_STREAK:
                    # It stopped on purpose (its trials kept failing): restarting would only burn more trials.
                    self.on_event(f"worker {worker.index} stopped: its trials failed in a row")
                    continue
                if self.done() or worker.restarts >= self.max_restarts:
                    continue
                worker.restarts += 1
                self.on_event(f"worker {worker.index} exited with {code}; restarting it")
                worker.start()
                alive += 1
            if alive == 0:
                return 0 if self.done() else 1
            time.sleep(self.poll_s)
        return 130

    def _reap(self, worker: Worker, code: int) -> None:
        cause = f"signal {-code}" if code < 0 else f"exit code {code}"
        failed = fail_trials_of(self.storage, self.study, worker.tag, f"worker {worker.tag} died ({cause})")
        for number in failed:
            self.on_event(f"trial {number} FAIL: its worker died ({cause}); queued a retry with the same params")

    def _shutdown(self) -> None:
        live = [w for w in self.workers if w.process is not None and w.process.poll() is None]
        for worker in live:
            assert worker.process is not None
            worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in live:
            assert worker.process is not None
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        # Whatever a stopped worker could not mark itself ends FAIL here, never RUNNING.
        for worker in self.workers:
            if worker.process is not None:
                for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    if trial.user_attrs.get(ATTR_WORKER) == worker.tag:
                        self.storage.set_trial_user_attr(trial._trial_id, "fail_reason", "stopped by a signal")
                        self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def worker_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "hpsearch.cli", "worker", *args]


def install_stop_handler() -> None:
    """In a worker: SIGTERM interrupts the trial like Ctrl-C, so Optuna marks it FAIL before exiting."""

    def stop(signum: int, _frame: object) -> None:
        # Once: a second signal (Ctrl-C reaches the whole group, then the supervisor's SIGTERM) must not
        # interrupt the clean-up that marks the trial FAIL.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
