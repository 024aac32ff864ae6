"""A big image folder searched with two workers: decode time, time to the second worker's first trial, memory.

Writes a folder of N JPEGs (4 classes) at --size px, then runs `hpsearch run STUDY --workers 2` on it twice, with
the splits streamed from the shared cache (the CPU default) and resident (a private copy per worker). Each run
starts from an empty cache: its supervisor decodes the folder once, and both workers map the file. While a run
lasts, every process of it (the supervisor and its workers) is sampled every 0.2 s from /proc: its own memory
(RssAnon: anonymous pages, never shared) and its resident set (Rss, with the cache's page-cache pages).

    .venv/bin/python bench/data_scale.py [--images 4000] [--size 224] [--image-size 32] [--folder DIR]

Prints, per run: the decode time (the supervisor's `decoded ... in X s` line), seconds from the start to the
first trial of the second worker, and each process's peak own and resident memory, with the decoded size.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import optuna
from PIL import Image

from hpsearch.store import open_storage


def make_folder(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / "train" / f"class{i % 4}" / f"{i:05d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        # Smooth random content (upsampled noise), so JPEG sizes look like photos', not like noise.
        low = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC).save(path, quality=90)


STUDY = """[study]
name = "scale"
n_trials = 2
sampler = "random"
pruner = "none"
seed = 0
heartbeat_interval = 0

[data]
dataset = "imagefolder"
root = "{root}"
image_size = {image_size}
stored_size = {size}
augment = ["crop"]
cache_dir = "{cache}"
placement = "{placement}"

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


def memory_mib(pid: int) -> tuple[float, float] | None:
    """(RssAnon, Rss) of a process in MiB, None once it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except (OSError, ValueError):
        return None
    if "RssAnon" not in fields:  # a zombie: exited, not reaped yet
        return None
    return int(fields["RssAnon"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run(root: Path, work: Path, args: argparse.Namespace, placement: str) -> None:
    cache = work / f"cache-{placement}"
    shutil.rmtree(cache, ignore_errors=True)
    study = work / f"scale-{placement}.toml"
    study.write_text(STUDY.format(root=root, image_size=args.image_size, size=args.size, cache=cache,
                                  placement=placement))
    db = work / f"scale-{placement}.db"
    db.unlink(missing_ok=True)
    env = {**os.environ, "HPSEARCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch", "run", str(study), "--workers", "2",
                             "--storage", f"sqlite:///{db}", "--artifacts", str(work / f"artifacts-{placement}")],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    peaks: dict[int, list[float]] = {}
    roles: dict[int, str] = {proc.pid: "supervisor"}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for i, child in enumerate(children(proc.pid)):
                roles.setdefault(child, f"worker {i}")
            for pid in list(roles):
                figures = memory_mib(pid)
                if figures is not None:
                    old = peaks.setdefault(pid, [0.0, 0.0])
                    peaks[pid] = [max(old[0], figures[0]), max(old[1], figures[1])]
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}):\n{err[-3000:]}")
    decode = re.search(r"decoded (\d+) images into .* in ([\d.]+) s", err)
    trials = optuna.load_study(study_name="scale", storage=open_storage(f"sqlite:///{db}")).trials
    firsts = sorted(min(t.datetime_start.timestamp() for t in trials if t.user_attrs.get("worker") == w)
                    for w in {t.user_attrs.get("worker") for t in trials})
    decoded_mib = args.images * 3 * args.size * args.size / 2**20
    print(f"{placement}: decoded {decode.group(1) if decode else '?'} images in {decode.group(2) if decode else '?'} s "
          f"(decoding lines: {err.count('data: decoding')}); second worker's first trial "
          f"{firsts[-1] - start:.1f} s after the start; decoded size {decoded_mib:.0f} MiB")
    for pid, (anon, rss) in sorted(peaks.items(), key=lambda item: roles[item[0]]):
        print(f"  {roles[pid]:>10} (pid {pid}): peak own (RssAnon) {anon:7.1f} MiB, peak resident (Rss) {rss:7.1f} MiB")
    print(f"  total own {sum(a for a, _ in peaks.values()):.1f} MiB over {len(peaks)} processes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=224, help="stored size, px")
    parser.add_argument("--image-size", type=int, default=32, help="training size, px")
    parser.add_argument("--folder", type=Path, default=None, help="where the folder is written (kept)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hpsearch-scale-"))
    root = args.folder or work / "photos"
    t0 = time.perf_counter()
    make_folder(root, args.images, args.size)
    print(f"folder: {args.images} JPEGs at {args.size} px in {root} (written in {time.perf_counter() - t0:.1f} s); "
          f"nproc {os.cpu_count()}, loadavg {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    for placement in ("stream", "resident"):
        run(root, work, args, placement)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
