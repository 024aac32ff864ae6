"""Decoded images, once per machine and dataset: one uint8 file that every process memory-maps.

An image folder (or CIFAR) is decoded once into `<cache>/<key>.u8`, raw uint8 [N, 3, S, S] at the stored
size S, with `<key>.json` beside it (shape, labels, classes, the given val/test parts, the files left out and a
digest). The key hashes what the images came from (every file's path, size and mtime; the stored size; the
decoder's version), so a changed folder gets a new cache and an unchanged one is found again by every worker,
the supervisor and `report`. Every process maps the same file: the host holds one copy, in the page cache,
however many workers read it (FFCV's idea, without its format).

When several processes start at once, one builds under a file lock and the others wait, then map it, saying whom
they wait for (its pid and state). A builder that stays stopped (SIGSTOP: a scheduler's suspend, a Ctrl-Z'd
shell) for STOPPED_BUILDER_LIMIT_S is not waited for forever: the waiter fails in one line naming the pid and
the fix (resume or end it, or a cache folder of one's own). Not a private build beside it: that decodes the
whole folder again into a second copy per waiting process, and the stopped builder, once resumed, renames its
own files over it. A build
writes temporary files and renames them into place, the data first and its JSON last: a builder killed halfway
leaves nothing that looks finished. A cache whose size or sampled digest does not match its JSON (truncated,
overwritten) is rebuilt, never trained on. Deleting the cache folder is always safe: it is rebuilt on demand.

The data file's full size is allocated before any image is written: a full disk (or quota) is then an `OSError`
at the start, one line naming the folder, not after minutes of decoding (nor a SIGBUS in a process mapping a
sparse file). The builder writes rows with pwrite (`Rows`), so it holds none of the decoded pages itself. A failed
build removes its temporary file. The folder may be shared and world-writable: temporary files get random names,
are created exclusively (never through a planted link) and readable by the owner's group at most; the lock file
is never opened through a link.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import pwd
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpsearch._testhooks import hold_at
from hpsearch.errors import DataError
from hpsearch.processes import describe_state, flock_holder, is_stopped, process_state
from hpsearch.units import size_text

CACHE_VERSION = 1
_DIGEST_BLOCK = 1 << 16  # bytes read at each sampled offset
_DIGEST_SAMPLES = 256
_MODE = 0o640  # the most a cache file allows: the owner writes, the owner's group reads
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
# A builder stopped this long is given up on. Above the supervisor's FROZEN_LIMIT_S (30 s), so that a frozen
# worker of the same `run --workers` is killed by its supervisor (releasing the lock) before its peers give up.
STOPPED_BUILDER_LIMIT_S = 60.0
_LOCK_POLL_S = 0.2  # how often a waiting process tries the lock again and looks at its holder
_WAIT_NOTE_S = 60.0  # a waiting process says again whom it waits for


class _NoRoom(Exception):
    """The cache folder's disk (or the user's quota there) has no room for the decoded images."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


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


class Rows:
    """The data file being built, image rows written (and read back) with pwrite/pread at their offsets.

    Not a writable memory map: every page written through a map stays in the builder's resident set, so the
    process that decodes a folder (the supervisor of `run --workers`) would count the whole decoded size as its
    own until it exits. Written with pwrite, the pixels go to the page cache that every process maps later."""

    def __init__(self, fd: int, n: int, size: int) -> None:
        self.fd, self.shape = fd, (n, 3, size, size)
        self.row = 3 * size * size

    def __len__(self) -> int:
        return self.shape[0]

    def _span(self, key: int | slice) -> tuple[int, int]:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("Rows takes contiguous slices only")
            return start, max(start, stop)
        index = key + len(self) if key < 0 else key
        if not 0 <= index < len(self):
            raise IndexError(f"row {key} out of {len(self)}")
        return index, index + 1

    def __setitem__(self, key: int | slice, value: np.ndarray | int) -> None:
        start, stop = self._span(key)
        block = np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=np.uint8),
                                                     (stop - start, *self.shape[1:])))
        view, offset = memoryview(block).cast("B"), start * self.row
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def __getitem__(self, index: int) -> np.ndarray:
        start, _ = self._span(index)
        out = np.empty(self.shape[1:], dtype=np.uint8)
        if os.preadv(self.fd, [memoryview(out).cast("B")], start * self.row) != self.row:
            raise OSError(f"short read of row {index} of the image cache being built")
        return out


def read_rows(path: Path, shape: tuple[int, ...], indices: np.ndarray) -> np.ndarray:
    """Rows `indices` of the data file at `path` (uint8, `shape`), read with pread: a run of consecutive indices
    in one call. The pages stay in the page cache, shared, and never enter this process's resident set."""
    row = math.prod(shape[1:])
    out = np.empty((len(indices), *shape[1:]), dtype=np.uint8)
    if len(indices) == 0:
        return out
    if indices.min() < 0 or indices.max() >= shape[0]:
        raise IndexError(f"rows out of the {shape[0]} images of {path}")
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    with open(path, "rb", buffering=0) as handle:
        for first, last in zip(np.r_[0, breaks], np.r_[breaks, len(indices)], strict=True):
            view, offset = memoryview(out[first:last]).cast("B"), int(indices[first]) * row
            while view:
                got = os.preadv(handle.fileno(), [view], offset)
                if got == 0:
                    raise OSError(f"{path} ends before row {offset // row}: the image cache is truncated")
                view, offset = view[got:], offset + got
    return out


def cache_paths(folder: Path, key: str) -> tuple[Path, Path]:
    return folder / f"{key}.u8", folder / f"{key}.json"


def cache_size(folder: Path, key: str) -> int | None:
    """Bytes of the finished cache for `key`, None when it is not built (or not finished)."""
    data, meta = cache_paths(folder, key)
    return data.stat().st_size + meta.stat().st_size if data.is_file() and meta.is_file() else None


def load_or_build(folder: Path, key: str, n: int, size: int,
                  build: Callable[[Rows], Decoded], *, what: str) -> Cached:
    """Map the cache for `key`; build it first (once, under a lock) when it is missing or damaged.

    `build(out)` decodes `n` images into `out` (`Rows`: uint8 rows [3, size, size], indexed like an array).
    """
    found = _open(folder, key)
    if found is not None:
        return found
    try:
        return _build_locked(folder, key, n, size, build, what=what)
    except _NoRoom as full:
        raise DataError(f"cache: no room for {size_text(full.needed)} in {str(folder)!r} (decoded images of "
                        f"{what}); free space there or set [data] cache_dir / $HPSEARCH_CACHE_DIR to a larger disk"
                        ) from None
    except OSError as err:  # an unwritable folder, a full disk: the setting to change, in one line
        raise DataError(f"data.cache_dir: cannot write the image cache in {str(folder)!r} ({err.strerror or err}); "
                        "free space there or set [data] cache_dir (or HPSEARCH_CACHE_DIR) to a writable folder"
                        ) from None


def _build_locked(folder: Path, key: str, n: int, size: int, build: Callable[[Rows], Decoded], *,
                  what: str) -> Cached:
    folder.mkdir(parents=True, exist_ok=True)
    lock = _open_lock(folder / f"{key}.lock")
    try:
        _take(lock, folder, what)
        found = _open(folder, key)  # built while this process waited
        if found is not None:
            return found
        with _no_room_is(n * 3 * size * size):  # allocating, writing, syncing: a full disk or quota, in one line
            _build(folder, key, n, size, build, what=what)
        found = _open(folder, key)
        if found is None:
            raise OSError(f"the image cache {cache_paths(folder, key)[0]} did not verify right after its build; "
                          "check the disk")
        return Cached(found.images, found.labels, found.meta, found.path, built_here=True)
    finally:
        os.close(lock)  # releases the lock; the file stays (removing it would race a process about to lock it)


def _take(lock: int, folder: Path, what: str) -> None:
    """Take the build lock: at once, or after the process holding it finishes, however long it works; a DataError
    when that process stays stopped (SIGSTOP) for STOPPED_BUILDER_LIMIT_S."""
    if _try_lock(lock):
        return
    _say(f"waiting for {_holder(flock_holder(lock))} to decode {what} into {folder}")
    noted, stopped_since = time.monotonic(), None
    while not _try_lock(lock):
        time.sleep(_LOCK_POLL_S)
        now = time.monotonic()
        pid = flock_holder(lock)  # None: gone meanwhile, or on another machine (a shared network folder)
        if pid is None or not is_stopped(pid):
            stopped_since = None
        elif stopped_since is None:
            stopped_since = now
            _say(f"pid {pid}, which builds the image cache of {what}, is stopped (SIGSTOP); waiting up to "
                 f"{STOPPED_BUILDER_LIMIT_S:.0f} s for it to resume")
        elif now - stopped_since >= STOPPED_BUILDER_LIMIT_S:
            raise DataError(f"data.cache_dir: the image cache of {what} in {str(folder)!r} is being built by pid "
                            f"{pid}{_owner(pid)}, stopped (SIGSTOP) for {now - stopped_since:.0f} s; resume it "
                            f"(kill -CONT {pid}) or end it, or set [data] cache_dir / HPSEARCH_CACHE_DIR to a folder "
                            "of your own")
        if now - noted >= _WAIT_NOTE_S:
            _say(f"still waiting for {_holder(pid)} to decode {what}")
            noted = now


def _try_lock(lock: int) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(pid: int | None) -> str:
    """Who holds the build lock, for a waiting process's progress line."""
    if pid is None:
        return "another process"
    return f"pid {pid}{_owner(pid)}, {describe_state(process_state(pid))},"


def _owner(pid: int) -> str:
    """ (user NAME) for a process of another user, the one a shared machine's user would ask; empty otherwise."""
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return ""
    if uid == os.getuid():
        return ""
    try:
        return f" (user {pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f" (uid {uid})"


def _open_lock(path: Path) -> int:
    """The lock file's descriptor, never through a link (a shared folder may hold one planted at this name)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC  # flock needs no write access: any reader may lock
    try:
        return os.open(path, flags | os.O_CREAT, _MODE & ~_umask())
    except PermissionError:  # another user's lock in a sticky folder (fs.protected_regular): open it as it is
        return os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symbolic link, not a lock file; remove it") from None
        raise


def _build(folder: Path, key: str, n: int, size: int, build: Callable[[Rows], Decoded], *, what: str) -> None:
    data, meta = cache_paths(folder, key)
    with contextlib.suppress(FileNotFoundError):
        meta.unlink()  # whatever was there no longer counts as finished
    for stale in folder.glob(f"{key}.*.tmp-*"):  # a builder killed halfway (we hold the lock: none is live)
        with contextlib.suppress(OSError):  # another user's, in a sticky shared folder: theirs to remove
            stale.unlink()
    row = 3 * size * size
    start = time.perf_counter()
    _say(f"decoding {n} images of {what} into {folder} ({size_text(n * row)} at {size} px), "
         "once for every process of this machine")
    with _temporary(folder, f"{key}.u8.tmp-") as (fd, tmp_data):
        _allocate(fd, max(n, 1) * row)  # every block now: a full disk fails here, at the start
        decoded = build(Rows(fd, n, size))  # this very file, whatever its name points to by now
        os.ftruncate(fd, decoded.kept * row)  # files left out were compacted away
        os.fsync(fd)
        record = {
            "version": CACHE_VERSION, "shape": [decoded.kept, 3, size, size], "bytes": decoded.kept * row,
            "digest": _digest(tmp_data), "labels": decoded.labels.tolist(), **decoded.meta,
            "built": {"host": socket.gethostname(), "pid": os.getpid(), "at": time.time(),
                      "seconds": round(time.perf_counter() - start, 3)},
        }
        os.replace(tmp_data, data)
    hold_at("cache")  # tests: the data is in place, its JSON not yet: a kill here leaves nothing finished
    with _temporary(folder, f"{key}.json.tmp-") as (fd, tmp_meta):
        text = memoryview(json.dumps(record).encode())
        while text:
            text = text[os.write(fd, text):]
        os.replace(tmp_meta, meta)
    _say(f"decoded {decoded.kept} images into {data} in {time.perf_counter() - start:.1f} s")


@contextlib.contextmanager
def _temporary(folder: Path, prefix: str) -> Iterator[tuple[int, Path]]:
    """A new file in `folder` with a random name, created exclusively (never through a link), mode 0640 at most;
    removed when the block fails or leaves it where it was (a block that succeeds renames it into place)."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix)  # O_CREAT | O_EXCL | O_NOFOLLOW, mode 0600
    path = Path(name)
    try:
        os.fchmod(fd, _MODE & ~_umask())
        yield fd, path
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # renamed into place already when the block succeeded


def _allocate(fd: int, size: int) -> None:
    """Reserve `size` bytes of disk for `fd` (OSError ENOSPC or EDQUOT on a full disk or quota); where the
    filesystem cannot allocate, zeros are written instead, which fails the same way."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    zeros = memoryview(bytes(1 << 20))
    done = 0
    while done < size:
        done += os.pwrite(fd, zeros[:min(len(zeros), size - done)], done)


@contextlib.contextmanager
def _no_room_is(needed: int) -> Iterator[None]:
    """ENOSPC or EDQUOT in the block becomes _NoRoom(needed): the caller's one line, naming the folder."""
    try:
        yield
    except OSError as err:
        if err.errno in _NO_ROOM:
            raise _NoRoom(needed) from None
        raise


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would, for a moment, in every thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


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
