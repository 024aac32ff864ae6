"""Reading a study file: TOML to a validated `StudyConfig`, the checks that span tables or look outside the file,
and pydantic's errors turned into one `ConfigError` line naming the field and the fix."""

from __future__ import annotations

import importlib.util
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from hpsearch.archs import resolve_path, timm_name
from hpsearch.config._study import StudyConfig
from hpsearch.errors import ConfigError


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
    if kind == "bool_type":
        return f"must be true or false (unquoted), got {error['input']!r}"
    message = str(error["msg"])
    if kind in ("int_type", "float_type") and isinstance(error["input"], str):
        # Strict types (config._sections.Strict): a quoted number is a string, not a number.
        quoted = _is_number(error["input"])
        return f"{message}, got the string {error['input']!r}" + ("; write it without quotes" if quoted else "")
    return message.removeprefix("Value error, ")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_study(data: dict[str, Any], source: str | Path | None = None) -> StudyConfig:
    _check_one_checkpoint_rule(data, source)
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(_field_path(first["loc"]), _message(first), source) from None
    _check_weights_file(config, source)
    _check_pruner_folds(config, source)
    _check_recipes(config, source)
    _check_space_arch(config, source)
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


def _check_recipes(config: StudyConfig, source: str | Path | None) -> None:
    """The fine-tuning options that span [space], [train] and [model]."""
    train, space = config.train, config.space
    if train.unfreeze_epoch and config.model.freeze != "backbone":
        raise ConfigError("train.unfreeze_epoch", "unfreezes a frozen backbone, but [model] freeze is "
                          f"{config.model.freeze!r}; set freeze = \"backbone\" or unfreeze_epoch = 0", source)
    if train.unfreeze_epoch > train.epochs:
        raise ConfigError("train.unfreeze_epoch", f"{train.unfreeze_epoch} is after the last epoch "
                          f"({train.epochs}); use 2..{train.epochs}, or 0 for never", source)
    if space.warmup_epochs is not None and space.warmup_epochs[1] >= train.epochs:
        raise ConfigError("space.warmup_epochs", f"reaches {space.warmup_epochs[1]} epochs of a {train.epochs}-"
                          "epoch trial; keep its high below [train] epochs", source)
    if train.lr_scaling != "none" and space.batch_size is None and not train.base_batch_size:
        raise ConfigError("train.lr_scaling", f"{train.lr_scaling!r} scales lr with a searched batch size, but "
                          "[space] has no batch_size; add batch_size = [..] there or set lr_scaling = \"none\"",
                          source)


def _check_space_arch(config: StudyConfig, source: str | Path | None) -> None:
    """`[space] arch`: every listed architecture takes `[model] weights` (whether a torchvision one has that
    weights name is asked of torchvision, in model.check_study_model)."""
    archs, model = config.space.arch, config.model
    if archs is None:
        return
    if model.weights_kind == "file":
        raise ConfigError("space.arch", f"searches {len(archs)} architecture(s), but [model] weights is the local "
                          f"file {model.weights!r}, which fits one; leave [space] arch out and set [model] arch, or "
                          "start from weights = \"none\" or a torchvision weights name", source)
    timm = [a for a in archs if timm_name(a) is not None]
    if model.weights_kind == "torchvision" and timm:
        raise ConfigError("space.arch", f"{timm[0]!r} is a timm model, which never starts from torchvision weights "
                          f"({model.weights!r}); list torchvision models only, or set [model] weights = \"none\"",
                          source)


def _check_tracking_installed(config: StudyConfig, source: str | Path | None) -> None:
    # Here, not in a validator: a recorded config re-validated by `ensemble` or `report` needs no TensorBoard.
    # find_spec imports nothing (this module stays free of torch and tensorboard).
    if config.tracking.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tracking.tensorboard", "[tracking] tensorboard = true needs the tensorboard package, "
                          "which is not installed; run `pip install -e '.[tensorboard]'` or set it to false", source)




def read_study_file(path: str | Path, overrides: Sequence[str] = ()) -> StudyConfig:
    """The study file, with `overrides` (`--set section.key=value`) applied over it before it is validated: an
    override is checked as the file is, and what the study records is the result."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("study file", f"{str(path)!r} does not exist; pass a studies/*.toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("(file)", f"is not valid TOML: {err}", path) from None
    except UnicodeDecodeError:
        raise ConfigError("(file)", "is not UTF-8 text; save it as UTF-8 TOML", path) from None
    for override in overrides:
        _apply_override(data, override)
    try:
        return parse_study(data, path)
    except ConfigError as err:  # a bad value given by --set is named as the user typed it, not as the file's
        given = next((o for o in overrides if o.partition("=")[0].strip() == err.field), None)
        if given is None:
            raise
        raise ConfigError(f"--set {given}", err.message) from None


def _apply_override(data: dict[str, Any], override: str) -> None:
    """`section.key=value` (or `space.step.step_size=[1, 4]`) set in the file's tables; the value is read as a
    TOML value (3, 1e-3, true, ["crop"], "x"), or taken as a string when it is none (`model.arch=resnet34`)."""
    key, sep, text = override.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {override}", "write it as section.key=value, e.g. --set train.epochs=3")
    try:
        value = tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    table = data
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {override}", f"{part!r} is a value, not a table, in the study file")
    table[parts[-1]] = value
