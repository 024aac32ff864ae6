"""Images/s of an ensemble's forward pass: members in a loop vs one vmapped call (hpsearch.infer).

5 ResNet-18 members (random weights, 10 classes, 32x32 input), batch 64, the full `Ensemble` forward
(members, softmaxes, weighted average, temperature) under inference mode, on every available device. The two
strategies are timed in many short alternating rounds (so a change in the machine's load hits both alike).
Per strategy it prints the best round (the least disturbed by other processes: the figure to compare on a
shared machine), the median round, and images per CPU-second of this process (wall-clock independent). Prints
the machine (nproc, loadavg before and after, torch threads) with the figures.

    .venv/bin/python bench/ensemble_infer.py [--members 5] [--batch-size 64] [--rounds 15] [--seconds 1] [--threads N]

With one CPU thread (`--threads 1`) no thread waits on another that the OS descheduled, so images per
CPU-second compare the two strategies' work even on a loaded machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision import models

from hpsearch.predict import Ensemble
from hpsearch.preprocess import Preprocess

STRATEGIES = ("loop", "vmap")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def build(members: int, strategy: str, device: torch.device) -> Ensemble:
    torch.manual_seed(0)
    nets = [models.get_model("resnet18", num_classes=10).eval() for _ in range(members)]
    pre = Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    weights = [1.0 / members] * members
    return Ensemble(nets, weights, "weighted", 1.5, [str(c) for c in range(10)], pre, {}, strategy).to(device).eval()


def images_per_second(forward: Callable[[], torch.Tensor], batch: int, seconds: float, sync: Callable[[], None]
                      ) -> tuple[float, float]:
    """Batches run back to back for at least `seconds` (at least 3 batches): (images per wall-clock second,
    images per CPU-second of this process)."""
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        forward()
        n += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 3:
            return n * batch / elapsed, n * batch / max(time.process_time() - cpu, 1e-9)


def bench_device(device: torch.device, members: int, batch: int, rounds: int, seconds: float) -> dict[str, float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    ensembles = {s: build(members, s, device) for s in STRATEGIES}
    with torch.inference_mode():
        outputs = {s: e(x) for s, e in ensembles.items()}
        diff = float((outputs["loop"] - outputs["vmap"]).abs().max())
        for e in ensembles.values():  # warm-up: allocator, kernels, vmap's first trace
            for _ in range(2):
                e(x)
            sync()
        runs: dict[str, list[float]] = {s: [] for s in STRATEGIES}
        per_cpu: dict[str, list[float]] = {s: [] for s in STRATEGIES}
        for i in range(rounds):
            for s in STRATEGIES if i % 2 == 0 else STRATEGIES[::-1]:
                wall, cpu = images_per_second(lambda e=ensembles[s]: e(x), batch, seconds, sync)
                runs[s].append(wall)
                per_cpu[s].append(cpu)
    print(f"  max |loop - vmap| probability: {diff:.2e}")
    for s in STRATEGIES:
        r = runs[s]
        print(f"  {s:4s}: best {max(r):7.1f} images/s, median {statistics.median(r):7.1f}, worst {min(r):7.1f} "
              f"({rounds} rounds); {statistics.median(per_cpu[s]):7.1f} images per CPU-second (median)")
    return {s: max(r) for s, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=1.0, help="per strategy and round")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}")
    print(f"nproc {os.cpu_count()} (usable {len(os.sched_getaffinity(0))}), torch threads "
          f"{torch.get_num_threads()}, loadavg {loadavg()}")
    print(f"{args.members} x resnet18, 10 classes, 32x32, batch {args.batch_size}, {args.rounds} rounds x "
          f"{args.seconds:g} s per strategy, interleaved")
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        print(f"{device} ({name}):")
        result = bench_device(device, args.members, args.batch_size, args.rounds, args.seconds)
        print(f"  vmap / loop (best rounds) = {result['vmap'] / result['loop']:.2f}")
    print(f"loadavg after {loadavg()}")


if __name__ == "__main__":
    main()
