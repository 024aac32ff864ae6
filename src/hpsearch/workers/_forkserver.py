"""Workers forked from a forkserver that imported torch, torchvision and hpsearch once.

A fresh `hpsearch worker` spends ~5 CPU-seconds importing torch and torchvision before its first trial; on a
CPU-only machine those seconds come out of the trials' cores, at every start and every restart. Python's
`multiprocessing` forkserver imports them once, then forks each worker from that clean, single-threaded
process (never from the supervisor, which holds database connections). Torch-free: `run` starts the server
before it imports torch itself, so both imports overlap.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from typing import Protocol

# The module whose `main(argv)` a forked worker runs, named rather than imported: the CLI starts the forkserver.
WORKER_ENTRY = "hpsearch.__main__"
# What a worker imports before its first trial.
WORKER_PRELOAD = ["torch", "torchvision", "hpsearch.cli", "hpsearch.search", "hpsearch.monitor", "hpsearch.workers"]


class WorkerProcess(Protocol):
    """What the supervisor needs of a worker process: `subprocess.Popen`'s surface."""

    @property
    def pid(self) -> int: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


Launch = Callable[[list[str], dict[str, str]], WorkerProcess]


class ForkedProcess:
    """Popen's surface over a process forked from the forkserver (which reaps it and reports its exit code:
    negative for a signal, as Popen's)."""

    def __init__(self, process: BaseProcess) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self._process.exitcode
        if code is None:
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _worker_main(args: list[str], env: dict[str, str]) -> None:
    """A forked worker: the environment a fresh process would have got (its storage URL, threads and worker
    index travel there, never in argv), then `hpsearch worker ARGS`."""
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["hpsearch", "worker", *args]
    sys.exit(importlib.import_module(WORKER_ENTRY).main(["worker", *args]))


def _context() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context  # type: ignore[return-value]


def start_forkserver() -> None:
    """Start the forkserver now (it imports in the background), before this process imports torch itself."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def forkserver_launch() -> Launch:
    """Launch `hpsearch worker ARGS` forked from the forkserver. The forkserver ignores SIGINT and its
    children stay in the supervisor's process group: Ctrl-C reaches every worker."""
    context = _context()

    def launch(args: list[str], env: dict[str, str]) -> WorkerProcess:
        process = context.Process(target=_worker_main, args=(args, env),
                                  name=env.get("HPSEARCH_APP_NAME", "hpsearch-worker"))
        process.start()
        return ForkedProcess(process)

    return launch


def stop_forkserver() -> None:
    """Wait until the forkserver and multiprocessing's resource tracker have exited: nothing outlives the run.
    Both exit by themselves once their pipe closes, a moment after this process; `multiprocessing` has no
    public call to close it now and wait, so this uses the private `_stop` that its own tests use.

    A Ctrl-C or SIGTERM that lands meanwhile is ignored: the run is already ending, and an interrupt between
    `_stop`'s closing the pipe and its clearing the pid would leave the helper half-stopped, so that the next
    `_stop` fails on a closed descriptor instead of the run exiting with its own code."""
    from multiprocessing import forkserver, resource_tracker

    with _signals_ignored(signal.SIGINT, signal.SIGTERM):
        for helper in (forkserver._forkserver, resource_tracker._resource_tracker):
            stop = getattr(helper, "_stop", None)
            if callable(stop):
                stop()


@contextlib.contextmanager
def _signals_ignored(*signals: signal.Signals) -> Iterator[None]:
    """Ignore these signals inside the block (main thread only; elsewhere Python delivers none anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
