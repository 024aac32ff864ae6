"""The study's one seeded, stratified train/val/calibration/test split of a pool.

A `Split` is four index arrays into the pool. They never overlap, are fixed by the study seed, and their sha256
is recorded in the study so every trial's outputs line up sample by sample. Validation picks each trial's best
epoch, feeds the pruner and ranks the trials; calibration is used by none of them, only by the ensemble, which
fits its weights and temperature there (`[data] calibration_fraction`; empty with folds or when set to 0).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from hpsearch.data._datasets import ImagePool
from hpsearch.data._settings import DataSettings
from hpsearch.errors import DataError


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    calibration: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def sha256(self) -> str:
        digest = hashlib.sha256()
        # An empty calibration part leaves the digest as it was before there was one: such studies still resume.
        parts = (self.train, self.val, self.test) + ((self.calibration,) if len(self.calibration) else ())
        for part in parts:
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
            digest.update(b"|")
        return digest.hexdigest()

    def sizes(self) -> dict[str, int]:
        sizes = {"train": len(self.train), "val": len(self.val), "test": len(self.test)}
        return sizes | ({"calibration": len(self.calibration)} if len(self.calibration) else {})


def make_split(pool: ImagePool, cfg: DataSettings, seed: int) -> Split:
    """One stratified split, fixed by the seed. Parts the dataset fixes itself are kept as given. Calibration is
    cut last, from what would otherwise train: validation and test are the same with or without it."""
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
    calibration = np.zeros(0, dtype=np.int64)
    if cfg.calibration_share:
        remaining = 1 - (cfg.test_fraction if pool.given_test is None else 0) - (
            cfg.val_fraction if pool.given_val is None else 0)
        free, calibration = _stratified_cut(free, labels, cfg.calibration_share / remaining, rng)
    split = Split(np.sort(free), np.sort(val), np.sort(test), np.sort(calibration))
    parts = [("train", split.train), ("val", split.val), ("test", split.test)]
    for name, part in parts + ([("calibration", split.calibration)] if cfg.calibration_share else []):
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
