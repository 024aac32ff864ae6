"""Datasets by name, one seeded stratified split per study, device-resident batches, batched augmentation.

Every dataset becomes one `ImagePool`: all its images as one uint8 NCHW tensor plus labels. A `Split`
is three index arrays into the pool. Train/val/test never overlap, are fixed by the study seed, and
their sha256 is recorded in the study so every trial's outputs line up sample by sample.

Images stay uint8 at their stored size until a batch is drawn; resizing to `image_size`,
augmentation and normalization happen on whole batches on the training device (airbench style),
never per image in Python.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hpsearch.config import DataSection
from hpsearch.errors import DataError
from hpsearch.preprocess import IMAGE_SUFFIXES, Preprocess, decode_image, triple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                                        "data_batch_5", "test_batch", "batches.meta"]),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"]),
}


@dataclass(frozen=True)
class ImagePool:
    images: torch.Tensor  # uint8 [N, 3, H, W], on the CPU
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    # Indices fixed by the dataset itself (an official test set, a val/ folder); None means "split it".
    given_val: np.ndarray | None = None
    given_test: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for part in (self.train, self.val, self.test):
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
            digest.update(b"|")
        return digest.hexdigest()

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


# ---------------------------------------------------------------------------------------------- loading


def load_pool(cfg: DataSection, seed: int = 0) -> ImagePool:
    """All images of the dataset the study names, as one uint8 pool."""
    loaders = {
        "digits": _load_digits,
        "cifar10": _load_cifar,
        "cifar100": _load_cifar,
        "imagefolder": _load_imagefolder,
        "synthetic": _load_synthetic,
    }
    return loaders[cfg.dataset](cfg, seed)


def _load_digits(cfg: DataSection, seed: int) -> ImagePool:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 0..16 grey levels, 8x8; stored as uint8 in 0..255, upsampled per batch on the device.
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels)[:, None].expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return ImagePool(images, labels, [str(c) for c in range(10)])


def _load_synthetic(cfg: DataSection, seed: int) -> ImagePool:
    gen = torch.Generator().manual_seed(seed)
    n, k, size = cfg.synthetic_size, cfg.synthetic_classes, cfg.image_size
    labels = torch.arange(n) % k
    # Class-dependent mean colour plus noise: learnable, so benchmarks exercise real training.
    colours = torch.randint(0, 256, (k, 3, 1, 1), generator=gen).float()
    noise = torch.randn(n, 3, size, size, generator=gen) * 40
    images = (colours[labels] + noise).clamp(0, 255).to(torch.uint8)
    return ImagePool(images, labels, [f"class_{i}" for i in range(k)])


def _load_cifar(cfg: DataSection, seed: int) -> ImagePool:
    from torchvision import datasets

    root = Path(cfg.root).expanduser()
    folder, files = CIFAR_FILES[cfg.dataset]
    cls = datasets.CIFAR10 if cfg.dataset == "cifar10" else datasets.CIFAR100
    expected = f"{root / folder}/{{{','.join(files)}}}"
    try:
        # torchvision verifies the md5 of every official batch file before it unpickles any of them;
        # that check is what makes loading these pickles acceptable. Never bypass it.
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError as err:
        if "not found or corrupted" not in str(err):
            raise
        try:
            train = cls(str(root), train=True, download=True)
            test = cls(str(root), train=False, download=True)
        except Exception as download_err:
            raise DataError(
                f"data.root: {cfg.dataset} is missing or corrupt under {str(root)!r} (expected {expected}, "
                f"md5-checked) and could not be downloaded ({type(download_err).__name__}); place the official "
                f"python-version archive's folder there or allow network access"
            ) from None
    images = np.concatenate([train.data, test.data]).transpose(0, 3, 1, 2)
    labels = np.concatenate([np.asarray(train.targets), np.asarray(test.targets)]).astype(np.int64)
    test_idx = np.arange(len(train.data), len(images))
    return ImagePool(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels),
                     list(train.classes), given_test=test_idx)


def _load_imagefolder(cfg: DataSection, seed: int) -> ImagePool:
    root = Path(cfg.root).expanduser()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"data.root: {str(root)!r} has no train/ folder; imagefolder expects "
                        f"{root}/train/<class>/<image> (and optional val/ and test/ alike)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"data.root: {str(train_dir)!r} needs at least two class folders, found {len(classes)}")
    parts: list[tuple[str, list[Path], list[int]]] = []
    for part in ("train", "val", "test"):
        files, labels = _list_images(root / part, classes)
        if part == "train" and not files:
            raise DataError(f"data.root: {str(train_dir)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        parts.append((part, files, labels))
    all_files = [f for _, files, _ in parts for f in files]
    images = _decode_all(all_files, cfg.image_size)
    labels = torch.tensor([label for _, _, labels in parts for label in labels], dtype=torch.int64)
    offsets = np.cumsum([0] + [len(files) for _, files, _ in parts])
    given = {
        part: (np.arange(offsets[i], offsets[i + 1]) if len(files) else None)
        for i, (part, files, _) in enumerate(parts)
    }
    return ImagePool(images, labels, classes, given_val=given["val"], given_test=given["test"])


def _list_images(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files: list[Path] = []
    labels: list[int] = []
    if not folder.is_dir():
        return files, labels
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in classes:
            raise DataError(f"data.root: class folder {str(sub)!r} is not among the train/ classes {classes}")
        for path in sorted(sub.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(classes.index(sub.name))
    return files, labels


def _decode_all(files: Sequence[Path], size: int) -> torch.Tensor:
    """Decode every image once, resized (shorter side) and centre-cropped to size x size."""
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)

    def decode(i: int) -> None:
        out[i] = decode_image(files[i], size)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(decode, range(len(files))))
    return out


# ------------------------------------------------------------------------------------------------ split


def make_split(pool: ImagePool, cfg: DataSection, seed: int) -> Split:
    """One stratified split, fixed by the seed. Parts the dataset fixes itself are kept as given."""
    rng = np.random.default_rng(seed)
    labels = pool.labels.numpy()
    fixed = np.zeros(len(labels), dtype=bool)
    for given in (pool.given_val, pool.given_test):
        if given is not None:
            fixed[given] = True
    free = np.flatnonzero(~fixed)
    if cfg.subset:
        free = _stratified_take(free, labels, cfg.subset, rng)
    test = pool.given_test
    if test is None:
        free, test = _stratified_cut(free, labels, cfg.test_fraction, rng)
    elif cfg.subset:
        test = _stratified_take(test, labels, max(pool.num_classes, round(cfg.subset * cfg.test_fraction)), rng)
    val = pool.given_val
    if val is None:
        free, val = _stratified_cut(free, labels, cfg.val_fraction / (1 - (cfg.test_fraction if pool.given_test
                                                                          is None else 0)), rng)
    elif cfg.subset:
        val = _stratified_take(val, labels, max(pool.num_classes, round(cfg.subset * cfg.val_fraction)), rng)
    split = Split(np.sort(free), np.sort(val), np.sort(test))
    for name, part in (("train", split.train), ("val", split.val), ("test", split.test)):
        if len(part) == 0:
            raise DataError(f"data: the {name} split is empty; use more data or other val/test fractions")
    return split


def _stratified_cut(idx: np.ndarray, labels: np.ndarray, fraction: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Move `fraction` of each class of idx into a second part (at least one per class with 2+)."""
    keep, cut = [], []
    for c in np.unique(labels[idx]):
        members = rng.permutation(idx[labels[idx] == c])
        # At least one per part for a class of 2+, never the whole class.
        n = min(max(round(len(members) * fraction), 1), len(members) - 1) if len(members) > 1 else 0
        cut.append(members[:n])
        keep.append(members[n:])
    return np.concatenate(keep), np.concatenate(cut)


def _stratified_take(idx: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n >= len(idx):
        return idx
    _, taken = _stratified_cut(idx, labels, n / len(idx), rng)
    return taken


# -------------------------------------------------------------------------------------- device batches


def preprocess_for(pool: ImagePool, split: Split, cfg: DataSection, pretrained: bool) -> Preprocess:
    """ImageNet statistics for pretrained weights; otherwise the training split's own channel stats."""
    if pretrained:
        return Preprocess(cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)
    train = pool.images[torch.from_numpy(split.train)].float().div_(255)
    mean = train.mean(dim=(0, 2, 3))
    std = train.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return Preprocess(cfg.image_size, triple(mean, digits=6), triple(std, digits=6))


class DeviceData:
    """One split's images and labels held on the training device, served as batches."""

    def __init__(self, pool: ImagePool, indices: np.ndarray, device: torch.device) -> None:
        idx = torch.from_numpy(indices)
        self.images = pool.images[idx].to(device, non_blocking=True)
        self.labels = pool.labels[idx].to(device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        order = (torch.randperm(n, generator=generator).to(self.images.device) if shuffle
                 else torch.arange(n, device=self.images.device))
        stop = (n // batch_size) * batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            take = order[start:start + batch_size]
            yield self.images[take], self.labels[take]

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)


# -------------------------------------------------------------------------------------- augmentation


def augment(x: torch.Tensor, names: Sequence[str], generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched augmentation of preprocessed float images [N, C, H, W], on their device."""
    for name in names:
        x = _AUGMENT[name](x, generator)
    return x


def _rand(shape: tuple[int, ...], x: torch.Tensor, gen: torch.Generator | None, high: int | None = None
          ) -> torch.Tensor:
    # Draw on the CPU generator (reproducible for any device), then move.
    if high is None:
        return torch.rand(shape, generator=gen).to(x.device)
    return torch.randint(0, high, shape, generator=gen).to(x.device)


def random_crop(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random translation by up to size/8 pixels with reflect padding: one gather for the batch."""
    n, c, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = _rand((n,), x, gen, 2 * pad + 1)
    dx = _rand((n,), x, gen, 2 * pad + 1)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None].expand(n, c, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :].expand(n, c, h, w)
    return out.gather(3, cols)


def random_flip(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    flip = _rand((x.shape[0],), x, gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def cutout(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Zero one square of side size/4 per image (zero = the channel mean after normalization)."""
    n, _, h, w = x.shape
    side = max(1, h // 4)
    cy = _rand((n,), x, gen, h)[:, None, None]
    cx = _rand((n,), x, gen, w)[:, None, None]
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    top, left = cy - side // 2, cx - side // 2
    mask = (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)
    return x.masked_fill(mask[:, None], 0.0)


_AUGMENT = {"crop": random_crop, "flip": random_flip, "cutout": cutout}


@dataclass(frozen=True)
class TrialData:
    """What a trial trains and evaluates on: device-resident splits and their preprocessing."""

    train: DeviceData
    val: DeviceData
    test: DeviceData
    preprocess: Preprocess
    augment: tuple[str, ...]
    num_classes: int


def trial_data(pool: ImagePool, split: Split, cfg: DataSection, pretrained: bool, device: torch.device
               ) -> TrialData:
    """Move the three splits to the device once; every trial of a worker reuses them."""
    return TrialData(
        train=DeviceData(pool, split.train, device),
        val=DeviceData(pool, split.val, device),
        test=DeviceData(pool, split.test, device),
        preprocess=preprocess_for(pool, split, cfg, pretrained),
        augment=tuple(cfg.augment),
        num_classes=pool.num_classes,
    )
