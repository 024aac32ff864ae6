"""The validation metric a study optimizes, from an epoch's logits: accuracy, balanced accuracy, macro-F1 (scikit-
learn's) or the cross-entropy loss, and which of two epochs is the better by it."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, f1_score

Metric = Literal["accuracy", "balanced_accuracy", "macro_f1", "loss"]
METRICS: tuple[Metric, ...] = ("accuracy", "balanced_accuracy", "macro_f1", "loss")


def evaluate(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy) of logits against labels."""
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy


def score(metric: str, logits: torch.Tensor, labels: torch.Tensor, loss: float, accuracy: float) -> float:
    """The study's metric of one epoch (loss and accuracy are already known; the others read the predictions
    on the host: one copy of the validation split's labels per epoch)."""
    if metric == "accuracy":
        return accuracy
    if metric == "loss":
        return loss
    truth, predicted = labels.cpu().numpy(), logits.argmax(1).cpu().numpy()
    if metric == "balanced_accuracy":
        return float(balanced_accuracy_score(truth, predicted))
    if metric == "macro_f1":
        # A class never predicted has F1 0 (not a warning): it counts against the trial.
        return float(f1_score(truth, predicted, average="macro", zero_division=0))
    raise ValueError(f"metric: {metric!r} is not one of {', '.join(METRICS)}")


def rank_key(metric: str, score: float, val_loss: float, val_accuracy: float) -> tuple[float, float]:
    """Larger is better: the metric first (a lower loss for loss), then the loss or the accuracy as tie-break."""
    if metric == "loss":
        return (-val_loss, val_accuracy)
    return (score, -val_loss)
