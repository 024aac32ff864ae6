"""`run --workers`' preparation (open_run) in a child process, so that the supervisor never imports torch.

Everything `open_run` checks and builds (the model, the device, the storage, the data and its cache, the study
created or resumed) runs in a child: on the CPU one forked from the forkserver, which has imported torch already;
on a GPU a spawned process, so that nothing CUDA touches the supervisor. The child sends back a small torch-free
`Prepared`; a refusal it prints itself (the same `error:` line) and sends back only its exit code. This module
imports no torch: the child's own imports happen inside `prepared_here`.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from hpsearch.errors import ExitCode

if TYPE_CHECKING:
    from hpsearch.search import Run

CHILD_NAME = "hpsearch-prep"  # its /proc/PID/comm, so that `ps` and bench/host_memory.py tell it from a worker
STOP_GRACE_S = 30.0  # how long an interrupted preparation may take to end before it is killed


@dataclass(frozen=True)
class Prepared:
    """What the supervisor needs of a prepared run, torch-free."""

    url: str  # the resolved storage URL (the workers get it through HPSEARCH_STORAGE)
    artifacts: str  # a folder or s3://bucket/prefix
    n_trials: int
    device: str  # the resolved device, as `run` prints it
    gpus: tuple[int, ...]  # the GPUs the workers are pinned to; empty: CPU workers forked from the forkserver
    data: str  # the banner's split sizes (and folds)


def prepared_here(args: argparse.Namespace) -> Prepared:
    """open_run in this process (the child's work; the in-process tests' too); with `--gpus`, check_gpus first."""
    from hpsearch._testhooks import hold_at
    from hpsearch.config import read_study_file
    from hpsearch.search import open_run
    from hpsearch.workers import check_gpus, visible_gpus

    if args.gpus is not None:
        cfg = read_study_file(args.study, args.set)
        check_gpus(args.gpus, args.device or cfg.train.device)  # before the study opens: no trial on a wrong GPU
    run = open_run(args.study, storage=args.storage, artifacts=args.artifacts, device=args.device,
                   n_trials=args.n_trials, overrides=args.set)
    hold_at("prepared")
    gpus = () if run.device.type == "cpu" else tuple(args.gpus or visible_gpus())
    return Prepared(run.url, str(run.artifacts), run.n_trials, str(run.device), gpus, data_facts(run))


def data_facts(run: Run) -> str:
    """The banner's split sizes, and folds."""
    folds = f" in {len(run.prepared.folds.sizes())} folds of train+val" if run.prepared.folds is not None else ""
    return f"{run.prepared.split.sizes()}{folds}"


def prepared_in_this_process(args: argparse.Namespace, forked: bool) -> Prepared | ExitCode:
    """`prepare`'s outcome without a child (in-process tests that fake CUDA in their own process)."""
    return _outcome(args)


def _outcome(args: argparse.Namespace) -> Prepared | ExitCode:
    """Prepared, or the exit code of a refusal whose one line is printed here, as `main` prints it."""
    from hpsearch.cli._main import refusal

    try:
        return prepared_here(args)
    except Exception as err:
        code = refusal(err)
        if code is None:
            raise
        return code


def _child(args: argparse.Namespace, env: dict[str, str], conn: Connection) -> None:
    """The child: `main`'s set-up (log format, verbosity), then the preparation; its outcome goes to `conn`."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(CHILD_NAME)
    os.environ.clear()
    os.environ.update(env)
    from hpsearch.cli._main import set_up_process
    from hpsearch.workers import install_stop_handler

    install_stop_handler()  # SIGTERM as Ctrl-C; a second signal does not interrupt the first one's clean-up
    set_up_process(args.verbosity, optuna=True)
    try:
        outcome: Prepared | ExitCode = _outcome(args)
    except KeyboardInterrupt:
        outcome = ExitCode.INTERRUPTED
    except Exception:
        traceback.print_exc()
        outcome = ExitCode.FAILURE_STREAK  # an unexpected error: its traceback, exit 1 as `main` would
    conn.send(outcome if isinstance(outcome, Prepared) else int(outcome))
    conn.close()


def prepare(args: argparse.Namespace, forked: bool) -> Prepared | ExitCode:
    """Run the preparation in a child (`forked`: from the running forkserver; else spawned) and wait for it.
    Ctrl-C or SIGTERM meanwhile: the child is interrupted (killed after STOP_GRACE_S) and KeyboardInterrupt is
    raised here, as a single-process run raises it."""
    context = multiprocessing.get_context("forkserver" if forked else "spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(args, dict(os.environ), send), name=CHILD_NAME)
    asked: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: asked.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        child.start()
        send.close()
        outcome = _wait(child, receive, asked)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if outcome is None:
        raise KeyboardInterrupt
    return outcome if isinstance(outcome, Prepared) else ExitCode(outcome)


def _wait(child: multiprocessing.process.BaseProcess, receive: Connection, asked: list[int]
          ) -> Prepared | int | None:
    """The child's outcome; None when a signal stopped the preparation."""
    interrupted_at: float | None = None
    while True:
        if asked and interrupted_at is None:
            interrupted_at = time.monotonic()
            if child.exitcode is None and child.pid is not None:
                os.kill(child.pid, signal.SIGINT)  # its KeyboardInterrupt, once (Ctrl-C to the group sent one too)
        if receive.poll(0.2):
            try:
                outcome: Prepared | int = receive.recv()
            except EOFError:  # it died without a word
                outcome = -1
            child.join()
            if asked or outcome == ExitCode.INTERRUPTED:
                return None
            if outcome == -1:
                raise RuntimeError(f"the study's preparation (pid {child.pid}) died with exit code {child.exitcode}")
            return outcome
        if interrupted_at is not None and time.monotonic() - interrupted_at > STOP_GRACE_S:
            child.kill()
            child.join()
            return None
