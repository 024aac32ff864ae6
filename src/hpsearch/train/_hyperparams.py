"""One trial's hyperparameters: a point of the search space, as the training loop and its factories read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hyperparams:
    """One point of the search space. Field names are the Optuna parameter names (unique per branch)."""

    lr: float
    optimizer: str
    scheduler: str
    dropout: float = 0.0
    weight_decay: float = 0.0
    step_size: int = 1  # StepLR: epochs between decays
    step_gamma: float = 0.1  # StepLR: decay factor
    exp_gamma: float = 0.9  # ExponentialLR: decay per epoch
    plateau_factor: float = 0.1  # ReduceLROnPlateau: decay factor
    plateau_patience: int = 0  # ReduceLROnPlateau: epochs without val-loss improvement before decaying

    @classmethod
    def from_params(cls, params: dict[str, object]) -> Hyperparams:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in params.items() if k in known})  # type: ignore[arg-type]
