"""Training images/s on one device: the tutorials' pipeline, hpsearch's trial loop, and the bare step.

    .venv/bin/python bench/trial_speed.py [--device cpu|cuda] [--arch resnet18] [--image-size 32]
                                          [--batch-size 128] [--images 10000] [--windows 5] [--steps 8]
                                          [--recipes]

On one device, model and batch size, after a warm-up, the median images/s over `--windows` timed windows of
`--steps` optimizer steps each, for:

1. naive: as the tutorials write it — a torchvision-CIFAR-style dataset (uint8 HWC arrays, `Image.fromarray` per
   item), PIL transforms (random crop with 4 px padding, flip, ToTensor, Normalize), `DataLoader(num_workers=
   min(8, cpus), pin_memory=True, shuffle=True)`, fp32, `loss.item()` every step;
2. naive-bf16: the same under bf16 autocast;
3. ours: hpsearch's trial loop (`hpsearch.train._loop.train_steps` on `trial_data`: uint8 batches on the device,
   batched crop + flip, the study's precision), resident and streamed;
4. bare: the optimizer step alone on random tensors already on the device;
5. trial: a whole trial as the objective runs it (`train_trial`: the model built, 2 epochs with their
   validation and the best epoch's outputs), its training images x epochs over its wall time: what the step
   loop's figure becomes once everything around it is counted;
6. with `--recipes`, ours (resident) again with each regularizer a study's [space] may turn on: mixup, cutmix,
   randaugment (augment_strength 0.5) and ema, each with its cost relative to ours.

Kernel settings are each mode's own, set on entry and restored after (none leaks into the next mode): naive
and naive-bf16 run with torch's defaults, as a tutorial does (cuDNN autotuning off, its TF32 convolutions on);
ours, bare and trial run as a trial does (`hpsearch.kernels.ieee_fp32`: autotuning on, TF32 off), so ours/bare
isolates the input pipeline. The images are CIFAR-sized random uint8 (no dataset download here); every pipeline
sees the same ones. Last line: `ours/naive=X ours/naive-bf16=Y ours/bare=Z trial/ours=W` (ours = the resident
run). Needs torch and torchvision; (3) needs hpsearch but
no database and no Optuna.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def tutorial_kernels() -> Iterator[None]:
    """torch's default kernel flags, whatever ran before: cuDNN autotuning off, TF32 convolutions on."""
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = False, True
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = before


def timed(step: Callable[[], None], device: torch.device, args: argparse.Namespace) -> float:
    """Median images/s over the windows, after two warm-up windows."""
    rates = []
    for window in range(args.windows + 2):
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        if window >= 2:
            rates.append(args.steps * args.batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def make_model(arch: str, device: torch.device) -> nn.Module:
    from torchvision import models

    torch.manual_seed(0)
    model = getattr(models, arch)(num_classes=10).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.train()


class CifarStyle(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: a uint8 HWC array to a PIL image, then the transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def naive(images: np.ndarray, labels: np.ndarray, device: torch.device, args: argparse.Namespace,
          bf16: bool) -> float:
    from torchvision import transforms

    transform = transforms.Compose([transforms.RandomCrop(args.image_size, padding=4),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(CifarStyle(images, labels, transform), batch_size=args.batch_size,
                                         shuffle=True, num_workers=min(8, os.cpu_count() or 1), pin_memory=True,
                                         drop_last=True, persistent_workers=True)
    model = make_model(args.arch, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from loader

    feed = batches()

    def step() -> None:
        x, y = next(feed)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the tutorials print or accumulate it: a host synchronization every step

    return timed(step, device, args)


RECIPES = ("mixup", "cutmix", "randaugment", "ema")


def ours(images: np.ndarray, labels: np.ndarray, device: torch.device, args: argparse.Namespace,
         placement: str, recipe: str = "") -> float:
    from hpsearch.config import DataSection, TrainSection
    from hpsearch.data import ImagePool, Split, mixer, trial_data
    from hpsearch.train import Hyperparams
    from hpsearch.train._accelerator import choose_precision
    from hpsearch.train._ema import WeightEMA
    from hpsearch.train._loop import train_steps
    from hpsearch.train._optim import make_schedule

    pool = ImagePool(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                     torch.from_numpy(labels), [str(c) for c in range(10)])
    n = len(labels)
    # Just enough images for the measured steps: train_steps runs one epoch.
    per_call = args.steps * args.batch_size
    split = Split(np.arange(per_call), np.arange(per_call, per_call + 10), np.arange(n - 10, n))
    cfg = DataSection(dataset="synthetic", image_size=args.image_size, augment=["crop", "flip"] if args.flip else
                      ["crop"], placement=placement)  # type: ignore[arg-type]
    data = trial_data(pool, split, cfg, False, device)
    train = TrainSection(epochs=1, batch_size=args.batch_size, device=device.type)  # type: ignore[arg-type]
    precision = choose_precision("auto", device)
    model = make_model(args.arch, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **({"fused": True} if device.type == "cuda" else {}))
    schedule = make_schedule(optimizer, Hyperparams(lr=1e-3, optimizer="adam", scheduler="none"), 1, 1)
    scaler = precision.scaler(device)
    gen = torch.Generator().manual_seed(0)
    aug = torch.Generator(device=device).manual_seed(0) if device.type == "cuda" else gen
    # A recipe as a trial with it on runs it (RECIPES; "" = none).
    recipe_args = {"mix": mixer(recipe, 1.0, 10) if recipe in ("mixup", "cutmix") else None,
                   "augment_strength": 0.5 if recipe == "randaugment" else 0.0,
                   "ema": WeightEMA(model, 0.999) if recipe == "ema" else None}

    # One call of train_steps (one epoch of the split's train part) is one window of `--steps` steps.
    def window() -> None:
        train_steps(model, optimizer, scaler, data, train.batch_size, 0.0, schedule, precision, gen, aug,
                    **recipe_args)

    steps, args.steps = args.steps, 1
    try:
        rate = timed(window, device, args) * steps
    finally:
        args.steps = steps
    return rate


def trial(images: np.ndarray, labels: np.ndarray, device: torch.device, args: argparse.Namespace) -> float:
    from hpsearch.config import DataSection, ModelSection, TrainSection
    from hpsearch.data import ImagePool, Split, trial_data
    from hpsearch.train import Hyperparams, train_trial

    pool = ImagePool(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                     torch.from_numpy(labels), [str(c) for c in range(10)])
    n = len(labels)
    held = max(args.batch_size, n // 10)  # validation and test
    n_train = n - 2 * held
    split = Split(np.arange(n_train), np.arange(n_train, n_train + held), np.arange(n_train + held, n))
    cfg = DataSection(dataset="synthetic", image_size=args.image_size, augment=["crop", "flip"] if args.flip else
                      ["crop"], placement="resident")
    data = trial_data(pool, split, cfg, False, device)
    model_cfg = ModelSection(arch=args.arch)
    hp = Hyperparams(lr=1e-3, optimizer="adam", scheduler="none")
    epochs = 2
    train = TrainSection(epochs=epochs, batch_size=args.batch_size, device=device.type)  # type: ignore[arg-type]
    warm = TrainSection(epochs=1, batch_size=args.batch_size, device=device.type)  # type: ignore[arg-type]
    train_trial(model_cfg, warm, data, hp, seed=0, device=device)  # compilation of kernels, autotuning
    sync(device)
    start = time.perf_counter()
    train_trial(model_cfg, train, data, hp, seed=1, device=device)
    sync(device)
    return n_train * epochs / (time.perf_counter() - start)


def bare(device: torch.device, args: argparse.Namespace) -> float:
    from hpsearch.train._accelerator import choose_precision

    precision = choose_precision("auto", device)
    model = make_model(args.arch, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **({"fused": True} if device.type == "cuda" else {}))
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    def step() -> None:
        with precision.autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(step, device, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed window")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="ours without flip (digits-like)")
    parser.add_argument("--skip", default="", help="comma-separated modes to leave out (naive,naive-bf16,...)")
    parser.add_argument("--recipes", action="store_true", help="also ours with each of " + ", ".join(RECIPES))
    args = parser.parse_args()
    device = torch.device(args.device)
    threads = os.environ.get("HPSEARCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"torch {torch.__version__}, python {platform.python_version()}, device {device} ({name}), "
          f"nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}, loadavg {loadavg()}")
    print(f"{args.arch}, {args.image_size} px, batch {args.batch_size}, median of {args.windows} windows x "
          f"{args.steps} steps after 2 warm-up windows")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, args.image_size, args.image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images).astype(np.int64)
    skip = set(args.skip.split(",")) - {""}
    rates: dict[str, float] = {}
    from hpsearch.kernels import ieee_fp32

    runs: list[tuple[str, Callable[[], float]]] = [
        ("naive", lambda: naive(images, labels, device, args, bf16=False)),
        ("naive-bf16", lambda: naive(images, labels, device, args, bf16=True)),
        ("ours-resident", lambda: ours(images, labels, device, args, "resident")),
        ("ours-streamed", lambda: ours(images, labels, device, args, "stream")),
        ("bare", lambda: bare(device, args)),
        ("trial", lambda: trial(images, labels, device, args)),
    ]
    if args.recipes:
        runs += [(f"ours-{r}", lambda r=r: ours(images, labels, device, args, "resident", r)) for r in RECIPES]
    for mode, run in runs:
        if mode in skip:
            continue
        with tutorial_kernels() if mode.startswith("naive") else ieee_fp32():
            rates[mode] = run()
        print(f"{mode:>16}: {rates[mode]:9.1f} images/s")
    print(f"loadavg after: {loadavg()}")
    if args.recipes and "ours-resident" in rates:
        print(" ".join(f"{r}={rates['ours-resident'] / rates[f'ours-{r}']:.2f}x" for r in RECIPES
                       if f"ours-{r}" in rates), "(time per step over ours)")
    ratios = [("ours/naive", "ours-resident", "naive"), ("ours/naive-bf16", "ours-resident", "naive-bf16"),
              ("ours/bare", "ours-resident", "bare"), ("trial/ours", "trial", "ours-resident")]
    print(" ".join(f"{name}={rates[a] / rates[b]:.2f}" for name, a, b in ratios if {a, b} <= rates.keys()))


if __name__ == "__main__":
    main()
