"""The study file: its typed schema and its validation.

A study file is TOML with the tables `[study]`, `[data]`, `[model]`, `[train]`, `[space]`, `[ensemble]` and
`[tracking]`. `read_study_file(path)` returns a `StudyConfig` or raises `ConfigError`, whose message is one
line that names the offending field and says what is allowed. This module imports no torch: checks that
need the model itself (can this architecture take this image size?) live in `model.py`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hpsearch.archs import FAMILIES, family_of, resolve_path
from hpsearch.errors import ConfigError

OPTIMIZERS = ("adam", "rmsprop", "sgd", "adamw")
SCHEDULERS = ("step", "exponential", "plateau", "none")
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
AUGMENTATIONS = ("crop", "flip", "cutout")
SAMPLERS = ("tpe", "random", "gp")
PRUNERS = ("median", "hyperband", "wilcoxon", "none")

class _Strict(BaseModel):
    # Unknown keys are typos far more often than intent: refuse them.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _range(value: Any, *, log: bool = False, integer: bool = False) -> tuple[float, float]:
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


class StudySection(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    n_trials: int = Field(20, ge=1)
    direction: Literal["maximize"] = "maximize"
    sampler: Literal["tpe", "random", "gp"] = "tpe"
    # wilcoxon: only with [data] folds (a trial reports one step per fold; see WilcoxonPruner).
    pruner: Literal["median", "hyperband", "wilcoxon", "none"] = "median"
    # Trials the median pruner waits for, and epochs before it may prune a trial.
    pruner_startup_trials: int = Field(5, ge=0)
    pruner_warmup_epochs: int = Field(1, ge=0)
    # wilcoxon: prune once the signed-rank test says, at this p-value, that the trial's folds are worse than
    # the best trial's (Optuna's default 0.1; with 5 folds the exact test can first reach it after 4 folds).
    pruner_p_threshold: float = Field(0.1, gt=0, lt=1)
    seed: int = Field(0, ge=0)
    storage: str | None = None
    artifacts: str | None = None
    # A run stops, rather than burning the budget, when this many trials in a row fail.
    max_consecutive_failures: int = Field(5, ge=1)
    # Workers on RDB storages beat every `heartbeat_interval` s; a trial silent for `heartbeat_grace` s is
    # failed and retried once (its worker died). Long GPU trials are fine: beats run in a thread. 0 = off.
    heartbeat_interval: int = Field(60, ge=0)
    heartbeat_grace: int = Field(600, ge=1)
    # Weights of trials outside the best `keep_weights` are deleted as the study runs (outputs are kept).
    # Default: [ensemble] top_k + 3. 0 keeps every trial's weights.
    keep_weights: int | None = Field(None, ge=0)
    # The study stops once a trial's validation accuracy reaches this (every worker, after its current trial).
    target: float | None = Field(None, gt=0, le=1)

    @field_validator("artifacts")
    @classmethod
    def _artifacts_location(cls, artifacts: str | None) -> str | None:
        if artifacts is not None and artifacts.startswith("s3://"):
            bucket = artifacts.removeprefix("s3://").partition("/")[0]
            if not bucket or " " in artifacts:
                raise ValueError(f"{artifacts!r} is not an S3 location; write s3://BUCKET or s3://BUCKET/PREFIX")
        return artifacts


class DataSection(_Strict):
    dataset: Literal["digits", "cifar10", "cifar100", "imagefolder", "synthetic"] = "digits"
    root: str = "data"
    image_size: int = Field(32, ge=8, le=1024)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    # rrc: random resized crop (scale 0.25-1, aspect 3/4-4/3) of the stored image, resized to image_size.
    augment: list[Literal["crop", "flip", "cutout", "rrc"]] = Field(default_factory=lambda: ["crop"])
    # Use at most this many images (stratified), for smoke runs; 0 uses everything.
    subset: int = Field(0, ge=0)
    # Image folders: decoded once at this size (0: image_size; larger leaves room for rrc) into the cache.
    stored_size: int = Field(0, ge=0, le=2048)
    # An unreadable image file: fail (name it and stop) or skip (leave it out; the study lists it).
    bad_images: Literal["fail", "skip"] = "fail"
    # Where decoded image folders and CIFAR live ("" = $HPSEARCH_CACHE_DIR or ~/.cache/hpsearch/images).
    cache_dir: str = ""
    # auto: on a GPU the splits stay in device memory when they fit device_memory_fraction of its free
    # memory, else batches stream from the cache; on the CPU batches are gathered from the cache (no copy).
    placement: Literal["auto", "resident", "stream"] = "auto"
    device_memory_fraction: float = Field(0.5, gt=0, le=0.95)
    # Only for `synthetic`: how many images, how many classes.
    synthetic_size: int = Field(2000, ge=20)
    synthetic_classes: int = Field(10, ge=2)
    # Stratified k-fold cross-validation over train+val (K >= 2); 0 = one train/val split. The test split is
    # never in any fold.
    folds: int = Field(0, ge=0)

    @field_validator("folds")
    @classmethod
    def _check_folds(cls, folds: int) -> int:
        if folds == 1:
            raise ValueError("1 fold is no cross-validation; use folds = 2 or more, or 0 for one train/val split")
        return folds

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        if self.stored_size and self.stored_size < self.image_size:
            raise ValueError(f"stored_size {self.stored_size} is below image_size {self.image_size}; store at "
                             "image_size or larger (0 means image_size)")
        return self

    @property
    def decoded_size(self) -> int:
        """The size image folders are decoded and cached at."""
        return self.stored_size or self.image_size

    @property
    def cached(self) -> bool:
        """Whether its decoded images are cached on disk (image folders and CIFAR; digits and synthetic data
        are made in memory)."""
        return self.dataset in ("imagefolder", "cifar10", "cifar100")

    @field_validator("augment")
    @classmethod
    def _check_augment(cls, augment: list[str], info: ValidationInfo) -> list[str]:
        # A field validator (not the model one) so the error names data.augment.
        if len(set(augment)) != len(augment):
            raise ValueError("lists an augmentation twice")
        if info.data.get("dataset") == "digits" and "flip" in augment:
            raise ValueError("'flip' is wrong for digits (a mirrored 2 is no 2); use crop or cutout")
        return augment


class ModelSection(_Strict):
    arch: str = "resnet18"
    weights: str = "none"  # none | a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...) | a local file
    freeze: Literal["none", "backbone"] = "none"

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if family_of(arch) is None:
            families = ", ".join(FAMILIES)
            raise ValueError(
                f"unknown architecture {arch!r}; use a torchvision classification model of the families "
                f"{families} (e.g. resnet18, efficientnet_b0, convnext_tiny, vit_b_16)"
            )
        return arch

    @property
    def weights_kind(self) -> Literal["none", "torchvision", "file"]:
        if self.weights.lower() == "none":
            return "none"
        if looks_like_path(self.weights):
            return "file"
        return "torchvision"

    @property
    def pretrained(self) -> bool:
        return self.weights_kind != "none"


def looks_like_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or weights.endswith((".safetensors", ".pt", ".pth", ".bin"))


class TrainSection(_Strict):
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Label smoothing for the training loss (validation loss is plain cross-entropy).
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # A resumable checkpoint (through the artifact store, written while the next epoch trains) lets a retried
    # trial continue from it instead of epoch 1. By default one is taken at the first epoch end after every
    # checkpoint_minutes of training (0 = every epoch); checkpoint_every = N takes one every N epochs instead
    # (0 = never: short trials restart cheaper than they save) and wins over the minutes. A study file sets one
    # of the two (parse_study); a recorded config holds both.
    checkpoint_every: int | None = Field(None, ge=0)
    checkpoint_minutes: float = Field(5.0, ge=0)
    # auto: bf16 autocast on a GPU that supports it, else fp16 with a gradient scaler; fp32 on the CPU.
    # Stored validation/test outputs are always computed in fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # torch.compile once per worker, reused by every later trial of the same architecture, image size and
    # batch size (a new dropout does not recompile); the first trial pays the compilation.
    compile: bool = False


class StepSpace(_Strict):
    step_size: IntRange = (1, 3)
    gamma: FloatRange = (0.1, 0.5)

    _v = field_validator("step_size", mode="before")(lambda v: _range(v, integer=True))
    _g = field_validator("gamma", mode="before")(lambda v: _range(v, log=True))


class ExponentialSpace(_Strict):
    gamma: FloatRange = (0.7, 0.99)

    _g = field_validator("gamma", mode="before")(lambda v: _range(v, log=True))


class PlateauSpace(_Strict):
    factor: FloatRange = (0.1, 0.5)
    patience: IntRange = (0, 2)

    _f = field_validator("factor", mode="before")(lambda v: _range(v, log=True))
    _p = field_validator("patience", mode="before")(lambda v: _range(v, integer=True))


class SpaceSection(_Strict):
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


class EnsembleSection(_Strict):
    top_k: int = Field(5, ge=1)


class TrackingSection(_Strict):
    # TensorBoard is an optional extra: off by default, so a plain install runs every study.
    # Strict: pydantic would read "yes" or "off" as a bool, and a study file's typo should not switch logging.
    tensorboard: bool = Field(False, strict=True)
    # Each trial writes under <log_dir>/<study>/trial-<n>. A relative folder is taken from the current directory
    # when `run` starts; workers on several machines need one shared absolute folder to see each other's trials.
    log_dir: str = Field("runs", min_length=1)


class StudyConfig(_Strict):
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


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p.startswith(("function-", "function_")))]
    # pydantic puts the validator's name or a union member in `loc`; keep the user's key path.
    parts = [p for p in parts if p not in {"tuple[float, float]", "list[...]", "function-after", "function-before"}]
    return ".".join(parts) if parts else "(file)"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the table at `loc` takes, for naming them when a key is unknown."""
    model: type[BaseModel] = StudyConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return [name for name, field in model.model_fields.items() if not field.exclude]


def _message(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1])
        return f"unknown key; allowed here: {', '.join(allowed)}" if allowed else (
            "unknown key; check its spelling against the study-file reference in README.md")
    if kind == "missing":
        return "is required"
    if kind == "literal_error":
        allowed = error.get("ctx", {}).get("expected", "")
        return f"{error['input']!r} is not allowed; use one of {allowed}"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def parse_study(data: dict[str, Any], source: str | Path | None = None) -> StudyConfig:
    _check_one_checkpoint_rule(data, source)
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(_field_path(first["loc"]), _message(first), source) from None
    _check_weights_file(config, source)
    _check_pruner_folds(config, source)
    _check_tracking_installed(config, source)
    return config.model_copy(update={"source": str(source) if source else None})


def _check_one_checkpoint_rule(data: dict[str, Any], source: str | Path | None) -> None:
    train = data.get("train")
    if isinstance(train, dict) and "checkpoint_every" in train and "checkpoint_minutes" in train:
        raise ConfigError("train.checkpoint_minutes", "set checkpoint_every (epochs) or checkpoint_minutes, not "
                          "both; remove one", source)


def _check_weights_file(config: StudyConfig, source: str | Path | None) -> None:
    if config.model.weights_kind == "file":
        path = resolve_path(config.model.weights, source)
        if not path.is_file():
            raise ConfigError(
                "model.weights", f"local weights file {str(path)!r} does not exist; give an existing "
                ".safetensors/.pt file, a torchvision weights name such as DEFAULT, or none", source
            )


def _check_pruner_folds(config: StudyConfig, source: str | Path | None) -> None:
    if config.study.pruner == "wilcoxon" and not config.data.folds:
        raise ConfigError("study.pruner", "'wilcoxon' compares trials fold by fold and needs [data] folds = K "
                          "(K >= 2); set folds, or use median, hyperband or none", source)


def _check_tracking_installed(config: StudyConfig, source: str | Path | None) -> None:
    # Here, not in a validator: a recorded config re-validated by `ensemble` or `report` needs no TensorBoard.
    # find_spec imports nothing (this module stays free of torch and tensorboard).
    if config.tracking.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tracking.tensorboard", "[tracking] tensorboard = true needs the tensorboard package, "
                          "which is not installed; run `pip install -e '.[tensorboard]'` or set it to false", source)


def read_study_file(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("study file", f"{str(path)!r} does not exist; pass a studies/*.toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("(file)", f"is not valid TOML: {err}", path) from None
    except UnicodeDecodeError:
        raise ConfigError("(file)", "is not UTF-8 text; save it as UTF-8 TOML", path) from None
    return parse_study(data, path)
