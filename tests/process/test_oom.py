"""Out of memory in a trial: a real allocator failure, not a mocked exception.

`hpsearch run` runs in a process whose address space the kernel caps (RLIMIT_AS): the study asks for one batch
far larger than the cap, so the first big allocation of every trial is refused at once (nothing is touched)
and PyTorch's CPU allocator raises its RuntimeError. The worker must live on, each trial be retried once with
the same parameters, and the run stop on the failure streak with its one-line message. Which errors count as out
of memory is in tests/train/test_oom.py.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch.keys import WORKER as ATTR_WORKER
from tests.support import cli_env, tiny_tables, write_study

RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback
GiB = 2**30
# The cap: a normal run of this code base peaks near 4 GB of address space (it runs fine under 6 GiB) ...
ADDRESS_SPACE = 8 * GiB
# ... and the study's one batch is far above it: all 1079 training digits at 1024 px, as float32, is
# 1079 x 3 x 1024 x 1024 x 4 B = 13.6 GB for the resized input alone (the first conv's output would be 72 GB).
OOM_TABLES = {
    "study": {"n_trials": 2, "max_consecutive_failures": 4},
    "data": {"image_size": 1024, "subset": 0, "calibration_fraction": 0},  # every free digit in the one batch
    "train": {"batch_size": 2048},
}
STREAK = OOM_TABLES["study"]["max_consecutive_failures"]


# ---------------------------------------------------------------------------------------- end to end


def _cap_address_space() -> None:  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _run_capped(argv: list[str], cwd: Path, timeout: float) -> tuple[int, int, str, str, int]:
    """(exit code, pid, stdout, stderr, peak RSS in bytes) of a process run under the address-space cap."""
    env = cli_env(OMP_NUM_THREADS="1")
    with open(cwd / "stdout", "wb") as out, open(cwd / "stderr", "wb") as err:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err, preexec_fn=_cap_address_space,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while True:  # wait4, not wait: the child's own peak RSS comes with its exit status
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"`hpsearch run` still running after {timeout} s")
            time.sleep(0.1)
    finally:
        if not pid:
            os.killpg(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    return (code, proc.pid, (cwd / "stdout").read_text(), (cwd / "stderr").read_text(),
            usage.ru_maxrss * 1024)


@pytest.mark.slow
def test_out_of_memory_trials_are_retried_once_and_the_run_stops_on_the_streak(tmp_path):
    study_path = write_study(tmp_path / "oom.toml", tiny_tables("oom", **OOM_TABLES))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    code, pid, stdout, stderr, peak_rss = _run_capped(
        [sys.executable, "-m", "hpsearch", "run", str(study_path), "--storage", url,
         "--artifacts", str(tmp_path / "store")], tmp_path, timeout=240)

    # A clean stop on the failure streak: exit 1, its one line, no traceback; and the huge batch was refused,
    # never touched.
    assert code == 1, stderr[-3000:]
    assert f"stopped: {STREAK} trials failed in a row" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert "trial 0 FAIL out of memory on cpu" in stderr
    assert peak_rss < ADDRESS_SPACE // 2, f"peak RSS {peak_rss / GiB:.1f} GiB"

    trials = optuna.load_study(study_name="oom", storage=url).get_trials(deepcopy=False)
    # Every trial failed out of memory, all in the one process (the worker lived on); none is left RUNNING
    # or WAITING (an even streak ends on a retry, which is not retried again).
    assert len(trials) == STREAK
    assert all(t.state == TrialState.FAIL for t in trials), [t.state for t in trials]
    for t in trials:
        assert t.user_attrs["out_of_memory"] is True
        reason = t.user_attrs["fail_reason"]
        assert reason.startswith("out of memory on cpu: ") and "DefaultCPUAllocator" in reason, reason
        # The refused allocation is the one huge batch, far above the cap: not some allocation at startup.
        asked = int(re.search(r"allocate (\d+) bytes", reason).group(1))
        assert asked > ADDRESS_SPACE * 1.5, reason
        assert "fail_traceback" not in t.user_attrs
        assert t.user_attrs[ATTR_WORKER] == f"{socket.gethostname()}:{pid}"

    # Each original was retried exactly once, with its parameters; a retry was never retried.
    originals = [t for t in trials if not RETRY.retry_history(t)]
    retries = [t for t in trials if RETRY.retry_history(t)]
    assert len(originals) == len(retries) == STREAK // 2
    assert Counter(RETRY.retried_trial_number(t) for t in retries) == Counter(t.number for t in originals)
    by_number = {t.number: t for t in trials}
    for retry in retries:
        assert RETRY.retry_history(retry) == [RETRY.retried_trial_number(retry)]
        original = by_number[RETRY.retried_trial_number(retry)]
        assert retry.params == original.params
        assert retry.user_attrs["seed"] == original.user_attrs["seed"]  # the same configuration, seed included
        assert retry.number not in {n for t in trials for n in RETRY.retry_history(t)}
    assert len({tuple(sorted(t.params.items())) for t in originals}) == len(originals)  # new params each time
