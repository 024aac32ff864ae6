"""Datasets by name, the study's one seeded split and its folds, the decoded-image cache, device batches and
augmentation. Knows nothing of Optuna.
"""

from __future__ import annotations

from hpsearch.data._augment import Mixer, mixer, rand_augment, training_input
from hpsearch.data._batches import DeviceData, TrialData, trial_data
from hpsearch.data._datasets import ImagePool, cache_state, load_pool
from hpsearch.data._folds import Folds, make_folds
from hpsearch.data._recorded import RecordMismatch, StudyData, build_study_data, rebuild_study_data
from hpsearch.data._settings import DataSettings, Placement
from hpsearch.data._split import Split, make_split
from hpsearch.data._stats import preprocess_for

__all__ = [
    "DataSettings",
    "DeviceData",
    "Folds",
    "ImagePool",
    "Mixer",
    "Placement",
    "RecordMismatch",
    "Split",
    "StudyData",
    "TrialData",
    "build_study_data",
    "cache_state",
    "load_pool",
    "make_folds",
    "make_split",
    "mixer",
    "preprocess_for",
    "rand_augment",
    "rebuild_study_data",
    "training_input",
    "trial_data",
]
