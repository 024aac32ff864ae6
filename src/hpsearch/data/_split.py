"""The study's one seeded, stratified train/val/test split of a pool.

A `Split` is three index arrays into the pool. Train/val/test never overlap, are fixed by the study seed, and
their sha256 is recorded in the study so every trial's outputs line up sample by sample.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from hpsearch.data._datasets import ImagePool
from hpsearch.data._settings import DataSettings
from hpsearch.errors import DataError


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for part in (self.train, self.val, self.test):
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
            digest.update(b"|")
        return digest.hexdigest()

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def make_split(pool: ImagePool, cfg: DataSettings, seed: int) -> Split:
    """One stratified split, fixed by the seed. Parts the dataset fixes itself are kept as given."""
    rng = np.random.default_rng(seed)
    labels = pool.labels.numpy()
    fixed = np.zeros(len(labels), dtype=bool)
    for given in (pool.given_val, pool.given_test):
        if given is not None:
            fixed[given] = True
    free = np.flatnonzero(~fixed)
    if cfg.subset:
        free = _stratified_take(free, labels, cfg.subset, rng)
    test = pool.given_test
    if test is None:
        free, test = _stratified_cut(free, labels, cfg.test_fraction, rng)
    elif cfg.subset:
        test = _stratified_take(test, labels, max(pool.num_classes, round(cfg.subset * cfg.test_fraction)), rng)
    val = pool.given_val
    if val is None:
        free, val = _stratified_cut(free, labels, cfg.val_fraction / (1 - (cfg.test_fraction if pool.given_test
                                                                          is None else 0)), rng)
    elif cfg.subset:
        val = _stratified_take(val, labels, max(pool.num_classes, round(cfg.subset * cfg.val_fraction)), rng)
    split = Split(np.sort(free), np.sort(val), np.sort(test))
    for name, part in (("train", split.train), ("val", split.val), ("test", split.test)):
        if len(part) == 0:
            raise DataError(f"data: the {name} split is empty; use more data or other val/test fractions")
    return split


def _stratified_cut(idx: np.ndarray, labels: np.ndarray, fraction: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Move `fraction` of each class of idx into a second part (at least one per class with 2+)."""
    keep, cut = [], []
    for c in np.unique(labels[idx]):
        members = rng.permutation(idx[labels[idx] == c])
        # At least one per part for a class of 2+, never the whole class.
        n = min(max(round(len(members) * fraction), 1), len(members) - 1) if len(members) > 1 else 0
        cut.append(members[:n])
        keep.append(members[n:])
    return np.concatenate(keep), np.concatenate(cut)


def _stratified_take(idx: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n >= len(idx):
        return idx
    _, taken = _stratified_cut(idx, labels, n / len(idx), rng)
    return taken
