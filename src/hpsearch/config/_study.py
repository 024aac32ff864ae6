"""`StudyConfig`: a whole study file, its tables as typed sections."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from hpsearch.archs import trial_arch
from hpsearch.config._sections import (
    DataSection,
    EnsembleSection,
    ModelSection,
    Strict,
    StudySection,
    TrackingSection,
    TrainSection,
)
from hpsearch.config._space import SpaceSection


class StudyConfig(Strict):
    study: StudySection
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    space: SpaceSection = Field(default_factory=SpaceSection)
    ensemble: EnsembleSection = Field(default_factory=EnsembleSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    # Where the file was read from; relative paths in it resolve against its folder's parent project.
    source: str | None = Field(None, exclude=True)

    def space_fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.space.fingerprint_data(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def searched_archs(self) -> Sequence[str] | None:
        """The architectures `[space] arch` searches; None when every trial trains `[model] arch`."""
        return None if self.space.arch is None else tuple(self.space.arch)

    def trial_model(self, params: Mapping[str, Any]) -> ModelSection:
        """`[model]` as a trial with these Optuna parameters trains it: its drawn `arch`, if any, in place of
        `[model] arch`."""
        arch = trial_arch(self.model.arch, params)
        return self.model if arch == self.model.arch else self.model.model_copy(update={"arch": arch})

    @classmethod
    def recorded(cls, config: Mapping[str, Any] | None, split_sizes: Mapping[str, int] | None) -> StudyConfig:
        """The config a study recorded, as it ran: a study whose recorded split has no calibration part (made
        before there was one) gets `calibration_fraction = 0`, so its split rebuilds as it was."""
        cfg = cls.model_validate(config or {})
        if split_sizes is not None and "calibration" not in split_sizes and cfg.data.calibration_fraction is None:
            return cfg.model_copy(update={"data": cfg.data.model_copy(update={"calibration_fraction": 0.0})})
        return cfg
