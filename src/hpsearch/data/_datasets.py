"""Datasets by name: each one read into a single `ImagePool` of uint8 images and their labels.

Every dataset becomes one `ImagePool`: all its images as one uint8 NCHW tensor at their stored size plus
labels. Image folders and CIFAR are decoded once per machine into a memory-mapped cache (`_cache.py`) that
every process shares; the pool then is that memory map itself, so no process holds a copy of its own.
Digits and synthetic data are made in memory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from hpsearch.data import _cache as cache
from hpsearch.data._settings import DataSettings
from hpsearch.errors import DataError
from hpsearch.preprocess import IMAGE_SUFFIXES, decode_image, image_files

CIFAR_IMAGES = 60_000  # 50,000 train + 10,000 test, 32x32, in both CIFAR-10 and CIFAR-100
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
    # unreadable files and links out of the folder, left out (bad_images = "skip"), relative to data.root
    skipped: tuple[str, ...] = ()
    cache: Path | None = None  # the memory-mapped file the images live in, when cached

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def read(self, indices: np.ndarray) -> torch.Tensor:
        """A copy of `images[indices]`; from a cached pool read from its file (pread), not through the memory
        map, so that a process reading images once (`run` computing the training split's statistics before its
        workers start) keeps none of their pages in its resident set."""
        if self.cache is None:
            return self.images[torch.from_numpy(np.asarray(indices))]
        return torch.from_numpy(cache.read_rows(self.cache, tuple(self.images.shape), np.asarray(indices)))


def load_pool(cfg: DataSettings, seed: int = 0) -> ImagePool:
    """All images of the dataset the study names, as one uint8 pool."""
    loaders = {
        "digits": _load_digits,
        "cifar10": _load_cifar,
        "cifar100": _load_cifar,
        "imagefolder": _load_imagefolder,
        "synthetic": _load_synthetic,
    }
    return loaders[cfg.dataset](cfg, seed)


def _load_digits(cfg: DataSettings, seed: int) -> ImagePool:
    grey, target = digits_arrays()
    # 0..16 grey levels, 8x8; stored as uint8 in 0..255, upsampled per batch on the device.
    pixels = np.round(grey * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels)[:, None].expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(target)
    return ImagePool(images, labels, [str(c) for c in range(10)])


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images float64 [1797, 8, 8] in 0..16, labels int64 [1797], exactly what
    `sklearn.datasets.load_digits()` gives. Read from its CSV file without importing scikit-learn, whose import
    (scipy with it) costs every worker about 2.5 CPU-seconds, more than the rest of its start but torch."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    folders = list(spec.submodule_search_locations or ()) if spec is not None else []
    path = Path(folders[0], "datasets", "data", "digits.csv.gz") if folders else None
    if path is None or not path.is_file():
        raise DataError("data.dataset: 'digits' reads scikit-learn's bundled digits, which are not installed; "
                        "pip install scikit-learn")
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _load_synthetic(cfg: DataSettings, seed: int) -> ImagePool:
    gen = torch.Generator().manual_seed(seed)
    n, k, size = cfg.synthetic_size, cfg.synthetic_classes, cfg.image_size
    labels = torch.arange(n) % k
    # Class-dependent mean colour plus noise: learnable, so benchmarks exercise real training.
    colours = torch.randint(0, 256, (k, 3, 1, 1), generator=gen).float()
    noise = torch.randn(n, 3, size, size, generator=gen) * 40
    images = (colours[labels] + noise).clamp(0, 255).to(torch.uint8)
    return ImagePool(images, labels, [f"class_{i}" for i in range(k)])


def cache_folder(cfg: DataSettings) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache.default_cache_dir()


def _load_cifar(cfg: DataSettings, seed: int) -> ImagePool:
    root = Path(cfg.root).expanduser()
    folder, files = CIFAR_FILES[cfg.dataset]
    batches = [root / folder / name for name in files]
    if not all(path.is_file() for path in batches):
        _decode_cifar(cfg, None)  # missing: torchvision's download, or its clear error
    key = _cifar_key(cfg, root, batches)
    found = cache.load_or_build(cache_folder(cfg), key, CIFAR_IMAGES, 32, lambda out: _decode_cifar(cfg, out),
                                what=f"{cfg.dataset} at {root}")
    return _pool_from(found)


def _cifar_key(cfg: DataSettings, root: Path, batches: Sequence[Path]) -> str:
    # Keyed by the batch files as they are; torchvision md5-checks them whenever it decodes them.
    return cache.cache_key({"kind": cfg.dataset, "files": _fingerprint(root, batches)})


def cache_state(cfg: DataSettings) -> tuple[Path, int | None] | None:
    """Where the study's decoded images are cached and their size in bytes (None: not built yet); None for data
    that is never cached (digits, synthetic) or not there to list."""
    if not cfg.cached:
        return None
    try:
        if cfg.dataset == "imagefolder":
            key = _list_folder(cfg).key(cfg.decoded_size)
        else:
            root = Path(cfg.root).expanduser()
            folder, files = CIFAR_FILES[cfg.dataset]
            key = _cifar_key(cfg, root, [root / folder / name for name in files])
    except (DataError, OSError):
        return None
    folder = cache_folder(cfg)
    return cache.cache_paths(folder, key)[0], cache.cache_size(folder, key)


def _decode_cifar(cfg: DataSettings, out: cache.Rows | None) -> cache.Decoded:
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
        created = _first_missing(root)  # torchvision makes `root` to download into: ours to remove if it fails
        try:
            train = cls(str(root), train=True, download=True)
            test = cls(str(root), train=False, download=True)
        except Exception as download_err:
            if created is not None:  # a refused run leaves no folder tree behind
                shutil.rmtree(created, ignore_errors=True)
            raise DataError(
                f"data.root: {cfg.dataset} is missing or corrupt under {str(root)!r} (expected {expected}, "
                f"md5-checked) and could not be downloaded ({type(download_err).__name__}); place the official "
                f"python-version archive's folder there or allow network access"
            ) from None
    labels = np.concatenate([np.asarray(train.targets), np.asarray(test.targets)]).astype(np.int64)
    if out is not None:
        out[:len(train.data)] = train.data.transpose(0, 3, 1, 2)
        out[len(train.data):] = test.data.transpose(0, 3, 1, 2)
    given = {"given_test": [len(train.data), len(labels)]}
    return cache.Decoded(labels, {"classes": list(train.classes), **given}, len(labels))


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what making `path` would create), or None."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _pool_from(found: cache.Cached) -> ImagePool:
    """The cached images as a pool: the memory map itself, no copy."""
    meta = found.meta
    ranges = {name: np.arange(*meta[name]) if meta.get(name) else None for name in ("given_val", "given_test")}
    return ImagePool(found.images, found.labels, list(meta["classes"]), given_val=ranges["given_val"],
                     given_test=ranges["given_test"], skipped=tuple(meta.get("skipped", ())), cache=found.path)


def _fingerprint(root: Path, files: Sequence[Path]) -> str:
    """sha256 over every file's path (relative to root), size and mtime: what a changed folder changes."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class FolderListing:
    root: Path
    classes: list[str]
    files: list[Path]  # train/, then val/, then test/
    labels: np.ndarray
    part_of: np.ndarray  # 0 train, 1 val, 2 test, per file
    refused: tuple[tuple[Path, Path], ...] = ()  # (link, target): links out of data.root, left out of files

    def key(self, size: int) -> str:
        return cache.cache_key({"kind": "imagefolder", "root": str(self.root.resolve()), "size": size,
                                "decoder": DECODER, "files": _fingerprint(self.root, self.files)})


def _list_folder(cfg: DataSettings) -> FolderListing:
    """Every image under data.root/{train,val,test}/<class>/; links are followed only while they stay inside
    data.root (preprocess.image_files), one leading out is refused: `fail` names it, `skip` leaves it out."""
    root = Path(cfg.root).expanduser()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"data.root: {str(root)!r} has no train/ folder; imagefolder expects "
                        f"{root}/train/<class>/<image> (and optional val/ and test/ alike)")
    refused: list[tuple[Path, Path]] = []
    inside = root.resolve()
    for part in ("train", "val", "test"):
        if (root / part).is_symlink() and not (root / part).resolve().is_relative_to(inside):
            raise DataError(f"data.root: {root / part} is a link out of {str(root)!r} (to {(root / part).resolve()}), "
                            "not followed; set data.root to a folder that holds train/ (val/, test/) itself")
    classes = sorted(p.name for p in _class_folders(root, train_dir, refused.append))
    if len(classes) < 2:
        raise DataError(f"data.root: {str(train_dir)!r} needs at least two class folders, found {len(classes)}")
    parts: list[tuple[str, list[Path], list[int]]] = []
    for part in ("train", "val", "test"):
        files, labels = _list_images(root, root / part, classes, refused.append)
        if part == "train" and not files:
            raise DataError(f"data.root: {str(train_dir)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        parts.append((part, files, labels))
    unique = tuple(dict.fromkeys(refused))  # train/'s class links are met twice
    if unique and cfg.bad_images == "fail":
        link, target = unique[0]
        raise DataError(f"{link}: a link out of data.root {str(root)!r} (to {target}), not followed "
                        f"({len(unique)} such links); move or copy what it points to into the folder, or set "
                        '[data] bad_images = "skip" to leave them out')
    return FolderListing(root, classes, [f for _, files, _ in parts for f in files],
                         np.array([label for _, _, labels in parts for label in labels], dtype=np.int64),
                         np.repeat(np.arange(3), [len(files) for _, files, _ in parts]), unique)


def _load_imagefolder(cfg: DataSettings, seed: int) -> ImagePool:
    listing = _list_folder(cfg)
    root, size = listing.root, cfg.decoded_size

    def build(out: cache.Rows) -> cache.Decoded:
        return _decode_folder(root, listing.files, listing.labels, listing.part_of, listing.classes, size, out)

    found = cache.load_or_build(cache_folder(cfg), listing.key(size), len(listing.files), size, build,
                                what=str(root))
    if found.meta["skipped"] and cfg.bad_images == "fail":
        first = found.meta["skipped"][0]
        raise DataError(f"{root / first}: not a readable image ({len(found.meta['skipped'])} such files); fix or "
                        'remove them, or set [data] bad_images = "skip" to leave them out')
    pool = _pool_from(found)
    if listing.refused:  # links out of the folder, left out and listed with the unreadable files
        pool = replace(pool, skipped=(*(str(link.relative_to(root)) for link, _ in listing.refused), *pool.skipped))
    return pool


# How folder images are decoded (preprocess.decode_image); a change here must change the cache key.
DECODER = "rgb-exif-bilinear-shorter-side-centre-crop-1"


def _decode_folder(root: Path, files: Sequence[Path], labels: np.ndarray, part_of: np.ndarray, classes: list[str],
                   size: int, out: cache.Rows) -> cache.Decoded:
    """Decode every file into `out` (in threads: PIL releases the GIL), then close the gaps unreadable ones
    left; the given val/test parts are renumbered over the readable files."""
    readable = np.ones(len(files), dtype=bool)

    def decode(i: int) -> None:
        try:
            out[i] = decode_image(files[i], size).numpy()
        except DataError:
            readable[i] = False  # recorded either way: the cache then says which, and `fail` names the first

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(len(files))))
    kept = np.flatnonzero(readable)
    for row, i in enumerate(kept):  # rows only move towards the start: in place, in order
        if row != i:
            out[row] = out[i]
    parts = part_of[kept]
    given = {}
    for index, name in ((1, "given_val"), (2, "given_test")):
        rows = np.flatnonzero(parts == index)
        given[name] = [int(rows[0]), int(rows[-1]) + 1] if len(rows) else None
    skipped = [str(files[i].relative_to(root)) for i in np.flatnonzero(~readable)]
    # The cache holds what could be read; bad_images (fail or skip) is applied when it is loaded.
    return cache.Decoded(labels[kept], {"classes": classes, **given, "skipped": skipped}, len(kept))


def _class_folders(root: Path, folder: Path, refuse: Callable[[tuple[Path, Path]], None]) -> list[Path]:
    """The folders in `folder` (sorted), a link among them only while it stays inside data.root."""
    inside = root.resolve()
    found = []
    for sub in sorted(folder.iterdir()):
        if sub.is_symlink():
            try:
                target = sub.resolve()
            except (OSError, RuntimeError):  # a link loop: it leads nowhere
                continue
            if not target.is_relative_to(inside):
                refuse((sub, target))
                continue
        if sub.is_dir():
            found.append(sub)
    return found


def _list_images(root: Path, folder: Path, classes: list[str], refuse: Callable[[tuple[Path, Path]], None]
                 ) -> tuple[list[Path], list[int]]:
    files: list[Path] = []
    labels: list[int] = []
    if not folder.is_dir():
        return files, labels
    for sub in _class_folders(root, folder, refuse):
        if sub.name not in classes:
            raise DataError(f"data.root: class folder {str(sub)!r} is not among the train/ classes {classes}")
        found = image_files(sub, lambda link, target: refuse((link, target)), within=root)
        files += found
        labels += [classes.index(sub.name)] * len(found)
    return files, labels
