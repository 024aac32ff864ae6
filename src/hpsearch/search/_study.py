"""The study itself: its sampler and pruner, its creation (what it records) and the checks a resumed one passes.

Everything about a study that later stages rely on is recorded in it as user attrs (names in `hpsearch.keys`,
read back through `hpsearch.record`): the search-space fingerprint (a resumed study must keep its space), the
split's sha256 and sizes, the folds, the classes, the normalization its trials train with, the artifact
store's location, and the study file it was created from (a resumed study must keep it, but for RESUMABLE_KEYS).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from hpsearch import __version__, keys
from hpsearch.config import ConfigError, StudyConfig, StudySection
from hpsearch.data import RecordMismatch, StudyData, build_study_data, preprocess_for, rebuild_study_data
from hpsearch.errors import StudyRecordError
from hpsearch.model import build_model
from hpsearch.preprocess import Preprocess
from hpsearch.record import StudyRecord, read_study_record
from hpsearch.store import metric_name, redact, study_storage_name

# ------------------------------------------------------------------------------------- sampler, pruner


def make_sampler(cfg: StudySection, seed: int) -> optuna.samplers.BaseSampler:
    if cfg.sampler == "tpe":
        # group=True splits the conditional scheduler branches into their own joint spaces;
        # constant_liar keeps parallel workers from proposing the same point.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=min(10, max(3, cfg.n_trials // 4)))
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=min(10, max(3, cfg.n_trials // 4)))


def make_pruner(cfg: StudySection, epochs: int, folds: int = 0) -> optuna.pruners.BasePruner:
    """With folds, a trial's steps are its folds (step k: fold k's validation accuracy), not its epochs."""
    if cfg.pruner == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=cfg.pruner_p_threshold)
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                           n_warmup_steps=cfg.pruner_warmup_epochs)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=folds or epochs)
    return optuna.pruners.NopPruner()


def sampler_seed(study_seed: int, worker: int, existing_trials: int) -> int:
    """Distinct per worker and per resume, so no two samplers replay the same random startup points."""
    return int(np.random.SeedSequence([study_seed, worker, existing_trials]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------ the study


def prepare(cfg: StudyConfig) -> StudyData:
    """Load the data and check the model's weights once, before any trial exists."""
    prepared = build_study_data(cfg.data, cfg.study.seed)
    # Fails here (clear ConfigError), not in every trial, when weights cannot be loaded.
    build_model(cfg.model, prepared.pool.num_classes, cfg.data.image_size)
    return prepared


def open_study(cfg: StudyConfig, storage: optuna.storages.BaseStorage, prepared: StudyData,
               artifacts: str | Path, worker: int = 0) -> optuna.Study:
    """Create the study, or resume it if its search space, split and config (but for RESUMABLE_KEYS) are unchanged."""
    study = optuna.create_study(
        study_name=cfg.study.name, storage=storage, direction=cfg.study.direction,
        pruner=make_pruner(cfg.study, cfg.train.epochs, cfg.data.folds), load_if_exists=True,
    )
    record = read_study_record(study)
    if record.created_by_hpsearch:
        _scrub_recorded_password(study)
        _check_resume(cfg, storage, record, prepared)
    else:
        _record(cfg, study, prepared)
    if record.artifacts is None:
        study.set_user_attr(keys.ARTIFACTS, str(artifacts))
    study.set_metric_names([metric_name(cfg.study.metric)])  # what the dashboard and the report call the value
    existing = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(cfg.study, sampler_seed(cfg.study.seed, worker, existing))
    return study


def _record(cfg: StudyConfig, study: optuna.Study, prepared: StudyData) -> None:
    """What a new study records (hpsearch.record reads it back)."""
    study.set_user_attr(keys.SPACE_FINGERPRINT, cfg.space_fingerprint())
    study.set_user_attr(keys.SPACE, _space_json(cfg))
    study.set_user_attr(keys.SPLIT_SHA256, prepared.split.sha256())
    study.set_user_attr(keys.SPLIT_SIZES, prepared.split.sizes())
    if prepared.folds is not None:
        study.set_user_attr(keys.FOLDS_SHA256, prepared.folds.sha256())
        study.set_user_attr(keys.FOLD_SIZES, prepared.folds.sizes())
    study.set_user_attr(keys.CLASSES, prepared.pool.classes)
    if prepared.pool.skipped:
        study.set_user_attr(keys.SKIPPED_IMAGES, list(prepared.pool.skipped))
    study.set_user_attr(keys.CONFIG, cfg.model_dump(mode="json"))
    # The normalization every trial trains with, for exports (study_preprocess reads it back).
    pre = preprocess_for(prepared.pool, prepared.split, cfg.data, cfg.model.pretrained)
    study.set_user_attr(keys.PREPROCESS, pre.record())
    study.set_user_attr(keys.HPSEARCH_VERSION, __version__)


def _scrub_recorded_password(study: optuna.Study) -> None:
    """A study created before study files were refused a storage password may have recorded one (the dashboard
    shows study attributes to whoever reaches it): it is written over, redacted, the first time a run opens it."""
    recorded = study.user_attrs.get(keys.CONFIG)
    section = recorded.get("study") if isinstance(recorded, dict) else None
    url = section.get("storage") if isinstance(section, dict) else None
    if isinstance(url, str) and redact(url) != url:
        study.set_user_attr(keys.CONFIG, {**recorded, "study": {**section, "storage": redact(url)}})


def _space_json(cfg: StudyConfig) -> dict[str, Any]:
    return json.loads(json.dumps(cfg.space.fingerprint_data()))


def _space_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "space") -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _space_diff(a, b, f"{prefix}.{key}")
        elif a != b:
            changes.append(f"{prefix}.{key} {json.dumps(a)} -> {json.dumps(b)}")
    return changes


def _check_resume(cfg: StudyConfig, storage: optuna.storages.BaseStorage, record: StudyRecord,
                  prepared: StudyData) -> None:
    """A resumed study keeps its search space, its split, its folds and the rest of its config."""
    if record.space_fingerprint != cfg.space_fingerprint():
        changes = "; ".join(_space_diff(record.space or {}, _space_json(cfg))) or "space changed"
        raise ConfigError("space", f"differs from study {cfg.study.name!r} in {study_storage_name(storage)} "
                          f"({changes}); Optuna cannot mix the two spaces: give the study a new [study] name "
                          f"or delete it (optuna delete-study --study-name {cfg.study.name} --storage URL)",
                          cfg.source)
    # Folds first: turning them on or off also changes the split (a single split cuts a calibration part), and the
    # folds are what the user changed.
    _check_folds(cfg, record, prepared.folds.sha256() if prepared.folds is not None else None)
    if record.split_sha256 not in (None, prepared.split.sha256()):
        raise ConfigError("data", f"the split differs from the one study {cfg.study.name!r} recorded (the dataset, "
                          "subset, fractions or seed changed); trials' outputs would not line up: use a new "
                          "[study] name" + _calibration_hint(cfg, record), cfg.source)
    _check_config(cfg, record)


# Keys of the recorded config a resumed study may change: where it runs and how the run proceeds, never what a
# trial computes. Everything else (the data and its split, the model, the epochs, the batch size, ...) must match
# the file the study was created from, or the study's trials would mix two experiments.
RESUMABLE_KEYS = frozenset({
    "study.name",  # the same by construction: it is how the study was found
    "study.n_trials",  # the budget: a resume usually raises it
    "study.storage", "study.artifacts",  # locations: the study records its artifact store itself
    "study.target",  # when to stop, not what a trial computes
    "study.max_consecutive_failures", "study.keep_weights",  # how failures and old weights are handled
    "study.heartbeat_interval", "study.heartbeat_grace",  # liveness of running trials
    "study.storage_patience",  # how long a storage outage is ridden out
    # Which points are tried and which trials stop early; Optuna keeps neither with the study (each run passes
    # its own), and a finished trial's value does not depend on them.
    "study.sampler", "study.pruner", "study.pruner_startup_trials", "study.pruner_warmup_epochs",
    "study.pruner_p_threshold",
    "data.cache_dir", "data.placement", "data.device_memory_fraction",  # where decoded images live and are fed from
    # The machine and how it trains fast: `precision = "auto"` already differs by device, the evaluation batch
    # gives the same outputs, checkpoints only shorten a retry, compile only speeds it up.
    "train.device", "train.precision", "train.eval_batch_size", "train.checkpoint_every", "train.checkpoint_minutes",
    "train.compile",
    "space",  # checked by its fingerprint (_check_resume), which ignores branches no scheduler can choose
    "ensemble",  # read after the search, from the file given to `ensemble`/`status`
    "tracking",  # logging only
})


def config_change(recorded: dict[str, Any], new: dict[str, Any], prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first key (dotted, in the schema's order: [study], [data], [model], [train]) whose value differs
    between a recorded config and a new one, with the two values; None when they agree. Keys in RESUMABLE_KEYS,
    and keys only one side has (a study recorded by an hpsearch with other settings), are left out."""
    for key, new_value in new.items():
        dotted = f"{prefix}{key}"
        if dotted in RESUMABLE_KEYS or key not in recorded:
            continue
        old_value = recorded[key]
        if isinstance(old_value, dict) and isinstance(new_value, dict):
            change = config_change(old_value, new_value, f"{dotted}.")
            if change is not None:
                return change
        elif old_value != new_value:
            return dotted, old_value, new_value
    return None


def _check_config(cfg: StudyConfig, record: StudyRecord) -> None:
    """A resumed study keeps the config it was created with, but for RESUMABLE_KEYS (an older study that
    recorded none is resumed as before)."""
    if record.config is None:
        return
    change = config_change(record.config, cfg.model_dump(mode="json"))
    if change is not None:
        key, old, new = change
        where = f"{cfg.source}: " if cfg.source else ""
        raise StudyRecordError(f"{where}study {cfg.study.name!r} was created with {key} = {old!r}; this file says "
                               f"{new!r}: use another [study] name, or the original file")


def _calibration_hint(cfg: StudyConfig, record: StudyRecord) -> str:
    """A study recorded before splits had a calibration part resumes with none: say how."""
    recorded = record.split_sizes or {}
    if cfg.data.calibration_share and "calibration" not in recorded:
        return (f", or set [data] calibration_fraction = 0 (study {cfg.study.name!r} was made without a "
                "calibration part; its ensembles then fit on validation outputs)")
    return ""


def _check_folds(cfg: StudyConfig, record: StudyRecord, folds_sha: str | None) -> None:
    """A resumed study keeps its folds: the same K over the same images (or none, as it was created)."""
    if record.folds_sha256 == folds_sha:
        return
    if record.folds_sha256 is None:
        why = f"study {cfg.study.name!r} was created without folds, so its trials are single-split"
    elif folds_sha is None:
        why = f"study {cfg.study.name!r} was created with {record.n_folds} folds"
    else:
        why = f"the fold assignment differs from the one study {cfg.study.name!r} recorded (folds or seed changed)"
    raise ConfigError("data.folds", f"{why}; trials' folds would not line up: restore the setting or use a new "
                      "[study] name", cfg.source)


def study_preprocess(study: optuna.Study) -> Preprocess:
    """The Preprocess the study's trials trained with: recorded at creation, else recomputed from its config."""
    record = read_study_record(study)
    if record.preprocess:
        return Preprocess.of(**record.preprocess)
    cfg = StudyConfig.recorded(record.config, record.split_sizes)
    try:
        data = rebuild_study_data(record, cfg.data, cfg.study.seed)
    except RecordMismatch as err:
        raise StudyRecordError(f"study {study.study_name!r} records no preprocessing and its data no longer gives "
                               f"its {err.part}; cannot tell the normalization its trials used") from None
    return preprocess_for(data.pool, data.split, cfg.data, cfg.model.pretrained)
