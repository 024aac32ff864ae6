"""The study file's tables except `[space]`: `[study]`, `[data]`, `[model]`, `[train]`, `[ensemble]` and
`[tracking]`, each a frozen pydantic model that refuses unknown keys."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from hpsearch.archs import FAMILIES, family_of


class Strict(BaseModel):
    # Unknown keys are typos far more often than intent: refuse them. Types are strict too: pydantic would read
    # "3" as 3 and "yes" or "off" as a bool, and a study file's quoted number or word is a mistake, not a value.
    # What TOML gives for each field still passes: an integer for a float field, a string for a Literal; `[low,
    # high]` lists become tuples in the range validators (config._space), before the strict check.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class StudySection(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    n_trials: int = Field(20, ge=1)
    # What a trial is judged by, on validation (its best epoch, each epoch's report to the pruner, the ranking):
    # accuracy, balanced_accuracy (mean per-class recall), macro_f1 or loss (cross-entropy).
    metric: Literal["accuracy", "balanced_accuracy", "macro_f1", "loss"] = "accuracy"
    # Follows the metric (minimize for loss); a file may state it, and then it must agree.
    direction: Literal["maximize", "minimize"] = Field(None, validate_default=True)  # type: ignore[assignment]
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
    # A storage call that fails on a dropped connection, a database restart or the proxy restarting is retried
    # with backoff for this many seconds; past it the running trial ends FAIL (checkpoint kept, retry queued) once
    # the storage answers again, and the run goes on. 0 = no retry.
    storage_patience: int = Field(120, ge=0)
    # Weights of trials outside the best `keep_weights` are deleted as the study runs (outputs are kept).
    # Default: [ensemble] top_k + 3. 0 keeps every trial's weights.
    keep_weights: int | None = Field(None, ge=0)
    # The study stops once a trial's metric reaches this (for loss: at or below; every worker, after its trial).
    target: float | None = Field(None, gt=0, le=1)

    @field_validator("direction", mode="before")
    @classmethod
    def _direction_follows_metric(cls, direction: Any, info: ValidationInfo) -> Any:
        # A field validator (metric comes first, so it is in info.data) so the error names study.direction.
        metric = info.data.get("metric", "accuracy")
        wanted = "minimize" if metric == "loss" else "maximize"
        if direction is None:
            return wanted
        if direction in ("maximize", "minimize") and direction != wanted:
            raise ValueError(f"{direction!r} contradicts metric {metric!r}, which is to {wanted}; write "
                             f"direction = {wanted!r} or leave direction out (it follows the metric)")
        return direction

    @field_validator("storage")
    @classmethod
    def _storage_without_password(cls, storage: str | None) -> str | None:
        # The study file is committed, printed by `check` and recorded in the study (where optuna-dashboard
        # shows it): a password written here would leak. The message never repeats the URL.
        if storage is not None and _has_password(storage):
            raise ValueError("holds a password; remove it from the study file and give it in $HPSEARCH_STORAGE "
                             "(the whole URL), $PGPASSWORD or ~/.pgpass (with a URL that has none)")
        return storage

    @field_validator("heartbeat_grace")
    @classmethod
    def _grace_above_interval(cls, grace: int, info: ValidationInfo) -> int:
        # A field validator (heartbeat_interval comes first, so it is in info.data) so the error names the field.
        interval = info.data.get("heartbeat_interval")
        if interval and grace <= interval:
            raise ValueError(f"{grace} s is not above heartbeat_interval {interval} s: live trials would be failed "
                             f"as stale between two beats; set it to several intervals (e.g. {10 * interval}), or "
                             "heartbeat_interval = 0 to turn heartbeats off")
        return grace

    @field_validator("artifacts")
    @classmethod
    def _artifacts_location(cls, artifacts: str | None) -> str | None:
        if artifacts is not None and artifacts.startswith("s3://"):
            bucket = artifacts.removeprefix("s3://").partition("/")[0]
            if not bucket or " " in artifacts:
                raise ValueError(f"{artifacts!r} is not an S3 location; write s3://BUCKET or s3://BUCKET/PREFIX")
        return artifacts


def _has_password(url: str) -> bool:
    """Whether a storage URL holds a password: in its user part (`user:PASSWORD@`, up to the last `@`, as
    `hpsearch.store.redact` reads it) or as libpq's `password=` query parameter."""
    rest = url.partition("://")[2] or url  # also a URL without its scheme
    credentials = "" if rest.startswith("/") else rest.rpartition("@")[0]
    return ":" in credentials or re.search(r"[?&](?:ssl)?password=", url, re.IGNORECASE) is not None


class DataSection(Strict):
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


class ModelSection(Strict):
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


class TrainSection(Strict):
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Label smoothing for the training loss (validation loss is plain cross-entropy); [space] label_smoothing
    # searches it instead.
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # How the learning rate follows a searched [space] batch_size: none (as searched) or linear (lr * batch size /
    # base_batch_size; 0 = this table's batch_size). The trial records the searched lr.
    lr_scaling: Literal["none", "linear"] = "none"
    base_batch_size: int = Field(0, ge=0)
    # With [model] freeze = "backbone": the backbone trains too from this epoch on (1-based: 3 unfreezes it after
    # two head-only epochs), at the backbone's learning rate; 0 = never.
    unfreeze_epoch: int = Field(0, ge=0)
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


class EnsembleSection(Strict):
    top_k: int = Field(5, ge=1)


class TrackingSection(Strict):
    # TensorBoard is an optional extra: off by default, so a plain install runs every study.
    # Strict (as every field): a study file's "yes" or "off" should not switch logging.
    tensorboard: bool = False
    # Each trial writes under <log_dir>/<study>/trial-<n>. A relative folder is taken from the current directory
    # when `run` starts; workers on several machines need one shared absolute folder to see each other's trials.
    log_dir: str = Field("runs", min_length=1)
