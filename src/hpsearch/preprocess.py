"""How images become model input, everywhere an image is read: training, exports, predict.

`Preprocess` turns uint8 NCHW images into normalized float input on their own device; `decode_image` reads one
image file as uint8 the way every file is read (RGB, shorter side resized bilinear, centre crop). This module
imports no config and no Optuna, so an exported ensemble loads and predicts with it anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hpsearch.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def triple(values: Iterable[Any], digits: int | None = None) -> tuple[float, float, float]:
    """Three floats (per-channel statistics), rounded to `digits` when given."""
    a, b, c = (float(v) if digits is None else round(float(v), digits) for v in values)
    return (a, b, c)


@dataclass(frozen=True)
class Preprocess:
    """How uint8 images become model input; recorded so an export can reproduce it."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    # mean/std as tensors per device, made once: a fresh host-to-GPU copy per batch would sync every step.
    _stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, image_size: Any, mean: Iterable[Any], std: Iterable[Any], interpolation: Any = "bilinear"
           ) -> Preprocess:
        """From recorded (JSON) values: a study's `preprocess` attr or an export's manifest."""
        return cls(int(image_size), triple(mean), triple(std), str(interpolation))

    def record(self) -> dict[str, Any]:
        """What a study records of it (`Preprocess.of(**record)` gives it back)."""
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode=self.interpolation,
                              align_corners=False, antialias=x.shape[-1] > self.image_size)
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in 0..1 at image_size -> model input."""
        if x.device not in self._stats:
            self._stats[x.device] = (torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1),
                                     torch.tensor(self.std, device=x.device).view(1, 3, 1, 1))
        mean, std = self._stats[x.device]
        return (x - mean) / std


def decode_image(path: Path, size: int) -> torch.Tensor:
    """One image file as uint8 [3, size, size]; an unreadable file raises DataError naming it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            # A phone's photo stores its rotation in EXIF: applied, as every viewer does.
            img = ImageOps.exif_transpose(img).convert("RGB")
            scale = size / min(img.size)
            new = (max(size, round(img.size[0] * scale)), max(size, round(img.size[1] * scale)))
            img = img.resize(new, Image.Resampling.BILINEAR)
            left, top = (new[0] - size) // 2, (new[1] - size) // 2
            img = img.crop((left, top, left + size, top + size))
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable image ({err.__class__.__name__}); fix or remove the file") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)
