"""torchvision and timm models by name: weights (enum or local file), a new head with dropout, freezing.
Knows nothing of Optuna.
"""

from __future__ import annotations

from hpsearch.model._build import (
    build_model,
    builder_kwargs,
    check_study_model,
    freeze_backbone,
    head_path,
    init_weights_tag,
    plain_state_dict,
    set_dropout,
    set_train_mode,
    unfreeze_backbone,
)
from hpsearch.model._settings import ModelSettings, StudyModelSettings

__all__ = [
    "ModelSettings",
    "StudyModelSettings",
    "build_model",
    "builder_kwargs",
    "check_study_model",
    "freeze_backbone",
    "head_path",
    "init_weights_tag",
    "plain_state_dict",
    "set_dropout",
    "set_train_mode",
    "unfreeze_backbone",
]
