"""`[space]`: the ranges and choices Optuna searches, and the fingerprint a resumed study must keep."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from hpsearch.config._sections import Strict, known_arch


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


# `[low, high]`, as the file writes it.
FloatRange = tuple[float, float]
IntRange = tuple[int, int]


class StepSpace(Strict):
    """StepLR"""

    step_size: IntRange = (1, 3)
    """epochs between two decays (Optuna parameter `step_size`)"""
    gamma: FloatRange = (0.1, 0.5)
    """the decay factor, log (`step_gamma`)"""

    _v = field_validator("step_size", mode="before")(lambda v: _range(v, integer=True))
    _g = field_validator("gamma", mode="before")(lambda v: _range(v, log=True))


class ExponentialSpace(Strict):
    """ExponentialLR"""

    gamma: FloatRange = (0.7, 0.99)
    """the factor per epoch, log (`exp_gamma`)"""

    _g = field_validator("gamma", mode="before")(lambda v: _range(v, log=True))


class PlateauSpace(Strict):
    """ReduceLROnPlateau on validation loss"""

    factor: FloatRange = (0.1, 0.5)
    """the decay factor, log (`plateau_factor`)"""
    patience: IntRange = (0, 2)
    """epochs without improvement before a decay (`plateau_patience`)"""

    _f = field_validator("factor", mode="before")(lambda v: _range(v, log=True))
    _p = field_validator("patience", mode="before")(lambda v: _range(v, integer=True))


class CosineSpace(Strict):
    """CosineAnnealingLR per optimizer step over the run, after the warmup"""

    min_ratio: FloatRange = (1e-3, 1e-1)
    """the final lr as a fraction of lr, log (`cosine_min_ratio`)"""

    _m = field_validator("min_ratio", mode="before")(lambda v: _range(v, log=True))


class OneCycleSpace(Strict):
    """OneCycleLR per optimizer step: its rise is the warmup (2 steps at least), then a linear fall"""

    div_factor: FloatRange = (10.0, 100.0)
    """the cycle starts at lr / div_factor, log (`onecycle_div`)"""

    _d = field_validator("div_factor", mode="before")(lambda v: _range(v, log=True))


# Scheduler branches with their own table of parameters (their Optuna names are prefixed by the branch's).
BRANCHES = ("step", "exponential", "plateau", "cosine", "onecycle")
# Keys added after the first studies: absent from a fingerprint while off, so a study created before them resumes.
_OPTIONAL_KEYS = ("warmup_epochs", "head_lr_mult", "label_smoothing", "batch_size", "mixing", "mix_alpha",
                  "augment_strength", "ema", "arch")


class SpaceSection(Strict):
    lr: FloatRange = (1e-4, 1e-1)
    """The learning rate (log)."""
    optimizer: list[Literal["adam", "rmsprop", "sgd", "adamw"]] = Field(default_factory=lambda: ["adam", "rmsprop"])
    """A choice."""
    scheduler: list[Literal["step", "exponential", "plateau", "cosine", "onecycle", "none"]] = Field(
        default_factory=lambda: ["step", "exponential", "plateau"]
    )
    """A choice; each has its own table of parameters below."""
    dropout: FloatRange = (0.0, 0.5)
    """In front of the classifier head."""
    # The rest is optional, off (None) by default, so a study file without them keeps its meaning.
    weight_decay: FloatRange | None = None
    """Searched (log) when given, else 0."""
    warmup_epochs: FloatRange | None = None
    """A linear warmup from 1% of lr over this many epochs (0.5 = half an epoch's steps), per optimizer step,
    before any scheduler; else none."""
    head_lr_mult: FloatRange | None = None
    """The new head's lr over the backbone's (log; two param groups); else 1."""
    label_smoothing: FloatRange | None = None
    """Searched instead of `[train] label_smoothing`."""
    batch_size: list[int] | None = None
    """A choice, instead of `[train] batch_size` (`[train] lr_scaling` says how lr follows it)."""
    mixing: list[Literal["none", "mixup", "cutmix"]] | None = None
    """A choice: each training image mixed with its batch neighbour, and its label with it (soft targets; label
    smoothing on top); else none."""
    mix_alpha: FloatRange | None = None
    """mixup's and cutmix's Beta(alpha, alpha) of the mixing ratio (needs `mixing`); else 1."""
    augment_strength: FloatRange | None = None
    """RandAugment (2 ops) of the uint8 training batches on the device, at magnitude strength x 30 of its 31 bins
    (0 = none); else none."""
    ema: list[bool] | None = None
    """A choice (`[false, true]`): validate, test and keep the weights' moving average (`[train] ema_decay`)."""
    arch: list[str] | None = None
    """A choice of architectures, each written as `[model] arch` is (e.g. `["resnet18", "efficientnet_b0",
    "timm:convnext_nano"]`): each trial trains the one it draws (its parameter `arch`) instead of `[model] arch`,
    with `[model] weights` and `freeze`. With weights = none any mix; with a torchvision weights name only
    torchvision models that have it; a local weights file fits one architecture and is refused here. A soup
    (`ensemble --method soup`) takes trials of one architecture."""
    step: StepSpace = Field(default_factory=StepSpace)
    """StepLR's parameters."""
    exponential: ExponentialSpace = Field(default_factory=ExponentialSpace)
    """ExponentialLR's parameters."""
    plateau: PlateauSpace = Field(default_factory=PlateauSpace)
    """ReduceLROnPlateau's parameters."""
    cosine: CosineSpace = Field(default_factory=CosineSpace)
    """CosineAnnealingLR's parameters."""
    onecycle: OneCycleSpace = Field(default_factory=OneCycleSpace)
    """OneCycleLR's parameters."""

    _lr = field_validator("lr", "weight_decay", "head_lr_mult", mode="before")(
        lambda v: None if v is None else _range(v, log=True))
    _d = field_validator("dropout", "warmup_epochs", "label_smoothing", "mix_alpha", "augment_strength",
                         mode="before")(lambda v: None if v is None else _range(v))

    @field_validator("arch", mode="before")
    @classmethod
    def _arch_choice(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, list):
            raise ValueError(f"is a choice, a list of architectures, e.g. arch = [\"resnet18\", \"timm:convnext_nano\"]"
                             f" (one: set [model] arch); got {value!r}")
        return value

    @field_validator("arch")
    @classmethod
    def _archs(cls, archs: list[str] | None) -> list[str] | None:
        for arch in archs or ():
            known_arch(arch)
        return archs

    @field_validator("optimizer", "scheduler", "mixing", "ema", "arch")
    @classmethod
    def _non_empty(cls, choices: list[Any] | None) -> list[Any] | None:
        if choices is None:
            return None
        if not choices:
            raise ValueError("needs at least one choice")
        if len(set(choices)) != len(choices):
            raise ValueError(f"lists a choice twice: {choices}")
        return choices

    @field_validator("dropout", "label_smoothing")
    @classmethod
    def _below_one(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and (value[0] < 0 or value[1] >= 1):
            raise ValueError(f"must lie in [0, 1), got {list(value)}")
        return value

    @field_validator("mix_alpha")
    @classmethod
    def _alpha(cls, value: tuple[float, float] | None, info: ValidationInfo) -> tuple[float, float] | None:
        # A field validator (mixing comes first, so it is in info.data) so the error names space.mix_alpha.
        if value is None:
            return None
        if value[0] <= 0:
            raise ValueError(f"is a Beta distribution's alpha and must be > 0, got {list(value)}")
        if not set(info.data.get("mixing") or ()) - {"none"}:
            raise ValueError("is the alpha of mixup or cutmix, but [space] mixing offers neither; add mixing = "
                             "[\"none\", \"mixup\", \"cutmix\"] (or some of them) or leave mix_alpha out")
        return value

    @field_validator("augment_strength")
    @classmethod
    def _unit(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and (value[0] < 0 or value[1] > 1):
            raise ValueError(f"must lie in [0, 1] (0 = no RandAugment, 1 = its largest magnitude), got {list(value)}")
        return value

    @field_validator("warmup_epochs")
    @classmethod
    def _not_negative(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] < 0:
            raise ValueError(f"must be >= 0 epochs, got {list(value)}")
        return value

    @field_validator("ema", mode="before")
    @classmethod
    def _ema_choice(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, list):
            raise ValueError(f"is a choice, a list: ema = [false, true] searches it, [true] keeps it on; got {value!r}")
        return value

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_sizes(cls, value: Any) -> Any:
        if value is None:
            return None
        if (not isinstance(value, list) or not value
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
            raise ValueError(f"must be a non-empty list of positive integers (a choice), e.g. [32, 64, 128]; "
                             f"got {value!r}")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a choice twice: {value}")
        return value

    def fingerprint_data(self) -> dict[str, Any]:
        """The parts that decide what Optuna may suggest; a resumed study must keep them."""
        data = self.model_dump(mode="json")
        # Only the branches that can be chosen matter.
        for branch in BRANCHES:
            if branch not in self.scheduler:
                data.pop(branch)
        # What is off is left out: a study created before these keys existed keeps its fingerprint.
        for key in _OPTIONAL_KEYS:
            if data[key] is None:
                data.pop(key)
        return data

    def parameters(self) -> list[Param]:
        """The Optuna parameters a trial suggests, in the order it suggests them; a branch's only when the trial's
        scheduler is that branch. `search.suggest` walks this list and `check` prints it."""
        # The architecture first: what every other parameter of the trial is tuned for.
        params = [Param("arch", "choice", choices=tuple(self.arch))] if self.arch is not None else []
        params += [Param("lr", "float", *self.lr, log=True),
                  Param("optimizer", "choice", choices=tuple(self.optimizer)),
                  Param("scheduler", "choice", choices=tuple(self.scheduler)),
                  Param("dropout", "float", *self.dropout)]
        optional = [("weight_decay", self.weight_decay, True), ("warmup_epochs", self.warmup_epochs, False),
                    ("head_lr_mult", self.head_lr_mult, True), ("label_smoothing", self.label_smoothing, False)]
        params += [Param(name, "float", *bounds, log=log) for name, bounds, log in optional if bounds is not None]
        if self.batch_size is not None:
            params.append(Param("batch_size", "choice", choices=tuple(self.batch_size)))
        if self.mixing is not None:
            params.append(Param("mixing", "choice", choices=tuple(self.mixing)))
        # Drawn in every trial, also one whose mixing is none (which trains without it): a parameter's presence
        # depends on the scheduler only.
        if self.mix_alpha is not None:
            params.append(Param("mix_alpha", "float", *self.mix_alpha))
        if self.augment_strength is not None:
            params.append(Param("augment_strength", "float", *self.augment_strength))
        if self.ema is not None:
            params.append(Param("ema", "choice", choices=tuple(self.ema)))
        branches = {
            "step": [Param("step_size", "int", *self.step.step_size), Param("step_gamma", "float", *self.step.gamma,
                                                                             log=True)],
            "exponential": [Param("exp_gamma", "float", *self.exponential.gamma, log=True)],
            "plateau": [Param("plateau_factor", "float", *self.plateau.factor, log=True),
                        Param("plateau_patience", "int", *self.plateau.patience)],
            "cosine": [Param("cosine_min_ratio", "float", *self.cosine.min_ratio, log=True)],
            "onecycle": [Param("onecycle_div", "float", *self.onecycle.div_factor, log=True)],
        }
        return params + [replace(p, when=branch) for branch in self.scheduler for p in branches.get(branch, [])]


@dataclass(frozen=True)
class Param:
    """One Optuna parameter: a float or int range (log or uniform) or a choice; `when` names the scheduler branch
    it belongs to (None: every trial)."""

    name: str
    kind: Literal["float", "int", "choice"]
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()
    when: str | None = None

    def describe(self) -> str:
        if self.kind == "choice":
            return f"one of {list(self.choices)}"
        scale = "log" if self.log else "uniform"
        return f"{'integer ' if self.kind == 'int' else ''}{scale} [{self.low:g}, {self.high:g}]"
