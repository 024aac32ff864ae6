"""Device batches: a trial's three splits placed on the training device (resident or streamed) and drawn in order.

Images stay uint8 at their stored size until a batch is drawn. A split is resident on a GPU when it fits,
streamed from the pool (the shared memory-mapped cache) otherwise, and on the CPU gathered from it batch by
batch: no process holds a copy of its own.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from hpsearch.data._datasets import ImagePool
from hpsearch.data._placement import placement_for
from hpsearch.data._settings import DataSettings, Placement
from hpsearch.data._split import Split
from hpsearch.data._stats import preprocess_for
from hpsearch.preprocess import Preprocess


class DeviceData:
    """One split served as batches on the training device: resident (its images copied to the device once) or
    streamed (each batch gathered from the pool, which may be the memory-mapped cache, then moved; on CUDA
    through pinned memory, the next batch gathered while the device works on this one). Either way the same
    order gives the same batches; labels are always resident. A streamed batch's images live in a buffer that
    the next batch reuses: use them before drawing the next (every loop here does)."""

    def __init__(self, pool: ImagePool, indices: np.ndarray, device: torch.device,
                 placement: Placement = "resident") -> None:
        self.device = device
        self.placement = placement
        self._index = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
        self.labels = pool.labels[self._index].to(device, non_blocking=True)
        if placement == "resident":
            self._images = pool.images[self._index].to(device, non_blocking=True)
        else:
            self._images = pool.images  # the whole pool (a memory map when cached); gathered per batch

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        # The order is drawn on the CPU generator whatever the device: resident and streamed runs match.
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        on_device = order.to(self.device, non_blocking=True)
        stop = (n // batch_size) * batch_size if drop_last and n >= batch_size else n
        starts = range(0, stop, batch_size)
        if self.placement == "resident":
            for start in starts:
                take = on_device[start:start + batch_size]
                yield self._images[take], self.labels[take]
        elif self.device.type == "cuda":
            yield from self._streamed_cuda([order[s:s + batch_size] for s in starts],
                                           [on_device[s:s + batch_size] for s in starts])
        elif len(starts):
            # One buffer for every batch: a fresh allocation per batch leaves the allocator holding tens of MB
            # it never gives back (measured: +52 MiB over an epoch of 5 MB batches).
            buffer = torch.empty((min(batch_size, n), *self._images.shape[1:]), dtype=self._images.dtype)
            for start in starts:
                take = order[start:start + batch_size]
                images = buffer[:len(take)]
                torch.index_select(self._images, 0, self._index[take], out=images)
                yield images, self.labels[take]

    def _streamed_cuda(self, takes: list[torch.Tensor], device_takes: list[torch.Tensor]
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Gather batch i+1 into pinned memory (a thread, itself spreading the rows over GATHER_THREADS) while
        batch i is copied and used. The copy runs on a stream of its own, so it overlaps the compute stream's
        kernels; the compute stream waits for it, never the host. Two buffers, each refilled only once the copy
        out of it has finished (an event on the copy stream: the compute work queued meanwhile is not waited for)."""
        if not takes:
            return
        shape = (len(takes[0]), *self._images.shape[1:])
        buffers = [torch.empty(shape, dtype=self._images.dtype).pin_memory() for _ in range(2)]
        copied: list[torch.cuda.Event | None] = [None, None]
        copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)

        with ThreadPoolExecutor(max_workers=1) as ahead, ThreadPoolExecutor(max_workers=GATHER_THREADS) as rows:
            def gather(i: int) -> torch.Tensor:
                slot = i % 2
                if copied[slot] is not None:
                    copied[slot].synchronize()  # in this thread: the step loop never waits on the host
                out = buffers[slot][:len(takes[i])]
                gather_rows(self._images, self._index[takes[i]], out, rows)
                return out

            pending = ahead.submit(gather, 0)
            for i in range(len(takes)):
                host = pending.result()
                with torch.cuda.stream(copy_stream):
                    images = host.to(self.device, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(copy_stream)
                copied[i % 2] = event
                compute.wait_event(event)
                images.record_stream(compute)  # its memory is used on the compute stream: not reused before
                if i + 1 < len(takes):
                    pending = ahead.submit(gather, i + 1)
                yield images, self.labels[device_takes[i]]

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)


# Threads that gather one streamed batch: a memory-mapped cache faults its pages in one at a time per thread,
# so a few threads keep several reads in flight (torch's index_select releases the GIL).
GATHER_THREADS = 4


def gather_rows(images: torch.Tensor, index: torch.Tensor, out: torch.Tensor, pool: ThreadPoolExecutor,
                parts: int = GATHER_THREADS) -> None:
    """`torch.index_select(images, 0, index, out=out)`, its rows spread over `pool` in `parts` contiguous runs."""
    bounds = np.linspace(0, len(index), num=min(parts, len(index)) + 1, dtype=np.int64)
    runs = [(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds) if hi > lo]
    for done in [pool.submit(torch.index_select, images, 0, index[lo:hi], out=out[lo:hi]) for lo, hi in runs]:
        done.result()


@dataclass(frozen=True)
class TrialData:
    """What a trial trains and evaluates on: device-resident splits and their preprocessing."""

    train: DeviceData
    val: DeviceData
    test: DeviceData
    preprocess: Preprocess
    augment: tuple[str, ...]
    num_classes: int
    calibration: DeviceData | None = None  # predicted once, by the best epoch's model, for the ensemble only


def trial_data(pool: ImagePool, split: Split, cfg: DataSettings, pretrained: bool, device: torch.device, *,
               sharers: int = 1, placement: Placement | None = None) -> TrialData:
    """Place the splits once (resident or streamed: `placement`, else what `placement_for` decides for one of
    `sharers` workers on this GPU); every trial of a worker reuses them."""
    placement = placement or placement_for(pool, split, cfg, device, sharers=sharers)
    return TrialData(
        train=DeviceData(pool, split.train, device, placement),
        val=DeviceData(pool, split.val, device, placement),
        test=DeviceData(pool, split.test, device, placement),
        preprocess=preprocess_for(pool, split, cfg, pretrained),
        augment=tuple(cfg.augment),
        num_classes=pool.num_classes,
        calibration=DeviceData(pool, split.calibration, device, placement) if len(split.calibration) else None,
    )
