"""How images become model input, everywhere an image is read: training, exports, predict.

`Preprocess` turns uint8 NCHW images into normalized float input on their own device; `decode_image` reads one
image file as uint8 the way every file is read (RGB, shorter side resized bilinear, centre crop); `image_files`
lists a folder's images the way every folder is listed (links followed only while they stay inside it). A file
whose header declares more than MAX_IMAGE_PIXELS pixels (a decompression bomb) is refused before it is decoded.
This module imports no config and no Optuna, so an exported ensemble loads and predicts with it anywhere.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hpsearch.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# The most pixels an image file may declare (width x height, read from its header before anything is decoded):
# PIL's own default, 256 MiB as RGB (e.g. 9459 x 9459). A file above it is a bad image like any unreadable one.
MAX_IMAGE_PIXELS = 89_478_485


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
    """One image file as uint8 [3, size, size]; an unreadable file (whatever the decoder raised, or a header
    declaring more than MAX_IMAGE_PIXELS pixels) raises DataError naming it, in one line."""
    from PIL import Image, ImageOps

    _quiet_pil_bomb_warning()
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise _TooLarge(f"{width} x {height} = {width * height:,} pixels")
            if min(width, height) < 1:
                raise ValueError("no pixels")
            # A phone's photo stores its rotation in EXIF: applied, as every viewer does.
            img = ImageOps.exif_transpose(img).convert("RGB")
            scale = size / min(img.size)
            new = (max(size, round(img.size[0] * scale)), max(size, round(img.size[1] * scale)))
            img = img.resize(new, Image.Resampling.BILINEAR)
            left, top = (new[0] - size) // 2, (new[1] - size) // 2
            img = img.crop((left, top, left + size, top + size))
            array = np.asarray(img, dtype=np.uint8)
    except (_TooLarge, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Image.open itself refuses (or, as an error, warns about) sizes over PIL's limit, before our check.
        pil = re.search(r"\((\d+) pixels\)", str(err))  # PIL: "Image size (N pixels) exceeds limit of ..."
        declared = str(err) if isinstance(err, _TooLarge) else f"{int(pil[1]):,} pixels" if pil else "more pixels"
        raise DataError(f"{path}: not a readable image (it declares {declared}, more than the limit of "
                        f"{MAX_IMAGE_PIXELS:,}: a decompression bomb?); shrink or remove the file") from None
    except Exception as err:  # any decoder error is this file's: a bad image, never a traceback
        raise DataError(f"{path}: not a readable image ({err.__class__.__name__}); fix or remove the file") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


@functools.cache
def _quiet_pil_bomb_warning() -> None:
    """PIL only warns about an image between its pixel limit and twice it; decode_image refuses every image over
    MAX_IMAGE_PIXELS itself, in one line, so the warning would be a stray second line about the same file.
    Once per process (filters are process-wide and threads decode at once)."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class _TooLarge(Exception):
    """A header declaring more than MAX_IMAGE_PIXELS pixels (decode_image's own check)."""


def image_files(folder: Path, refuse: Callable[[Path, Path], None], within: Path | None = None) -> list[Path]:
    """The image files under `folder`, recursively, sorted, by their paths under it. A link (file or folder) is
    followed only while what it points to stays inside `within` (default: `folder`); one leading out is told to
    `refuse(link, target)` and left out, so a folder linked to / is never crawled. A folder reached twice
    through links (a loop) is walked once."""
    top = (within or folder).resolve()
    found: list[Path] = []
    seen: set[Path] = set()

    def walk(here: Path) -> None:
        real = here.resolve()
        if real in seen:
            return
        seen.add(real)
        for path in sorted(here.iterdir()):
            if path.is_symlink():
                try:
                    target = path.resolve()
                except (OSError, RuntimeError):  # a link loop: it leads nowhere
                    continue
                if not target.is_relative_to(top):
                    refuse(path, target)
                    continue
            if path.is_dir():
                walk(path)
            elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                found.append(path)

    walk(folder)
    return sorted(found)
