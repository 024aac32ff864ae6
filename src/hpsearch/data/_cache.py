"""Decoded images, once per machine and dataset: one uint8 file that every process memory-maps.

An image folder (or CIFAR) is decoded once into `<cache>/<key>.u8`, raw uint8 [N, 3, S, S] at the stored
size S, with `<key>.json` beside it (shape, labels, classes, the given val/test parts, the files left out and a
digest). The key hashes what the images came from (every file's path, size and mtime; the stored size; the
decoder's version), so a changed folder gets a new cache and an unchanged one is found again by every worker,
the supervisor and `report`. Every process maps the same file: the host holds one copy, in the page cache,
however many workers read it (FFCV's idea, without its format).

When several processes start at once, one builds under a file lock and the others wait, then map it. A build
writes temporary files and renames them into place, the data first and its JSON last: a builder killed halfway
leaves nothing that looks finished. A cache whose size or sampled digest does not match its JSON (truncated,
overwritten) is rebuilt, never trained on. Deleting the cache folder is always safe: it is rebuilt on demand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpsearch._testhooks import hold_at
from hpsearch.errors import DataError

CACHE_VERSION = 1
_DIGEST_BLOCK = 1 << 16  # bytes read at each sampled offset
_DIGEST_SAMPLES = 256


def default_cache_dir() -> Path:
    """$HPSEARCH_CACHE_DIR, else the user's cache folder ($XDG_CACHE_HOME or ~/.cache) / hpsearch / images."""
    if os.environ.get("HPSEARCH_CACHE_DIR"):
        return Path(os.environ["HPSEARCH_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hpsearch" / "images"


def cache_key(parts: dict[str, Any]) -> str:
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Decoded:
    """What a build hands back besides the pixels it wrote: one label per image, in order, and the rest."""

    labels: np.ndarray  # int64 [n kept]
    meta: dict[str, Any]  # classes, given parts, files left out: JSON-able, stored as is
    kept: int  # images written (rows 0..kept-1; a build that left files out compacted the rest)


@dataclass(frozen=True)
class Cached:
    images: torch.Tensor  # uint8 [N, 3, S, S] over the memory-mapped file (copy-on-write, never written)
    labels: torch.Tensor  # int64 [N]
    meta: dict[str, Any]
    path: Path
    built_here: bool  # this process decoded it (False: it mapped what another process built)


def cache_paths(folder: Path, key: str) -> tuple[Path, Path]:
    return folder / f"{key}.u8", folder / f"{key}.json"


def cache_size(folder: Path, key: str) -> int | None:
    """Bytes of the finished cache for `key`, None when it is not built (or not finished)."""
    data, meta = cache_paths(folder, key)
    return data.stat().st_size + meta.stat().st_size if data.is_file() and meta.is_file() else None


def load_or_build(folder: Path, key: str, n: int, size: int,
                  build: Callable[[np.ndarray], Decoded], *, what: str) -> Cached:
    """Map the cache for `key`; build it first (once, under a lock) when it is missing or damaged.

    `build(out)` decodes `n` images into `out` (a writable uint8 memmap [n, 3, size, size]).
    """
    found = _open(folder, key)
    if found is not None:
        return found
    try:
        return _build_locked(folder, key, n, size, build, what=what)
    except OSError as err:  # an unwritable folder, a full disk: the setting to change, in one line
        raise DataError(f"data.cache_dir: cannot write the image cache in {str(folder)!r} ({err.strerror or err}); "
                        "free space there or set [data] cache_dir (or HPSEARCH_CACHE_DIR) to a writable folder"
                        ) from None


def _build_locked(folder: Path, key: str, n: int, size: int, build: Callable[[np.ndarray], Decoded], *,
                  what: str) -> Cached:
    from filelock import FileLock, Timeout

    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(f"waiting for another process to decode {what} into {folder}")
        lock.acquire()
    try:
        found = _open(folder, key)  # built while this process waited
        if found is not None:
            return found
        _build(folder, key, n, size, build, what=what)
        found = _open(folder, key)
        if found is None:
            raise OSError(f"the image cache {cache_paths(folder, key)[0]} did not verify right after its build; "
                          "check the disk")
        return Cached(found.images, found.labels, found.meta, found.path, built_here=True)
    finally:
        lock.release()


def _build(folder: Path, key: str, n: int, size: int, build: Callable[[np.ndarray], Decoded], *, what: str) -> None:
    data, meta = cache_paths(folder, key)
    with contextlib.suppress(FileNotFoundError):
        meta.unlink()  # whatever was there no longer counts as finished
    for stale in folder.glob(f"{key}.*.tmp-*"):  # a builder killed halfway (we hold the lock: none is live)
        stale.unlink(missing_ok=True)
    tmp_data = folder / f"{key}.u8.tmp-{os.getpid()}"
    start = time.perf_counter()
    _say(f"decoding {n} images of {what} into {folder} ({n * 3 * size * size / 2**20:.0f} MiB at {size} px), "
         "once for every process of this machine")
    pixels = np.memmap(tmp_data, dtype=np.uint8, mode="w+", shape=(max(n, 1), 3, size, size))
    try:
        decoded = build(pixels[:n])
        pixels.flush()
    finally:
        del pixels
    row = 3 * size * size
    os.truncate(tmp_data, decoded.kept * row)  # files left out were compacted away
    with open(tmp_data, "rb+") as handle:
        os.fsync(handle.fileno())
    record = {
        "version": CACHE_VERSION, "shape": [decoded.kept, 3, size, size], "bytes": decoded.kept * row,
        "digest": _digest(tmp_data), "labels": decoded.labels.tolist(), **decoded.meta,
        "built": {"host": socket.gethostname(), "pid": os.getpid(), "at": time.time(),
                  "seconds": round(time.perf_counter() - start, 3)},
    }
    os.replace(tmp_data, data)
    hold_at("cache")  # tests: the data is in place, its JSON not yet: a kill here leaves nothing finished
    tmp_meta = folder / f"{key}.json.tmp-{os.getpid()}"
    tmp_meta.write_text(json.dumps(record))
    os.replace(tmp_meta, meta)
    _say(f"decoded {decoded.kept} images into {data} in {time.perf_counter() - start:.1f} s")


def _open(folder: Path, key: str) -> Cached | None:
    """The finished, verified cache for `key`, or None (missing, half-written, or damaged)."""
    data, meta = cache_paths(folder, key)
    try:
        record = json.loads(meta.read_text())
        shape = tuple(int(v) for v in record["shape"])
        if record.get("version") != CACHE_VERSION or data.stat().st_size != record["bytes"]:
            return None
        if _digest(data) != record["digest"]:
            _say(f"the image cache {data} does not match its digest (damaged); rebuilding it")
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    labels = torch.tensor(record["labels"], dtype=torch.int64)
    if len(labels) != shape[0]:
        return None
    if shape[0] == 0:
        images = torch.empty(shape, dtype=torch.uint8)
    else:
        # Copy-on-write: pages are shared with every other process until written, and nothing writes them.
        images = torch.from_numpy(np.memmap(data, dtype=np.uint8, mode="c", shape=shape))
    return Cached(images, labels, record, data, built_here=False)


def _digest(path: Path) -> str:
    """sha256 of the size and of 64 KiB at 256 evenly spaced offsets (and the tail): a truncated or overwritten
    file is caught without reading gigabytes at every start."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    offsets = sorted({min(size, i * size // _DIGEST_SAMPLES) for i in range(_DIGEST_SAMPLES)}
                     | {max(0, size - _DIGEST_BLOCK)})
    with open(path, "rb") as handle:
        for offset in offsets:
            handle.seek(offset)
            digest.update(handle.read(_DIGEST_BLOCK))
    return digest.hexdigest()


def _say(line: str) -> None:
    # Long work shows progress, in every process's own log (workers, the supervisor, report).
    print(f"data: {line}", file=sys.stderr, flush=True)
