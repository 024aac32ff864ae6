"""Test-time augmentation (`predict --tta`, `select --tta`) with the study's own augmentations only.

The views are deterministic transforms of the preprocessed batch, drawn from the augmentations the study
trained with (recorded in the export's manifest, `preprocessing.augment`):

- always the original;
- `crop` (training: random translations by up to size/8 pixels, reflect padding): the original shifted by
  s = max(1, (size/8) // 2) pixels up, down, left and right, with the same reflect padding (4 more views);
- `flip`: every view above, also mirrored left-right (twice the views). A study that never flipped its
  training images never sees a flipped one here;
- `cutout` is a training regulariser that hides information; it adds no view.

Each member's softmax is averaged over the views, then the members combine as without TTA (so uncertainty
measures such as disagreement still compare members).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from hpsearch.errors import TTAError


def manifest_augment(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """The study's training augmentations as the manifest records them; TTAError when it records none."""
    augment = manifest.get("preprocessing", {}).get("augment")
    if augment is None:
        raise TTAError("--tta: the manifest records no training augmentations (preprocessing.augment; exported by "
                       "an older hpsearch); re-export the ensemble with `hpsearch ensemble`, or drop --tta")
    return tuple(str(a) for a in augment)


def crop_shifts(size: int) -> list[tuple[int, int]]:
    """The fixed (dy, dx) translations for `crop`: half the training range, in the four directions."""
    s = max(1, max(1, size // 8) // 2)
    return [(-s, 0), (s, 0), (0, -s), (0, s)]


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate [N, C, H, W] by (dy, dx) pixels (content moves down/right for positive), reflect-padded."""
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def iter_views(x: torch.Tensor, augment: Sequence[str]) -> Iterator[torch.Tensor]:
    """The TTA views of a preprocessed batch, original first; only `augment`'s crop and flip add views."""
    base = [x]
    if "crop" in augment:
        base += [shift(x, dy, dx) for dy, dx in crop_shifts(min(x.shape[-2:]))]
    yield from base
    if "flip" in augment:
        for view in base:
            yield view.flip(-1)


def tta_views(x: torch.Tensor, augment: Sequence[str]) -> list[torch.Tensor]:
    return list(iter_views(x, augment))


def tta_member_probs(member_probs: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     augment: Sequence[str]) -> torch.Tensor:
    """[M, N, C]: each member's softmax averaged over the views (one view in memory at a time)."""
    total: torch.Tensor | None = None
    n = 0
    for view in iter_views(x, augment):
        probs = member_probs(view)
        total = probs if total is None else total + probs
        n += 1
    assert total is not None
    return total / n
