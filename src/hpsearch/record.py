"""What a study and its trials record, read once and typed: `StudyRecord` and `TrialRecord`.

`hpsearch.keys` names the attrs and the modules that write them use those names; every reader goes through
this module instead of `user_attrs.get(...)`, so what a missing or older attr means is decided once. A field is
None where the study or trial does not record it (a study created by an older hpsearch, or not by hpsearch, a
trial that has not got that far); `require_*` turns a missing one a caller cannot do without into a
StudyRecordError naming the attr. Imports neither torch nor Optuna: both read a `Mapping` of user attrs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from hpsearch import keys
from hpsearch.errors import StudyRecordError

_T = TypeVar("_T")


class RecordedStudy(Protocol):
    """A study (Optuna's Study and FrozenStudy both qualify)."""

    @property
    def study_name(self) -> str: ...

    @property
    def user_attrs(self) -> dict[str, Any]: ...


class RecordedTrial(Protocol):
    """A trial (Optuna's Trial and FrozenTrial both qualify)."""

    @property
    def user_attrs(self) -> dict[str, Any]: ...


def _text(value: Any) -> str | None:
    return str(value) if value else None


def _mapping(value: Any) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, Mapping) else None


def _recorded_config(value: Any) -> dict[str, Any] | None:
    """The recorded config without `[study] storage`: where the study lives is where it was read from, and a
    study created before the study file refused a password in it may have recorded one (which its re-validation
    would now refuse)."""
    config = _mapping(value)
    if config is not None and isinstance(config.get("study"), Mapping):
        config["study"] = {k: v for k, v in config["study"].items() if k != "storage"}
    return config


# ------------------------------------------------------------------------------------------------ a study


@dataclass(frozen=True)
class StudyRecord:
    """What `hpsearch run` recorded when it created the study (search.open_study writes it)."""

    study_name: str
    space_fingerprint: str | None  # a resumed study must keep its search space ...
    space: dict[str, Any] | None  # ... and this one names what changed
    split_sha256: str | None  # the split every trial's outputs line up with
    split_sizes: dict[str, int] | None  # {"train", "val", "test"[, "calibration"]}: images in each part
    folds_sha256: str | None  # [data] folds: the fold assignment every trial's folds line up with
    fold_sizes: tuple[int, ...] | None
    classes: tuple[str, ...] | None
    skipped_images: tuple[str, ...]  # unreadable files left out ([data] bad_images = "skip")
    config: dict[str, Any] | None  # the study file it was created from, as JSON
    preprocess: dict[str, Any] | None  # image_size, mean, std, interpolation: Preprocess.of(**preprocess)
    hpsearch_version: str | None
    artifacts: str | None  # the artifact store: a folder or s3://bucket/prefix

    @classmethod
    def of(cls, attrs: Mapping[str, Any], study_name: str = "") -> StudyRecord:
        sizes, fold_sizes, classes = attrs.get(keys.SPLIT_SIZES), attrs.get(keys.FOLD_SIZES), attrs.get(keys.CLASSES)
        return cls(
            study_name=study_name,
            space_fingerprint=_text(attrs.get(keys.SPACE_FINGERPRINT)),
            space=_mapping(attrs.get(keys.SPACE)),
            split_sha256=_text(attrs.get(keys.SPLIT_SHA256)),
            split_sizes={str(k): int(v) for k, v in sizes.items()} if isinstance(sizes, Mapping) else None,
            folds_sha256=_text(attrs.get(keys.FOLDS_SHA256)),
            fold_sizes=tuple(int(n) for n in fold_sizes) if isinstance(fold_sizes, list) else None,
            classes=tuple(str(c) for c in classes) if isinstance(classes, list) else None,
            skipped_images=tuple(str(s) for s in attrs.get(keys.SKIPPED_IMAGES) or ()),
            config=_recorded_config(attrs.get(keys.CONFIG)),
            preprocess=_mapping(attrs.get(keys.PREPROCESS)) or None,
            hpsearch_version=_text(attrs.get(keys.HPSEARCH_VERSION)),
            artifacts=_text(attrs.get(keys.ARTIFACTS)),
        )

    @property
    def created_by_hpsearch(self) -> bool:
        """Whether `hpsearch run` has recorded this study yet (a study just made by create_study has not)."""
        return self.space_fingerprint is not None

    @property
    def n_folds(self) -> int:
        """K of a cross-validated study, 0 for a single-split one."""
        return len(self.fold_sizes or ())

    @property
    def class_names(self) -> list[str]:
        """The classes, [] where none are recorded."""
        return list(self.classes or ())

    def config_value(self, section: str, key: str, default: Any = None) -> Any:
        """One recorded config value, e.g. config_value("model", "arch"), or `default` when not recorded."""
        return (self.config or {}).get(section, {}).get(key, default)

    def require_split_sha256(self) -> str:
        return self._require(self.split_sha256, keys.SPLIT_SHA256)

    def require_config(self, why: str = "it was not created by hpsearch") -> dict[str, Any]:
        return self._require(self.config, keys.CONFIG, why)

    def _require(self, value: _T | None, attr: str, why: str = "it was not created by hpsearch") -> _T:
        if value is None:
            raise StudyRecordError(f"study {self.study_name!r} records no {attr}; {why}")
        return value


def read_study_record(study: RecordedStudy) -> StudyRecord:
    """The record of an Optuna study (read from storage once: a snapshot)."""
    return StudyRecord.of(study.user_attrs, study.study_name)


# ------------------------------------------------------------------------------------------------ a trial


@dataclass(frozen=True)
class TrialRecord:
    """What a trial records: who ran it, from what, how it ended, and where its artifacts are."""

    worker: str | None  # host:pid, then " slurm JOB_TASK" when SLURM started it
    seed: int | None
    device: str | None
    gpu: dict[str, Any] | None  # {"index", "name", "uuid", "memory_mib", "visible"}
    peak_gpu_mib: float | None
    init_weights: str | None  # none, a weights enum, or a file's sha256
    resumed_from: dict[str, Any] | None  # {"trial", "epochs_done"[, "folds_done"]}
    pruned_reason: str | None
    fail_reason: str | None
    out_of_memory: bool
    device_broken: bool
    interrupted: bool
    store_full: bool
    storage_lost: bool
    weights: str | None  # artifact ids
    outputs: str | None
    checkpoint: str | None
    checkpoint_fold: int | None
    folds: tuple[dict[str, Any], ...]  # a cross-validated trial's finished folds, fold 0 first
    fold_val_accuracy: tuple[float, ...] | None
    best_epoch: int | None  # 0-based

    @classmethod
    def of(cls, attrs: Mapping[str, Any]) -> TrialRecord:
        seed, peak, fold, best = (attrs.get(k) for k in (keys.SEED, keys.PEAK_GPU_MIB, keys.CHECKPOINT_FOLD,
                                                           keys.BEST_EPOCH))
        folds = attrs.get(keys.FOLDS)
        accuracies = attrs.get(keys.FOLD_VAL_ACCURACY)
        return cls(
            worker=_text(attrs.get(keys.WORKER)), seed=int(seed) if seed is not None else None,
            device=_text(attrs.get(keys.DEVICE)), gpu=_mapping(attrs.get(keys.GPU)) or None,
            peak_gpu_mib=float(peak) if peak is not None else None, init_weights=_text(attrs.get(keys.INIT_WEIGHTS)),
            resumed_from=_mapping(attrs.get(keys.RESUMED_FROM)) or None,
            pruned_reason=_text(attrs.get(keys.PRUNED_REASON)), fail_reason=_text(attrs.get(keys.FAIL_REASON)),
            out_of_memory=bool(attrs.get(keys.OUT_OF_MEMORY)), device_broken=bool(attrs.get(keys.DEVICE_BROKEN)),
            interrupted=bool(attrs.get(keys.INTERRUPTED)), store_full=bool(attrs.get(keys.STORE_FULL)),
            storage_lost=bool(attrs.get(keys.STORAGE_LOST)),
            weights=_text(attrs.get(keys.WEIGHTS)), outputs=_text(attrs.get(keys.OUTPUTS)),
            checkpoint=_text(attrs.get(keys.CHECKPOINT)), checkpoint_fold=int(fold) if fold is not None else None,
            folds=tuple(sorted((dict(r) for r in folds), key=lambda r: int(r["fold"])))
            if isinstance(folds, list) else (),
            fold_val_accuracy=tuple(float(v) for v in accuracies) if isinstance(accuracies, list) else None,
            best_epoch=best if isinstance(best, int) else None,
        )


def read_trial_record(trial: RecordedTrial) -> TrialRecord:
    """The record of an Optuna trial (a live Trial's attrs are read from storage: a snapshot)."""
    return TrialRecord.of(trial.user_attrs)
