"""One trial's epochs: optimizer and scheduler factories, the step loop, best-epoch weights, checkpoints,
precision, the device, compile. Knows nothing of Optuna.
"""

from __future__ import annotations

from hpsearch.train._accelerator import (
    gpu_identity,
    is_out_of_memory,
    is_sticky_device_error,
    out_of_memory_cause,
    out_of_memory_where,
    peak_memory_mib,
    reset_peak_memory,
    resolve_device,
)
from hpsearch.train._checkpoints import CheckpointWriter, checkpoint_policy
from hpsearch.train._hyperparams import Hyperparams
from hpsearch.train._loop import Checkpoint, EpochMetrics, NonFiniteLoss, TrainResult, predict_logits, train_trial
from hpsearch.train._settings import TrainSettings

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "EpochMetrics",
    "Hyperparams",
    "NonFiniteLoss",
    "TrainResult",
    "TrainSettings",
    "checkpoint_policy",
    "gpu_identity",
    "is_out_of_memory",
    "is_sticky_device_error",
    "out_of_memory_cause",
    "out_of_memory_where",
    "peak_memory_mib",
    "predict_logits",
    "reset_peak_memory",
    "resolve_device",
    "train_trial",
]
