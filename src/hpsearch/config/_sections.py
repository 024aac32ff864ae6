"""The study file's tables except `[space]`: `[study]`, `[data]`, `[model]`, `[train]`, `[ensemble]` and
`[tracking]`, each a frozen pydantic model that refuses unknown keys."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from hpsearch.archs import FAMILIES, TIMM_NAME, family_of, timm_name


class Strict(BaseModel):
    # Unknown keys are typos far more often than intent: refuse them. Types are strict too: pydantic would read
    # "3" as 3 and "yes" or "off" as a bool, and a study file's quoted number or word is a mistake, not a value.
    # What TOML gives for each field still passes: an integer for a float field, a string for a Literal; `[low,
    # high]` lists become tuples in the range validators (config._space), before the strict check.
    # Each field's docstring is its user-facing description: tools/study_keys.py writes the README's study-file
    # reference from them.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


class StudySection(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The Optuna study's name: letters, digits, `_`, `.`, `-`."""
    n_trials: int = Field(20, ge=1)
    """Finished trials (COMPLETE + PRUNED; FAIL does not count) the study runs to."""
    metric: Literal["accuracy", "balanced_accuracy", "macro_f1", "loss"] = "accuracy"
    """What a trial is judged by on validation (scikit-learn's balanced accuracy and macro-F1; loss =
    cross-entropy): each epoch reports it to the pruner, it picks the best epoch and ranks the trials."""
    direction: Literal["maximize", "minimize"] = Field(None, validate_default=True)  # type: ignore[assignment]
    """Follows the metric (minimize for loss); if given, it must agree."""
    sampler: Literal["tpe", "random", "gp"] = "tpe"
    """tpe is multivariate, grouped, with the constant liar for parallel workers."""
    pruner: Literal["median", "hyperband", "wilcoxon", "none"] = "median"
    """wilcoxon only with `[data] folds` (a trial reports one step per fold)."""
    pruner_startup_trials: int = Field(5, ge=0)
    """median: trials to finish before pruning starts."""
    pruner_warmup_epochs: int = Field(1, ge=0)
    """median: epochs before a trial may be pruned."""
    # Optuna's default 0.1; with 5 folds the exact signed-rank test can first reach it after 4 folds.
    pruner_p_threshold: float = Field(0.1, gt=0, lt=1)
    """wilcoxon: prune once the signed-rank test says at this p-value that the trial's folds are worse than the
    best trial's."""
    seed: int = Field(0, ge=0)
    """The split, the folds and the samplers; trial k trains with seed + k."""
    storage: str | None = None
    """A storage URL without a password (refused): `--storage` and `$HPSEARCH_STORAGE` win; default
    `sqlite:///hpsearch.db`."""
    artifacts: str | None = None
    """The artifact store, a folder or `s3://BUCKET/PREFIX` (recorded in the study); default `./artifacts`."""
    max_consecutive_failures: int = Field(5, ge=1)
    """A run stops, rather than burn its budget, when this many trials in a row fail."""
    # Beats run in a thread: long GPU trials are fine.
    heartbeat_interval: int = Field(60, ge=0)
    """Database storages: seconds between a running trial's heartbeats (0 = off)."""
    heartbeat_grace: int = Field(600, ge=1)
    """A trial silent this long is FAIL and retried once with the same parameters; above heartbeat_interval."""
    storage_patience: int = Field(120, ge=0)
    """Seconds a storage call is retried through an outage (0 = no retry); past it the running trial ends FAIL
    with its checkpoint kept and a retry queued, once the storage answers again."""
    keep_weights: int | None = Field(None, ge=0)
    """Weights of COMPLETE trials outside the best K are deleted as the study runs (outputs are kept); default
    `[ensemble] top_k` + 3; 0 keeps all."""
    target: float | None = Field(None, gt=0, le=1)
    """Stop the study once a trial's metric reaches this (for loss: at or below): every worker, on any machine,
    after its current trial; `run` exits 0 and says so."""

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


DEFAULT_CALIBRATION_FRACTION = 0.1


class DataSection(Strict):
    dataset: Literal["digits", "cifar10", "cifar100", "imagefolder", "synthetic"] = "digits"
    """digits: scikit-learn's bundled 8x8 digits (offline); imagefolder: one folder per class under `root`."""
    root: str = "data"
    """Where CIFAR (downloaded there) or the image folder lives."""
    image_size: int = Field(32, ge=8, le=1024)
    """The model's input side; images are resized per batch on the device."""
    val_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the images held out for validation (stratified)."""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Share held out for test, for datasets without their own test split."""
    calibration_fraction: float | None = Field(None, ge=0, lt=1)
    """Share held out from training and from every choice the search makes (best epoch, pruning, ranking):
    `hpsearch ensemble` fits its weights and temperature and makes its choice on it, so they are judged on
    images nothing else was selected on. Default 0.1 with one train/val split, 0 with folds (the out-of-fold
    outputs serve); 0 = none: the ensemble fits on the validation outputs, and says so."""
    augment: list[Literal["crop", "flip", "cutout", "rrc"]] = Field(default_factory=lambda: ["crop"])
    """Training augmentations, run batched on the device; rrc = random resized crop (scale 0.25-1, aspect
    3/4-4/3) of the stored image; flip is refused for digits (a mirrored 2 is no 2)."""
    subset: int = Field(0, ge=0)
    """Use at most this many images (stratified), for smoke runs; 0 = all."""
    stored_size: int = Field(0, ge=0, le=2048)
    """imagefolder: the side images are decoded and cached at (0 = image_size; larger leaves room for rrc)."""
    bad_images: Literal["fail", "skip"] = "fail"
    """imagefolder: an unreadable file (a decompression bomb included) or a link out of `root` stops the study,
    named; skip leaves it out, listed in the study and counted by `status`."""
    cache_dir: str = ""
    """Where decoded images are cached ("" = `$HPSEARCH_CACHE_DIR` or `~/.cache/hpsearch/images`)."""
    placement: Literal["auto", "resident", "stream"] = "auto"
    """Where a worker's splits live: auto keeps them in GPU memory when they fit device_memory_fraction of it,
    else streams batches from the cache (on the CPU: gathered from the cache, no copy)."""
    device_memory_fraction: float = Field(0.5, gt=0, le=0.95)
    """auto on a GPU: resident when the splits fit this share of its free memory (shared by its workers)."""
    synthetic_size: int = Field(2000, ge=20)
    """synthetic only: how many images."""
    synthetic_classes: int = Field(10, ge=2)
    """synthetic only: how many classes."""
    folds: int = Field(0, ge=0)
    """K >= 2: a trial is judged by stratified K-fold cross-validation over train+val (the test split is in no
    fold); 0 = one train/val split."""

    @field_validator("folds")
    @classmethod
    def _check_folds(cls, folds: int) -> int:
        if folds == 1:
            raise ValueError("1 fold is no cross-validation; use folds = 2 or more, or 0 for one train/val split")
        return folds

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        if self.folds and self.calibration_fraction:
            raise ValueError("calibration_fraction: with folds the ensemble fits on the out-of-fold outputs; leave "
                             "calibration_fraction out or set folds = 0")
        if self.val_fraction + self.test_fraction + self.calibration_share >= 0.9:
            raise ValueError("val_fraction + test_fraction + calibration_fraction must leave at least 10% for "
                             "training")
        if self.stored_size and self.stored_size < self.image_size:
            raise ValueError(f"stored_size {self.stored_size} is below image_size {self.image_size}; store at "
                             "image_size or larger (0 means image_size)")
        return self

    @property
    def calibration_share(self) -> float:
        """The calibration part's share of the images, its default resolved (0.1 on one split, 0 with folds)."""
        if self.calibration_fraction is not None:
            return self.calibration_fraction
        return 0.0 if self.folds else DEFAULT_CALIBRATION_FRACTION

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


def known_arch(arch: str) -> str:
    """`arch` if it names a supported torchvision architecture or is written `timm:NAME`, else a ValueError."""
    name = timm_name(arch)
    if name is not None:
        # Whether the installed timm has it is asked of timm, later (model.check_study_model): config is
        # timm-free.
        if not re.fullmatch(TIMM_NAME, name):
            raise ValueError(f"{arch!r} is no timm model name: write timm:NAME with NAME as timm.list_models() "
                             "gives it (lowercase, no pretrained tag such as .in1k), e.g. timm:convnext_nano")
        return arch
    if family_of(arch) is None:
        families = ", ".join(FAMILIES)
        raise ValueError(
            f"unknown architecture {arch!r}; use a torchvision classification model of the families "
            f"{families} (e.g. resnet18, efficientnet_b0, convnext_tiny, vit_b_16)"
        )
    return arch


class ModelSection(Strict):
    arch: str = "resnet18"
    """A torchvision classification model of the families resnet/resnext/wide_resnet, regnet, mobilenet,
    efficientnet, convnext, densenet, vgg, vit, swin; or `timm:NAME`, any model of the installed timm
    (`pip install 'hpsearch[timm]'`; e.g. `timm:convnext_nano`, `timm:efficientnet_b0`) whose classifier is one
    Linear. Its head is replaced for the study's classes, the trial's dropout in front of it (for timm, where
    its drop_rate would act)."""
    weights: str = "none"
    """none | a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...) | a local .safetensors or .pt state-dict
    file (loaded with weights_only=True). timm models take none or a local file (e.g. a timm checkpoint's
    model.safetensors): hpsearch never downloads timm's pretrained weights."""
    freeze: Literal["none", "backbone"] = "none"
    """backbone: train only the new head (see `[train] unfreeze_epoch`)."""

    _known_arch = field_validator("arch")(lambda arch: known_arch(arch))

    @field_validator("weights")
    @classmethod
    def _timm_weights(cls, weights: str, info: ValidationInfo) -> str:
        # A field validator (arch comes first, so it is in info.data) so the error names model.weights.
        arch = info.data.get("arch", "")
        if timm_name(arch) is not None and weights.lower() != "none" and not looks_like_path(weights):
            raise ValueError(f"{weights!r} is no weights of {arch}: timm models start from none or a local "
                             ".safetensors/.pt state-dict file; hpsearch never downloads timm's pretrained weights "
                             "(download the model.safetensors yourself and give its path)")
        return weights

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
    """Epochs per trial (per fold with `[data] folds`)."""
    batch_size: int = Field(128, ge=1)
    """The training batch size; `[space] batch_size` searches it instead."""
    eval_batch_size: int = Field(512, ge=1)
    """The batch size of validation, test and `predict`."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: the GPU when there is one, else the CPU."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Of the training loss (validation loss is plain cross-entropy); `[space] label_smoothing` searches it."""
    lr_scaling: Literal["none", "linear"] = "none"
    """How lr follows a searched batch size: none, or linear (lr * batch size / base_batch_size); the trial
    records the searched lr."""
    base_batch_size: int = Field(0, ge=0)
    """The batch size the searched lr is for (0 = batch_size)."""
    unfreeze_epoch: int = Field(0, ge=0)
    """With `[model] freeze = "backbone"`: the backbone trains too from this epoch on (1-based: 3 = after two
    head-only epochs), at lr (the head at lr * head_lr_mult); 0 = never."""
    ema_decay: float = Field(0.999, gt=0, lt=1)
    """With `[space] ema`: the weights' moving average's decay per optimizer step (it averages about
    1 / (1 - ema_decay) steps: keep that well below a trial's steps)."""
    # A study file sets one of the two (parse_study); a recorded config holds both.
    checkpoint_every: int | None = Field(None, ge=0)
    """A resumable checkpoint every N epochs instead of by the minutes (0 = never: short trials restart cheaper
    than they save)."""
    checkpoint_minutes: float = Field(5.0, ge=0)
    """A resumable checkpoint at the first epoch end after every this many minutes of training (0 = every
    epoch), written while the next epoch trains: a retried trial continues from it instead of epoch 1."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on a GPU that has it, else fp16 with a gradient scaler; fp32 on the CPU. Stored outputs are
    fp32 either way."""
    # The first trial pays the compilation; a new dropout does not recompile.
    compile: bool = False
    """torch.compile once per worker, reused by later trials of the same architecture, image and batch size."""


class EnsembleSection(Strict):
    top_k: int = Field(5, ge=1)
    """Trials `hpsearch ensemble` combines by default (`--top-k` overrides)."""


class TrackingSection(Strict):
    # TensorBoard is an optional extra: off by default, so a plain install runs every study.
    # Strict (as every field): a study file's "yes" or "off" should not switch logging.
    tensorboard: bool = False
    """Each trial's scalars per epoch and its hyperparameters in TensorBoard (`pip install 'hpsearch[tensorboard]'`)."""
    log_dir: str = Field("runs", min_length=1)
    """Trials write `<log_dir>/<study>/trial-<n>`; relative to where `run` starts; workers on several machines
    need one shared absolute folder."""
