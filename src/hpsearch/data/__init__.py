"""Datasets by name, the study's one seeded split and its folds, the decoded-image cache, device batches and
augmentation. Knows nothing of Optuna.
"""

from __future__ import annotations

from hpsearch.data._augment import training_input
from hpsearch.data._batches import DeviceData, TrialData, trial_data
from hpsearch.data._datasets import ImagePool, cache_state, load_pool
from hpsearch.data._folds import Folds, make_folds
from hpsearch.data._settings import DataSettings, Placement
from hpsearch.data._split import Split, make_split
from hpsearch.data._stats import preprocess_for

__all__ = [
    "DataSettings",
    "DeviceData",
    "Folds",
    "ImagePool",
    "Placement",
    "Split",
    "TrialData",
    "cache_state",
    "load_pool",
    "make_folds",
    "make_split",
    "preprocess_for",
    "training_input",
    "trial_data",
]
