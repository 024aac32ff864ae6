"""Stratified k-fold cross-validation over a study's train+val images (`[data] folds = K`).

The fold assignment is made once per study from its seed, like the split, and recorded in the study by its
sha256, so every trial's fold k trains and validates on the same images and a resumed study is checked to keep
them. The pool the folds cut is train+val of the study's split; the held-out test split is never in any fold.
Each class is dealt round-robin over the folds after a seeded shuffle, so every fold holds each class's
share (fold sizes differ by at most one image per class).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from hpsearch.data._split import Split
from hpsearch.errors import DataError


@dataclass(frozen=True)
class Folds:
    """K disjoint validation parts of train+val; fold k trains on the others."""

    pool: np.ndarray  # sorted pool indices of train+val
    assignment: np.ndarray  # fold of each entry of `pool`

    @property
    def k(self) -> int:
        return int(self.assignment.max()) + 1

    def val(self, fold: int) -> np.ndarray:
        return self.pool[self.assignment == fold]

    def train(self, fold: int) -> np.ndarray:
        return self.pool[self.assignment != fold]

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for fold in range(self.k):
            digest.update(np.ascontiguousarray(self.val(fold), dtype=np.int64).tobytes())
            digest.update(b"|")
        return digest.hexdigest()

    def sizes(self) -> list[int]:
        return [int((self.assignment == fold).sum()) for fold in range(self.k)]


def make_folds(labels: np.ndarray, split: Split, k: int, seed: int) -> Folds:
    """Stratified folds of split.train + split.val, fixed by `seed` (a stream of its own, not the split's)."""
    pool = np.sort(np.concatenate([split.train, split.val]))
    if k > len(pool):
        raise DataError(f"data.folds: {k} folds of {len(pool)} train+val images leave a fold empty; use fewer folds")
    rng = np.random.default_rng(np.random.SeedSequence([seed, k, 0xF01D]))
    assignment = np.empty(len(pool), dtype=np.int64)
    offset = 0  # each class continues the deal where the last one stopped: fold sizes stay within one image
    pool_labels = labels[pool]
    for c in np.unique(pool_labels):
        members = rng.permutation(np.flatnonzero(pool_labels == c))
        assignment[members] = (offset + np.arange(len(members))) % k
        offset = (offset + len(members)) % k
    return Folds(pool, assignment)
