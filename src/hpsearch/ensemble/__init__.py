"""The top-k trials as an ensemble without retraining: candidates from stored outputs, the combining math,
weight and temperature fitting, the comparison on test, model soups.
"""

from __future__ import annotations

from hpsearch.ensemble._candidates import Candidate, Selection, fold_outputs, stack_outputs
from hpsearch.ensemble._combine import (
    ECE_BINS,
    HARD_TIE_RULE,
    at_bound,
    calibration_bins,
    expected_calibration_error,
    member_log_probs,
    mixture_log_probs,
    scale,
)
from hpsearch.ensemble._fit import EnsembleResult, Member, Method, study_ensemble, study_trial
from hpsearch.ensemble._rows import Row

__all__ = [
    "ECE_BINS",
    "HARD_TIE_RULE",
    "Candidate",
    "EnsembleResult",
    "Member",
    "Method",
    "Row",
    "Selection",
    "at_bound",
    "calibration_bins",
    "expected_calibration_error",
    "fold_outputs",
    "member_log_probs",
    "mixture_log_probs",
    "scale",
    "stack_outputs",
    "study_ensemble",
    "study_trial",
]
