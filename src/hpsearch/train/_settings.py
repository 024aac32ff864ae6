"""The `[train]` settings this package reads, as a Protocol: the study file's schema satisfies it as it is, and
train stays independent of that schema (the layer above it)."""

from __future__ import annotations

from typing import Protocol


class TrainSettings(Protocol):
    """What a trial's epochs and checkpoints read (`config.TrainSection` has it all)."""

    @property
    def epochs(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def eval_batch_size(self) -> int: ...
    @property
    def label_smoothing(self) -> float: ...
    @property
    def precision(self) -> str: ...
    @property
    def compile(self) -> bool: ...
    @property
    def checkpoint_every(self) -> int | None: ...
    @property
    def checkpoint_minutes(self) -> float: ...
