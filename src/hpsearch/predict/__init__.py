"""Loading and verifying an exported ensemble and using it: members, TTA, `predict` and `select`.
Imports neither Optuna nor the study config: an export loads anywhere.
"""

from __future__ import annotations

from hpsearch.predict._load import (
    FOLDS_FORMAT_VERSION,
    FORMAT_VERSION,
    MANIFEST,
    SUMS,
    Ensemble,
    ensemble_from_manifest,
    load_ensemble,
    member_files,
    onnx_files,
    sha256_file,
)
from hpsearch.predict._members import plain_model
from hpsearch.predict._score import csv_text, open_for_scoring, predict_csv, select_csv

__all__ = [
    "FOLDS_FORMAT_VERSION",
    "FORMAT_VERSION",
    "MANIFEST",
    "SUMS",
    "Ensemble",
    "csv_text",
    "ensemble_from_manifest",
    "load_ensemble",
    "member_files",
    "onnx_files",
    "open_for_scoring",
    "plain_model",
    "predict_csv",
    "select_csv",
    "sha256_file",
]
