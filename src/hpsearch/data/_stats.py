"""Channel statistics that normalize model input: ImageNet's for pretrained weights, else the training split's."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from hpsearch.data._datasets import ImagePool
from hpsearch.data._settings import DataSettings
from hpsearch.data._split import Split
from hpsearch.preprocess import Preprocess, triple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_for(pool: ImagePool, split: Split, cfg: DataSettings, pretrained: bool) -> Preprocess:
    """ImageNet statistics for pretrained weights; otherwise the training split's own channel stats."""
    if pretrained:
        return Preprocess(cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)
    mean, std = channel_stats(pool.images, split.train, read=pool.read)
    return Preprocess(cfg.image_size, triple(mean, digits=6), triple(std, digits=6))


STATS_CHUNK_BYTES = 2 * 2**20


def channel_stats(images: torch.Tensor, indices: np.ndarray, chunk: int | None = None,
                  read: Callable[[np.ndarray], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std in 0..1 over `images[indices]`, a chunk at a time in float64 (at most
    STATS_CHUNK_BYTES of it): never a float copy of the whole split. `read(chunk_indices)` gives a chunk's images
    (`ImagePool.read`: from a cached pool's file, so the split's pages never become this process's memory)."""
    if chunk is None:
        chunk = max(1, STATS_CHUNK_BYTES // (8 * math.prod(images.shape[1:])))
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for start in range(0, len(indices), chunk):
        part = indices[start:start + chunk]
        x = (read(part) if read is not None else images[torch.from_numpy(part)]).to(torch.float64).div_(255)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    var = (squares - count * mean.square()) / max(1, count - 1)
    return mean.float(), var.clamp_min(0).sqrt().clamp_min(1e-3).float()
