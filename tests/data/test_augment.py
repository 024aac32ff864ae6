"""Batched augmentation (data/_augment.py): shapes kept, reproducible per generator, each op doing what it names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hpsearch.data._augment import augment, cutout, random_crop, random_flip


def _images(n: int = 64, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fn", [random_crop, random_flip, cutout])
def test_augmentations_keep_shape_and_are_reproducible(fn) -> None:
    x = _images()
    a = fn(x, torch.Generator().manual_seed(3))
    b = fn(x, torch.Generator().manual_seed(3))
    c = fn(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_random_crop_translates_content() -> None:
    x = _images(n=64, size=16)
    out = random_crop(x, torch.Generator().manual_seed(0))
    pad = 16 // 8
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    shifts = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + 16, dx:dx + 16])]
        assert len(found) == 1, f"sample {i} is not a shifted copy of its input"
        shifts.append(found[0])
    # Many different translations occur, including real ones (not just the identity at (pad, pad)).
    assert len(set(shifts)) >= 10
    assert sum(s != (pad, pad) for s in shifts) > len(x) // 2
    # A shifted sample's interior is the input moved by that offset.
    i = next(k for k, s in enumerate(shifts) if s[0] != pad and s[1] != pad)
    dy, dx = shifts[i][0] - pad, shifts[i][1] - pad
    assert torch.equal(out[i, :, 4:12, 4:12], x[i, :, 4 + dy:12 + dy, 4 + dx:12 + dx])


def test_random_flip_flips_only_some_samples() -> None:
    x = _images(n=200)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 60 < sum(flipped) < 140


def test_cutout_zeros_one_square_per_image() -> None:
    x = _images(n=32, size=16) + 10.0  # no zeros anywhere before cutout
    out = cutout(x, torch.Generator().manual_seed(0))
    zero = out == 0
    assert torch.equal(zero[:, 0], zero[:, 1]) and torch.equal(zero[:, 0], zero[:, 2])
    for i in range(len(x)):
        mask = zero[i, 0]
        assert mask.any()
        assert torch.equal(out[i][~zero[i]], x[i][~zero[i]])
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        # A solid rectangle, at most side//2*2+1 = 5 pixels wide (clipped at borders).
        assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert len(rows) <= 5 and len(cols) <= 5


def test_augment_chains_by_name() -> None:
    x = _images()
    a = augment(x, ["crop", "flip", "cutout"], torch.Generator().manual_seed(1))
    b = augment(x, ["crop", "flip", "cutout"], torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    assert torch.equal(augment(x, [], torch.Generator().manual_seed(1)), x)
