"""The processes the process-level tests start and kill, and the study's trials as another process sees them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

import hpsearch
from tests.support._studies import cli_env


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def process_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
    env["HPSEARCH_CACHE_DIR"] = os.environ["HPSEARCH_CACHE_DIR"]  # the test run's own (conftest)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Procs:
    """Starts processes in their own process group, logs to files, kills what is left at teardown."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], name: str, **env: str) -> subprocess.Popen[bytes]:
        with open(self.folder / f"{name}.out", "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**process_env(), **env},
                                    cwd=self.folder, start_new_session=True)
        proc.name = name  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def output(self, proc: subprocess.Popen[bytes], tail: int = 4000) -> str:
        text = (self.folder / f"{proc.name}.out").read_text(errors="replace")  # type: ignore[attr-defined]
        return text[-tail:]

    def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{proc.name} did not exit within {timeout:.0f} s:\n{self.output(proc)}")  # type: ignore[attr-defined]

    def kill_all(self) -> None:
        for proc in self.started:
            # The process and every worker it started (its own session); only while one of them is left.
            if proc.poll() is None or session_members(proc.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def hpsearch_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpsearch", *args]


def trials_of(url: str, name: str) -> list[FrozenTrial]:
    """The study's trials as another process sees them now ([] while the study does not exist yet)."""
    storage = hpsearch.open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return []
    finally:
        hpsearch.store._storage.close_storage(storage)


def states_of(trials: list[FrozenTrial]) -> dict[str, int]:
    return dict(Counter(t.state.name for t in trials))


def pid_of(tag: str) -> int:
    host, pid = tag.split(" ", 1)[0].rsplit(":", 1)  # "host:pid", then " slurm JOB_TASK" under SLURM
    assert host == socket.gethostname(), tag
    return int(pid)


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def is_descendant(pid: int, ancestor: int) -> bool:
    """Whether `ancestor` started `pid`, itself or through its children (a forkserver's workers)."""
    parent = _parent_of(pid)
    while parent not in (None, 0, 1):
        if parent == ancestor:
            return True
        parent = _parent_of(parent)
    return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds the pid
        return False
    return True


def session_members(sid: int) -> list[int]:
    """Pids in session `sid` (the run and everything it started; Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def held_trials(url: str, name: str, n: int, proc: subprocess.Popen[bytes], procs: Procs) -> list[FrozenTrial]:
    """Wait until `n` trials are RUNNING and held after their first epoch's checkpoint (never a new trial's
    retry); the held trials."""

    def held() -> list[FrozenTrial]:
        if proc.poll() is not None:
            pytest.fail(f"{proc.name} exited early ({proc.returncode}):\n{procs.output(proc)}")  # type: ignore[attr-defined]
        running = [t for t in trials_of(url, name) if t.state == TrialState.RUNNING and "worker" in t.user_attrs
                   and t.user_attrs.get("checkpoint_epoch") == 1 and "failed_trial" not in t.system_attrs]
        return running if len(running) >= n else []

    return wait_until(f"{n} trial(s) held after epoch 1", held, timeout=240, every=0.2)


def run_on_a_small_tmpfs(folder: Path, size_mb: int, command: list[str], cwd: Path, *, prelude: str = "",
                         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `command` with `folder` a fresh tmpfs of `size_mb` (a private mount namespace: no privileges beyond a
    user namespace), after the shell lines `prelude`; its stderr ends with `rc=N`, its stdout lists the files
    left in `folder` as `SIZE NAME` lines. Skips the test where no such namespace can be made."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private tmpfs")
    script = (f"mount -t tmpfs -o size={size_mb}m tmpfs '{folder}' || exit 99\n"
              f"{prelude}"
              f"{' '.join(repr(part) for part in command)}\n"
              "echo \"rc=$?\" >&2\n"
              f"find '{folder}' -type f -printf '%s %f\\n'\n")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {done.stderr.strip()}")
    return done
