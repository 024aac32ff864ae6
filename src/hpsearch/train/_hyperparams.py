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
    cosine_min_ratio: float = 1e-3  # CosineAnnealingLR: the final lr as a fraction of lr
    onecycle_div: float = 25.0  # OneCycleLR: div_factor, the cycle starts at lr / onecycle_div
    warmup_epochs: float = 0.0  # linear warmup, in epochs (of optimizer steps), before any scheduler
    head_lr_mult: float = 1.0  # the head's lr over the backbone's (1: one param group, as before)
    label_smoothing: float | None = None  # None: [train] label_smoothing
    batch_size: int | None = None  # None: [train] batch_size
    mixing: str = "none"  # none | mixup | cutmix: two training images and their labels mixed
    mix_alpha: float = 1.0  # the mixing ratio's Beta(alpha, alpha)
    augment_strength: float = 0.0  # RandAugment's magnitude as a fraction of its largest; 0 = none
    ema: bool = False  # validate, test and keep the weights' moving average ([train] ema_decay)
    # [space] arch: the architecture the trial drew (None: [model] arch). The model settings a trial trains with
    # carry it (config.StudyConfig.trial_model); here it only keeps a trial's parameters whole.
    arch: str | None = None

    @classmethod
    def from_params(cls, params: dict[str, object]) -> Hyperparams:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in params.items() if k in known})  # type: ignore[arg-type]
