"""Batched augmentation: crop, flip, cutout and random resized crop of whole batches on the training device,
RandAugment of the uint8 batches, and mixup / cutmix of images and labels.

Resizing to `image_size`, augmentation and normalization happen on whole batches on the device (airbench
style), never per image in Python. RandAugment, mixup and cutmix are torchvision's (transforms.v2), which draw
their random choices from torch's global CPU generator on every device (a checkpoint saves it): host-side draws,
no device synchronization.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from hpsearch.preprocess import Preprocess


def augment(x: torch.Tensor, names: Sequence[str], generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched augmentation of preprocessed float images [N, C, H, W], on their device."""
    for name in names:
        if name != "rrc":  # applied before resizing, in training_input
            x = _AUGMENT[name](x, generator)
    return x


def training_input(images: torch.Tensor, preprocess: Preprocess, names: Sequence[str],
                   generator: torch.Generator | None = None, strength: float = 0.0) -> torch.Tensor:
    """A uint8 training batch at its stored size -> augmented, normalized model input at image_size. With rrc,
    the random crop of the stored image is what gets resized (one batched resample), then normalized. A
    `strength` above 0 first RandAugments the uint8 batch (`rand_augment`)."""
    if strength > 0:
        images = rand_augment(images, strength)
    if "rrc" in names:
        x = random_resized_crop(images.float().div_(255), preprocess.image_size, generator)
        x = preprocess.normalize(x)
    else:
        x = preprocess(images)
    return augment(x, names, generator)


RRC_SCALE = (0.25, 1.0)  # of the image's area
RRC_RATIO = (3 / 4, 4 / 3)


def random_resized_crop(x: torch.Tensor, size: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Per image, a random box (area and aspect as RRC_SCALE, RRC_RATIO) resized bilinearly to size x size:
    one affine grid and one grid_sample for the batch."""
    n = x.shape[0]
    area = RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * _rand((n,), x, gen)
    log_ratio = math.log(RRC_RATIO[0]) + (math.log(RRC_RATIO[1]) - math.log(RRC_RATIO[0])) * _rand((n,), x, gen)
    ratio = log_ratio.exp()
    width = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the image's width and height
    height = (area / ratio).sqrt().clamp(max=1.0)
    # Box centres in [-1, 1] such that the box stays inside the image.
    cx = (1 - width) * (2 * _rand((n,), x, gen) - 1)
    cy = (1 - height) * (2 * _rand((n,), x, gen) - 1)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = width, cx, height, cy
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _rand(shape: tuple[int, ...], x: torch.Tensor, gen: torch.Generator | None, high: int | None = None
          ) -> torch.Tensor:
    # Drawn where the generator lives: a device generator on a GPU (no host round trip inside the step
    # loop), the CPU one on the CPU; moved to x's device if they differ.
    where = gen.device if gen is not None else torch.device("cpu")
    if high is None:
        return torch.rand(shape, generator=gen, device=where).to(x.device)
    return torch.randint(0, high, shape, generator=gen, device=where).to(x.device)


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

RAND_AUGMENT_OPS = 2  # RandAugment's num_ops: ops applied one after the other
MAGNITUDE_BINS = 31  # torchvision's default: magnitudes 0..30
RAND_AUGMENT_GROUPS = 4  # independent draws per batch


def rand_augment(images: torch.Tensor, strength: float) -> torch.Tensor:
    """torchvision's RandAugment (v2: `RAND_AUGMENT_OPS` random ops from its 14, geometric ones filling with 0)
    at magnitude round(strength x 30) of 31 bins, on a uint8 batch [N, C, H, W] on its device; same shape, dtype.

    Granularity: v2's RandAugment draws one op (and its sign) per call and applies it to every image of
    a batched tensor (the ops themselves are batched tensor ops). Calling it per image would cost one Python
    dispatch per image and op, the step loop's bottleneck on a GPU; so the batch is cut into
    `RAND_AUGMENT_GROUPS` groups, each with its own draw: a few batched calls per step, and a batch no longer
    gets one and the same transformation."""
    magnitude = round(strength * (MAGNITUDE_BINS - 1))
    if magnitude == 0:  # a strength below 1/60: none (at magnitude 0, Solarize would still invert white pixels)
        return images
    transform = _rand_augment(magnitude)
    groups = images.chunk(min(RAND_AUGMENT_GROUPS, images.shape[0]))
    return torch.cat([transform(group) for group in groups])


@functools.cache
def _rand_augment(magnitude: int) -> v2.RandAugment:
    """One transform per magnitude, built once, not at every step (it holds no state between calls)."""
    return v2.RandAugment(num_ops=RAND_AUGMENT_OPS, magnitude=magnitude, num_magnitude_bins=MAGNITUDE_BINS)


Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def mixer(mixing: str, alpha: float, num_classes: int) -> Mixer | None:
    """`mixing`'s batch transform (none: None): model inputs [N, C, H, W] and int64 labels [N] -> inputs with
    each image mixed with its neighbour in the (shuffled) batch, and soft labels [N, num_classes] that mix the two
    one-hot labels in the same proportion (rows sum to 1). mixup blends whole images by lam ~ Beta(alpha,
    alpha); cutmix pastes a box of the neighbour of area 1 - lam. One lam per batch, as torchvision draws it."""
    if mixing == "none":
        return None
    if mixing == "mixup":
        return v2.MixUp(alpha=alpha, num_classes=num_classes)
    if mixing == "cutmix":
        return v2.CutMix(alpha=alpha, num_classes=num_classes)
    raise ValueError(f"mixing: {mixing!r} is not one of none, mixup, cutmix")
