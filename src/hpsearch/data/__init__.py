"""Datasets by name, the study's one seeded split and its folds, the decoded-image cache, device batches and
augmentation. Knows nothing of Optuna.
"""

from __future__ import annotations

from hpsearch.data._datasets import (
    DeviceData,
    ImagePool,
    Split,
    TrialData,
    cache_state,
    load_pool,
    make_split,
    preprocess_for,
    training_input,
    trial_data,
)
from hpsearch.data._folds import Folds, make_folds
from hpsearch.data._recorded import RecordMismatch, StudyData, build_study_data, rebuild_study_data

__all__ = [
    "DeviceData",
    "Folds",
    "ImagePool",
    "RecordMismatch",
    "Split",
    "StudyData",
    "TrialData",
    "build_study_data",
    "cache_state",
    "load_pool",
    "make_folds",
    "make_split",
    "preprocess_for",
    "rebuild_study_data",
    "training_input",
    "trial_data",
]
