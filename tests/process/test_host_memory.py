"""The processes of `run --workers 2` that run no trial stay small: the supervisor never imports torch (libtorch
is never mapped into it) and peaks under 600 MiB resident; the study's preparation, in a child forked from the
forkserver, decodes the folder (writing the cache with pwrite) and computes the training split's statistics
(reading it with pread) without any page of the images entering its resident set; the supervisor and the
forkserver map none. Measured by bench/host_memory.py on a real run (every process sampled from /proc/PID/smaps,
maps and status while it lives)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import cli_env

BENCH = Path(__file__).parents[2] / "bench" / "host_memory.py"
IMAGES, SIZE = 800, 128
SUPERVISOR_PEAK_MIB = 600  # issue 25 row 12: `run`'s own process


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_processes_that_run_no_trial_hold_no_decoded_image_nor_torch(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--images", str(IMAGES), "--size", str(SIZE), "--json",
                           "--folder", str(tmp_path / "photos")], capture_output=True, text=True, timeout=840,
                          env=cli_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["decoded"], "the run decoded the folder (its preparation, before the workers start)"
    decoded_mib = IMAGES * 3 * SIZE * SIZE / 2**20  # 37.5 MiB
    roles = {p["role"]: p for p in result["processes"]}
    assert {"supervisor", "forkserver", "preparation", "worker 0", "worker 1"} <= set(roles), roles
    supervisor = roles["supervisor"]
    assert not supervisor["maps_torch"], "the supervisor imported torch"
    assert supervisor["hwm_mib"] < SUPERVISOR_PEAK_MIB, supervisor
    assert supervisor["cache_mib"] == 0, supervisor
    # Through a written or read memory map the preparation would hold the decoded images' pages: all of them while
    # it built the cache, the training split's (60 %) after its statistics.
    assert roles["preparation"]["cache_mib"] < 0.05 * decoded_mib, roles["preparation"]
    assert roles["forkserver"]["cache_mib"] == 0, roles["forkserver"]
