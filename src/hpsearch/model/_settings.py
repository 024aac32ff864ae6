"""The `[model]` settings this package reads, as Protocols: the study file's schema satisfies them as it is, and
model stays independent of that schema (the layer above it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

WeightsKind = Literal["none", "torchvision", "file"]


class ModelSettings(Protocol):
    """An architecture, its starting weights and what to freeze (`config.ModelSection`). It must be hashable:
    the starting weights are read once per process per setting (an lru_cache keyed by it)."""

    @property
    def arch(self) -> str: ...
    @property
    def weights(self) -> str: ...
    @property
    def weights_kind(self) -> WeightsKind: ...
    @property
    def freeze(self) -> str: ...


class ImageSizeSetting(Protocol):
    @property
    def image_size(self) -> int: ...


class StudyModelSettings(Protocol):
    """What checking a study's model reads (`config.StudyConfig`): its model, the architectures its trials train
    (`[space] arch`; None: `[model] arch`), its image size, and the file it came from, which errors name."""

    @property
    def model(self) -> ModelSettings: ...
    @property
    def data(self) -> ImageSizeSetting: ...
    @property
    def source(self) -> str | Path | None: ...
    @property
    def searched_archs(self) -> Sequence[str] | None: ...
    def trial_model(self, params: Mapping[str, Any]) -> ModelSettings: ...
