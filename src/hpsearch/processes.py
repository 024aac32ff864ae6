"""Other processes of this machine as Linux's /proc shows them: a process's state (gone, stopped, running) and
which process holds a file lock. The supervisor watches its workers with it, and the image cache the process
that builds it, so that a frozen (SIGSTOP) process is named and dealt with instead of waited for forever.

Without /proc (not Linux) nothing is known: every function answers None and callers go on as before.
"""

from __future__ import annotations

import os

# What a state letter of /proc/PID/stat means to a user reading one line about that process.
_STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "waiting on the disk",
    "T": "stopped (SIGSTOP or Ctrl-Z; kill -CONT resumes it)",
    "t": "stopped by a debugger",
    "Z": "exited",
    "X": "exited",
    "I": "idle",
}


def process_state(pid: int) -> str | None:
    """The one-letter state of process `pid` (R, S, D, T stopped, t traced, Z zombie, ...), None when it is gone
    or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name, in parentheses, may hold spaces or ')': the state follows the last ')'.
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def is_stopped(pid: int) -> bool:
    """Whether `pid` is stopped by a signal (SIGSTOP, SIGTSTP): frozen until someone sends SIGCONT. A process
    stopped by a debugger (state t) is not: someone is looking at it on purpose."""
    return process_state(pid) == "T"


def describe_state(state: str | None) -> str:
    return "gone" if state is None else _STATES.get(state, f"in state {state}")


def flock_holder(fd: int) -> int | None:
    """The pid holding a flock on the file open as `fd`, from /proc/locks; None when no process of this machine
    holds one (or it cannot be told). flock records the process that took the lock."""
    st = os.fstat(fd)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 2395 fe:00:2147057 0 EOF"; "1: -> FLOCK ..." lines are waiters.
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device and fields[4].isdigit():
                    return int(fields[4])
    except OSError:
        pass
    return None
