"""Host memory of the processes of `run --workers 2` that train nothing: the supervisor and the forkserver.

Writes a folder of N JPEGs (4 classes) at --size px (kept across runs in --folder), then runs `hpsearch run STUDY
--workers 2 --device cpu` on it from an empty cache (the study's preparation decodes the folder) and, with --again,
a second time on the cache it left (the preparation maps it). While a run lasts every process of it is sampled
every 0.1 s from /proc/PID/status: the supervisor (the `run` process), the forkserver and multiprocessing's
resource tracker (its children), the preparation's child (forked from the forkserver before any worker, named
hpsearch-prep) and the workers (the forkserver's other children). For each it prints its peak resident set
(VmHWM: the kernel's own high-water mark, with every page it mapped: libraries, the image cache's page-cache
pages), its peak own memory (RssAnon: anonymous pages, never shared), its resident set while the workers run
(VmRSS at the last sample with a worker alive, and its Pss then: shared pages divided among their sharers) and,
for the processes that run no trial, the most pages of the image cache's files (the decoded images, or the file
being built) it held at once (/proc/PID/smaps); for the supervisor, whether libtorch was ever mapped into it
(/proc/PID/maps).

    .venv/bin/python bench/host_memory.py [--images 4000] [--size 224] [--again] [--json]

With --json, one JSON object per run on stdout instead of the table (tests/process/test_host_memory.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

STUDY = """[study]
name = "memory"
n_trials = 2
sampler = "random"
pruner = "none"
seed = 0
heartbeat_interval = 0

[data]
dataset = "imagefolder"
root = "{root}"
image_size = 32
stored_size = {size}
augment = []
cache_dir = "{cache}"

[model]
arch = "resnet18"

[train]
epochs = 1
batch_size = 256
device = "cpu"
checkpoint_every = 0

[space]
lr = [1e-3, 3e-3]
optimizer = ["adam"]
scheduler = ["none"]
dropout = [0.0, 0.1]
"""


def make_folder(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / "train" / f"class{i % 4}" / f"{i:05d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        # Smooth random content (upsampled noise), so JPEG sizes look like photos', not like noise.
        low = rng.integers(0, 256, (max(1, size // 16), max(1, size // 16), 3), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC).save(path, quality=90)


@dataclass
class Peak:
    role: str
    pid: int
    hwm_mib: float = 0.0  # VmHWM
    anon_mib: float = 0.0  # peak RssAnon
    rss_with_workers_mib: float = 0.0  # VmRSS at the last sample that saw a worker alive
    pss_with_workers_mib: float = 0.0  # Pss (shared pages divided among their sharers) at that sample
    cache_mib: float = 0.0  # peak resident pages of files in the cache folder (the decoded images, the build's file)
    maps_torch: bool = False  # whether libtorch was ever mapped into it (/proc/PID/maps)


def _status(pid: int) -> dict[str, float] | None:
    """VmHWM, VmRSS and RssAnon of `pid` in MiB; None once it is gone (or a zombie)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    if "RssAnon" not in fields:
        return None
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmHWM", "VmRSS", "RssAnon")}


def _mapped_mib(pid: int, folder: Path) -> float:
    """Resident MiB of this process's mappings of files in `folder` (/proc/PID/smaps)."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return 0.0
    total, inside = 0, False
    for line in text.splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header: its address range, then its file
            inside = line.split()[-1].startswith(str(folder))
        elif inside and first == "Rss:":
            total += int(line.split()[1])
    return total / 1024


def _pss_mib(pid: int) -> float:
    """Proportional set size of `pid` in MiB (/proc/PID/smaps_rollup): each shared page divided among the
    processes that map it (the forkserver's torch, shared with the workers it forked, counts a third each)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in text.splitlines() if line.startswith("Pss:")), 0.0)


def _maps_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _role(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    return "forkserver" if "forkserver" in command else "resource tracker" if "resource_tracker" in command else "?"


def measure(root: Path, work: Path, size: int, label: str) -> dict[str, object]:
    """One `run --workers 2` on `root` with its cache in work/cache; the peaks of each of its processes."""
    study = work / "memory.toml"
    study.write_text(STUDY.format(root=root, size=size, cache=work / "cache"))
    db = work / f"memory-{label}.db"
    env = {**os.environ, "HPSEARCH_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("HPSEARCH_STORAGE", None)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch", "run", str(study), "--workers", "2",
                             "--storage", f"sqlite:///{db}", "--artifacts", str(work / f"artifacts-{label}")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, Peak] = {proc.pid: Peak("supervisor", proc.pid)}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for child in _children(proc.pid):
                if child not in peaks:
                    peaks[child] = Peak(_role(child), child)
                if peaks[child].role == "forkserver":
                    # Its children: first the study's preparation (it has exited before the first worker
                    # starts; it names itself hpsearch-prep a moment after its fork), then the workers.
                    for forked in _children(child):
                        if forked not in peaks:
                            forked_before = [p for p in peaks.values() if p.role == "preparation"
                                             or p.role.startswith("worker")]
                            peaks[forked] = Peak(f"worker {len(forked_before) - 1}" if forked_before
                                                 else "preparation", forked)
            figures = {pid: _status(pid) for pid in list(peaks)}
            working = any(peak.role.startswith("worker") and figures[pid] is not None for pid, peak in peaks.items())
            for pid, status in figures.items():
                if status is None:
                    continue
                peak = peaks[pid]
                peak.hwm_mib = max(peak.hwm_mib, status["VmHWM"])
                peak.anon_mib = max(peak.anon_mib, status["RssAnon"])
                if working:
                    peak.rss_with_workers_mib = status["VmRSS"]
                    peak.pss_with_workers_mib = _pss_mib(pid) or peak.pss_with_workers_mib  # 0: it just exited
                if not peak.role.startswith("worker"):  # the workers map the images on purpose
                    peak.cache_mib = max(peak.cache_mib, _mapped_mib(pid, work / "cache"))
                if peak.role == "supervisor":
                    peak.maps_torch = peak.maps_torch or _maps_torch(pid)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}):\n{err[-3000:]}")
    return {"label": label, "seconds": round(time.perf_counter() - start, 1),
            "decoded": "data: decoding" in err, "processes": [asdict(p) for p in peaks.values()]}


def _print(result: dict[str, object], decoded_mib: float) -> None:
    print(f"{result['label']}: {'decoded the folder' if result['decoded'] else 'mapped the cache'}, "
          f"{result['seconds']} s; decoded size {decoded_mib:.0f} MiB")
    processes = result["processes"]
    assert isinstance(processes, list)
    for p in processes:
        print(f"  {p['role']:>16} (pid {p['pid']}): peak resident (VmHWM) {p['hwm_mib']:7.1f} MiB, peak own "
              f"(RssAnon) {p['anon_mib']:7.1f} MiB, resident while workers run {p['rss_with_workers_mib']:7.1f} MiB "
              f"(Pss {p['pss_with_workers_mib']:6.1f})"
              + ("" if p["role"].startswith("worker") else f", image pages held at most {p['cache_mib']:.1f} MiB")
              + (f", libtorch mapped: {'yes' if p['maps_torch'] else 'no'}" if p["role"] == "supervisor" else ""))
    idle = [p for p in processes if not p["role"].startswith("worker") and p["role"] != "preparation"]
    rss, pss = (sum(p[key] for p in idle) for key in ("rss_with_workers_mib", "pss_with_workers_mib"))
    print(f"  processes that run no trial beside the workers ({', '.join(p['role'] for p in idle)}): peak resident "
          f"{sum(p['hwm_mib'] for p in idle):.1f} MiB in all; while the workers run {rss:.1f} MiB resident, "
          f"Pss {pss:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=224, help="stored size, px")
    parser.add_argument("--folder", type=Path, default=None, help="where the folder is written (kept)")
    parser.add_argument("--again", action="store_true", help="a second run on the cache the first one left")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hpsearch-memory-"))
    root = args.folder or work / "photos"
    make_folder(root, args.images, args.size)
    decoded_mib = args.images * 3 * args.size * args.size / 2**20
    if not args.json:
        print(f"{args.images} JPEGs at {args.size} px in {root}; nproc {os.cpu_count()}, loadavg "
              f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    try:
        for label in ("first", "again")[:2 if args.again else 1]:
            result = measure(root, work, args.size, label)
            print(json.dumps(result)) if args.json else _print(result, decoded_mib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not args.json:
        print(f"loadavg after {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


if __name__ == "__main__":
    main()
