"""`[space]`: the ranges and choices Optuna searches, and the fingerprint a resumed study must keep."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from hpsearch.config._sections import Strict


def _range(value: Any, *, log: bool = False, integer: bool = False) -> tuple[float, float]:
    """A `[low, high]` pair as the file wrote it, checked before pydantic coerces it (a bool is no number)."""
    if not (isinstance(value, list | tuple) and len(value) == 2):
        raise ValueError("must be a two-element list [low, high]")
    low, high = value
    kinds = (int,) if integer else (int, float)
    if any(isinstance(v, bool) or not isinstance(v, kinds) for v in (low, high)):
        raise ValueError(f"must hold two {'integers' if integer else 'numbers'}, got {list(value)!r}")
    if low > high:
        raise ValueError(f"low {low} is above high {high}")
    if log and low <= 0:
        raise ValueError(f"is searched on a log scale, so low must be > 0 (got {low})")
    return (low, high)


FloatRange = Annotated[tuple[float, float], Field(description="[low, high]")]
IntRange = Annotated[tuple[int, int], Field(description="[low, high]")]


class StepSpace(Strict):
    step_size: IntRange = (1, 3)
    gamma: FloatRange = (0.1, 0.5)

    _v = field_validator("step_size", mode="before")(lambda v: _range(v, integer=True))
    _g = field_validator("gamma", mode="before")(lambda v: _range(v, log=True))


class ExponentialSpace(Strict):
    gamma: FloatRange = (0.7, 0.99)

    _g = field_validator("gamma", mode="before")(lambda v: _range(v, log=True))


class PlateauSpace(Strict):
    factor: FloatRange = (0.1, 0.5)
    patience: IntRange = (0, 2)

    _f = field_validator("factor", mode="before")(lambda v: _range(v, log=True))
    _p = field_validator("patience", mode="before")(lambda v: _range(v, integer=True))


class SpaceSection(Strict):
    lr: FloatRange = (1e-4, 1e-1)
    optimizer: list[Literal["adam", "rmsprop", "sgd", "adamw"]] = Field(default_factory=lambda: ["adam", "rmsprop"])
    scheduler: list[Literal["step", "exponential", "plateau", "none"]] = Field(
        default_factory=lambda: ["step", "exponential", "plateau"]
    )
    dropout: FloatRange = (0.0, 0.5)
    # Optional: searched (log) when given, else no weight decay.
    weight_decay: FloatRange | None = None
    step: StepSpace = Field(default_factory=StepSpace)
    exponential: ExponentialSpace = Field(default_factory=ExponentialSpace)
    plateau: PlateauSpace = Field(default_factory=PlateauSpace)

    _lr = field_validator("lr", "weight_decay", mode="before")(lambda v: None if v is None else _range(v, log=True))
    _d = field_validator("dropout", mode="before")(lambda v: _range(v))

    @field_validator("optimizer", "scheduler")
    @classmethod
    def _non_empty(cls, choices: list[str]) -> list[str]:
        if not choices:
            raise ValueError("needs at least one choice")
        if len(set(choices)) != len(choices):
            raise ValueError(f"lists a choice twice: {choices}")
        return choices

    @field_validator("dropout")
    @classmethod
    def _dropout_below_one(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] < 0 or value[1] >= 1:
            raise ValueError(f"must lie in [0, 1), got {list(value)}")
        return value

    def fingerprint_data(self) -> dict[str, Any]:
        """The parts that decide what Optuna may suggest; a resumed study must keep them."""
        data = self.model_dump(mode="json")
        # Only the branches that can be chosen matter.
        for branch in ("step", "exponential", "plateau"):
            if branch not in self.scheduler:
                data.pop(branch)
        return data
