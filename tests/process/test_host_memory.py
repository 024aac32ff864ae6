"""The processes of `run --workers 2` that run no trial hold no decoded image: the supervisor decodes the folder
(writing the cache with pwrite) and computes the training split's statistics (reading it with pread) without
any page of the images entering its resident set, and the forkserver maps none. Measured by bench/host_memory.py
on a real run (every process sampled from /proc/PID/smaps and status while it lives)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import cli_env

BENCH = Path(__file__).parents[2] / "bench" / "host_memory.py"
IMAGES, SIZE = 800, 128


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_processes_that_run_no_trial_hold_no_decoded_image(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--images", str(IMAGES), "--size", str(SIZE), "--json",
                           "--folder", str(tmp_path / "photos")], capture_output=True, text=True, timeout=840,
                          env=cli_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["decoded"], "the run decoded the folder (its supervisor, before the workers start)"
    decoded_mib = IMAGES * 3 * SIZE * SIZE / 2**20  # 37.5 MiB
    roles = {p["role"]: p for p in result["processes"]}
    assert {"supervisor", "forkserver", "worker 0", "worker 1"} <= set(roles), roles
    # Through a written or read memory map the supervisor held the decoded images' pages: all of them while it
    # built the cache, the training split's (60 %) after its statistics, for the whole run.
    assert roles["supervisor"]["cache_mib"] < 0.05 * decoded_mib, roles["supervisor"]
    assert roles["forkserver"]["cache_mib"] == 0, roles["forkserver"]
