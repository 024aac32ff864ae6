"""Processes sharing one decoded-image cache: two processes starting together decode a folder once and hold no copy
of their own, a supervised `run --workers 2` decodes its folder once for all its processes, and a builder frozen
by SIGSTOP is named, not waited for forever.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpsearch.config import DataSection
from hpsearch.data import _cache as cache
from hpsearch.data import cache_state, load_pool
from hpsearch.errors import DataError
from tests.support import (
    COLOURS,
    cli_env,
    colour_folder,
    imagefolder_section,
    run_cli,
    run_on_a_small_tmpfs,
    tiny_tables,
    write_study,
)

# One process loading a study's data as a worker does (pool, split, placement, an epoch of batches), after the
# starting gun; it prints its own anonymous (unshared) resident memory before and after.
PROBE = r'''
import json, sys, time
from pathlib import Path

import torch

from hpsearch.config import DataSection
from hpsearch.data import _cache as cache
from hpsearch.data import cache_state, load_pool
from hpsearch.errors import DataError
from hpsearch.data import load_pool, make_split, trial_data


def anon_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024


cfg = DataSection.model_validate_json(sys.argv[1])
ready, go = Path(sys.argv[2]), Path(sys.argv[3])
before = anon_mib()
ready.touch()
while not go.exists():
    time.sleep(0.01)
pool = load_pool(cfg)
data = trial_data(pool, make_split(pool, cfg, 0), cfg, False, torch.device("cpu"))
seen = sum(len(x) for x, _ in data.train.batches(64, shuffle=True, generator=torch.Generator().manual_seed(0)))
parts = [p for p in (data.val, data.test, data.calibration) if p is not None]
seen += sum(len(x) for part in parts for x, _ in part.batches(256))
print(json.dumps({"before": before, "after": anon_mib(), "seen": seen, "placement": data.train.placement}))
'''


def _jpeg_folder(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / "train" / f"class{i % 4}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)  # smooth enough for JPEG
        Image.fromarray(low).resize((size, size), Image.Resampling.BILINEAR).save(path, quality=90)
    return root


def _probes(cfg: DataSection, tmp_path: Path, n: int, tag: str) -> list[tuple[dict[str, float], str]]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    go = tmp_path / f"go-{tag}"
    probes = [subprocess.Popen([sys.executable, str(script), cfg.model_dump_json(), str(tmp_path / f"ready-{tag}{i}"),
                                str(go)], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for i in range(n)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{tag}{i}").exists() for i in range(n)):
        assert all(p.poll() is None for p in probes) and time.monotonic() < deadline
        time.sleep(0.05)
    go.touch()
    results = []
    for probe in probes:
        out, err = probe.communicate(timeout=300)
        assert probe.returncode == 0, err
        results.append((json.loads(out.strip().splitlines()[-1]), err))
    return results


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_processes_starting_together_decode_once_and_hold_no_copy_of_their_own(tmp_path: Path) -> None:
    n, size = 2000, 160
    root = _jpeg_folder(tmp_path / "photos", n, size)
    decoded_mib = n * 3 * size * size / 2**20
    cfg = imagefolder_section(root, tmp_path, image_size=64, stored_size=size)

    together = _probes(cfg, tmp_path, 2, "stream")
    logs = "".join(err for _, err in together)
    assert logs.count(f"decoding {n} images") == 1, logs  # one build for both
    for figures, _ in together:
        assert figures["seen"] == n and figures["placement"] == "stream"
        # Each holds the pixels through the shared page cache; its own memory grew by well under one copy.
        assert figures["after"] - figures["before"] < 0.25 * decoded_mib, (figures, decoded_mib)

    # The control: a resident copy on the CPU is one private copy of the decoded images per process.
    (resident, err), = _probes(cfg.model_copy(update={"placement": "resident"}), tmp_path, 1, "resident")
    assert "decoding" not in err  # mapped, not decoded again
    assert resident["after"] - resident["before"] > 0.9 * decoded_mib, (resident, decoded_mib)
    print(f"\nCACHE MEMORY [{n} images at {size} px, {decoded_mib:.0f} MiB decoded]: own memory added "
          f"{[round(f['after'] - f['before'], 1) for f, _ in together]} MiB streamed (two processes), "
          f"{resident['after'] - resident['before']:.1f} MiB resident")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_supervised_run_decodes_its_folder_once_for_all_its_processes(tmp_path: Path) -> None:
    """`run --workers 2`: the supervisor and both workers load the data; the folder is decoded once between the
    three, and `status` shows the cache."""
    root = _jpeg_folder(tmp_path / "photos", 160, 32)
    study = write_study(tmp_path / "photos.toml", tiny_tables("photos", data={
        "dataset": "imagefolder", "root": str(root), "image_size": 16, "subset": 0, "augment": ["rrc"],
        "stored_size": 32, "cache_dir": str(tmp_path / "cache")}))
    args = ["--storage", f"sqlite:///{tmp_path / 'photos.db'}", "--artifacts", str(tmp_path / "artifacts")]
    first = run_cli("run", str(study), "--workers", "2", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count("data: decoding 160 images") == 1, first.stderr
    status = run_cli("status", str(study), *args, cwd=tmp_path)
    assert f"data cache: {tmp_path / 'cache'}" in status.stdout, status.stdout
    assert re.search(r"\(\d+(\.\d+)? [kMG]B; deleting it is safe", status.stdout), status.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_full_cache_disk_is_one_line_naming_the_folder_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """The cache folder is a 2 MB tmpfs (a private mount namespace) and the folder decodes to 2.9 MB: `run`
    exits 2 with one line naming the cache folder, no SIGBUS, no traceback, and the tmpfs holds nothing after."""
    root = colour_folder(tmp_path / "photos", {"train": 20}, size=(128, 128))  # 60 images, 48 KiB each decoded
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    study = write_study(tmp_path / "photos.toml", tiny_tables("photos", data={
        "dataset": "imagefolder", "root": str(root), "image_size": 16, "subset": 0, "augment": [],
        "stored_size": 128, "cache_dir": str(cache_dir)}))
    command = [sys.executable, "-m", "hpsearch", "run", str(study), "--storage", f"sqlite:///{tmp_path / 'p.db'}",
               "--artifacts", str(tmp_path / "artifacts")]
    done = run_on_a_small_tmpfs(cache_dir, 2, command, tmp_path, timeout=240)

    assert "rc=2" in done.stderr, done.stderr[-3000:]  # not 135 (SIGBUS)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert f"no room for 2.9 MB in {str(cache_dir)!r}" in line and str(root) in line, line
    assert "cache_dir" in line and "HPSEARCH_CACHE_DIR" in line, line
    files = [entry.split(" ", 1)[1] for entry in done.stdout.splitlines()]
    assert not any(".tmp" in name for name in files), files  # the temp file did not keep the disk full
    assert not any(name.endswith((".u8", ".json")) for name in files), files  # nothing that looks finished


# A process holding a cache's build lock, as a builder does, until a line comes on its stdin.
HOLDER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o640)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


@pytest.mark.timeout(120)
def test_a_cache_builder_frozen_by_sigstop_is_named_and_not_waited_for_forever(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    root = colour_folder(tmp_path / "photos", {"train": 2})
    cfg = imagefolder_section(root, tmp_path)
    state = cache_state(cfg)
    assert state is not None
    lock = state[0].with_suffix(".lock")
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        os.kill(holder.pid, signal.SIGSTOP)
        monkeypatch.setattr(cache, "STOPPED_BUILDER_LIMIT_S", 2.0)  # 60 s in use
        started = time.monotonic()
        with pytest.raises(DataError) as frozen:
            load_pool(cfg)
        waited = time.monotonic() - started
        assert 2.0 <= waited < 15.0, waited
        message = str(frozen.value)
        assert "\n" not in message and message.startswith("data.cache_dir: the image cache of"), message
        assert f"is being built by pid {holder.pid}, stopped (SIGSTOP) for 2 s" in message, message
        assert f"resume it (kill -CONT {holder.pid}) or end it" in message and "HPSEARCH_CACHE_DIR" in message
        err = capfd.readouterr().err
        assert f"waiting for pid {holder.pid}, stopped (SIGSTOP or Ctrl-Z; kill -CONT resumes it)," in err, err

        # Resumed, it ends and lets go of the lock: the next load builds the cache as ever.
        os.kill(holder.pid, signal.SIGCONT)
        assert holder.stdin is not None
        holder.stdin.write("done\n")
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
        assert len(load_pool(cfg).labels) == 2 * len(COLOURS)
    finally:
        holder.kill()
        holder.wait()
