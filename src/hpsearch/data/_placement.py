"""Where a worker's splits live under `[data] placement = "auto"`: resident on its GPU when they fit its share of
`device_memory_fraction` of the free memory, streamed from the pool otherwise.

Its share: the workers pinned to one GPU (`run --workers-per-gpu M`) each start by reading the same free memory,
so each may take only 1/M of the allowance; and under cross-validation the train and validation images are on
the device twice while a fold trains (the study's split, and the running fold's; a fold's copy is freed before
the next fold's is made).
"""

from __future__ import annotations

import math

import torch

from hpsearch.data._datasets import ImagePool
from hpsearch.data._settings import DataSettings, Placement
from hpsearch.data._split import Split


def resident_bytes(row_bytes: int, split: Split, folds: int) -> int:
    """Device memory the resident copies of a worker take at their peak: the splits, plus one fold's train and
    validation images under cross-validation (folds >= 2)."""
    rows = len(split.train) + len(split.val) + len(split.test) + len(split.calibration)
    if folds:
        rows += len(split.train) + len(split.val)  # the folds partition train+val
    return row_bytes * rows


def resident_allowance(free_bytes: int, fraction: float, sharers: int) -> float:
    """What one worker may keep resident: `fraction` of the GPU's free memory, divided among the `sharers`
    workers pinned to that GPU."""
    return fraction * free_bytes / max(1, sharers)


def placement_for(pool: ImagePool, split: Split, cfg: DataSettings, device: torch.device, *, sharers: int = 1
                  ) -> Placement:
    """Where a worker's splits live: `[data] placement`, or under auto resident on a GPU when they fit this
    worker's allowance (see the module's docstring), streamed otherwise; on the CPU gathered from the pool (the
    shared cache), since a resident copy there would be one more private copy per process."""
    if cfg.placement != "auto":
        return cfg.placement
    if device.type != "cuda":
        return "stream"
    row = math.prod(pool.images.shape[1:]) * pool.images.element_size()
    free, _total = torch.cuda.mem_get_info(device)
    fits = resident_bytes(row, split, cfg.folds) <= resident_allowance(free, cfg.device_memory_fraction, sharers)
    return "resident" if fits else "stream"
