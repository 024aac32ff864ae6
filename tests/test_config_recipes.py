"""The study file's fine-tuning keys: each off by default (every shipped study loads and means what it meant), the
metric and its direction, and one-line refusals naming the field."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hpsearch.config import ConfigError, SpaceSection, TrainSection, parse_study, read_study_file
from tests.test_config import REPO, STUDY_FILES, _hpsearch, assert_names, refusal

# The space fingerprints the shipped studies had before these keys existed: a study created from one of them must
# still resume (its recorded fingerprint is this) and search the same space.
FINGERPRINTS_BEFORE = {
    "cifar10-resnet18.toml": "72ca4ee9b4a87e69",
    "cifar100-resnet50.toml": "101152e9b130039a",
    "digits-cv.toml": "96cf734a53a1341c",
    "digits.toml": "96cf734a53a1341c",
    "imagefolder-example.toml": "9e4a6448814706dc",
}
NEW_SPACE_KEYS = ("warmup_epochs", "head_lr_mult", "label_smoothing", "batch_size", "mixing", "mix_alpha",
                  "augment_strength", "ema")


@pytest.mark.parametrize("name", sorted(FINGERPRINTS_BEFORE))
def test_a_study_file_from_before_keeps_its_meaning(name: str) -> None:
    cfg = read_study_file(next(p for p in STUDY_FILES if p.name == name))
    assert cfg.space_fingerprint() == FINGERPRINTS_BEFORE[name]
    assert all(getattr(cfg.space, key) is None for key in NEW_SPACE_KEYS)
    assert cfg.study.metric == "accuracy" and cfg.study.direction == "maximize"
    assert (cfg.train.lr_scaling, cfg.train.unfreeze_epoch) == ("none", 0)


# digits-recipes.toml's, from before mixing, mix_alpha, augment_strength and ema: its studies still resume.
RECIPES_FINGERPRINT = "5611cabadecb7075"
REGULARIZER_KEYS = ("mixing", "mix_alpha", "augment_strength", "ema")


def test_the_recipes_study_keeps_its_fingerprint_without_the_regularizers() -> None:
    cfg = read_study_file(next(p for p in STUDY_FILES if p.name == "digits-recipes.toml"))
    assert cfg.space_fingerprint() == RECIPES_FINGERPRINT
    assert all(getattr(cfg.space, key) is None for key in REGULARIZER_KEYS)
    assert not set(REGULARIZER_KEYS) & {p.name for p in cfg.space.parameters()}


def test_every_shipped_study_is_known_here_or_new() -> None:
    # A new study file either is one of those above or uses the new keys (and is checked by the tests below).
    for path in STUDY_FILES:
        assert path.name in FINGERPRINTS_BEFORE or path.name == "digits-recipes.toml", path.name


def test_the_new_keys_are_off_by_default() -> None:
    space, train = SpaceSection(), TrainSection()
    assert all(getattr(space, key) is None for key in NEW_SPACE_KEYS)
    assert "cosine" not in space.scheduler and "onecycle" not in space.scheduler
    assert (train.lr_scaling, train.base_batch_size, train.unfreeze_epoch, train.label_smoothing) == ("none", 0, 0, 0)
    assert not set(NEW_SPACE_KEYS) & set(space.fingerprint_data()) and "cosine" not in space.fingerprint_data()
    assert not set(NEW_SPACE_KEYS) & {p.name for p in space.parameters()}


def _space(**values: Any) -> str:
    base: dict[str, Any] = {"lr": [1e-4, 1e-2], "optimizer": ["adam"], "scheduler": ["cosine", "onecycle"]}
    cfg = parse_study({"study": {"name": "fp"}, "train": {"epochs": 4}, "space": {**base, **values}})
    return cfg.space_fingerprint()


@pytest.mark.parametrize("values", [
    {"warmup_epochs": [0.0, 1.0]}, {"head_lr_mult": [1.0, 10.0]}, {"label_smoothing": [0.0, 0.2]},
    {"batch_size": [32, 64]}, {"cosine": {"min_ratio": [0.01, 0.1]}}, {"onecycle": {"div_factor": [5, 50]}},
    {"mixing": ["none", "mixup"]}, {"augment_strength": [0.0, 1.0]}, {"ema": [False, True]},
])
def test_each_new_range_is_part_of_the_fingerprint(values: dict[str, Any]) -> None:
    assert _space(**values) != _space()


def test_mixings_choices_and_alpha_are_part_of_the_fingerprint() -> None:
    mixing = {"mixing": ["none", "mixup", "cutmix"]}
    prints = {_space(**mixing), _space(mixing=["mixup", "cutmix"]), _space(**mixing, mix_alpha=[0.2, 1.0]),
              _space(**mixing, mix_alpha=[0.2, 0.4])}
    assert len(prints) == 4


def test_the_regularizers_are_optuna_parameters_in_every_trial() -> None:
    cfg = parse_study({"study": {"name": "r"}, "space": {"mixing": ["none", "mixup", "cutmix"], "mix_alpha": [0.2, 1],
                                                          "augment_strength": [0, 0.5], "ema": [False, True]}})
    params = {p.name: p for p in cfg.space.parameters()}
    assert (params["mixing"].kind, params["mixing"].choices) == ("choice", ("none", "mixup", "cutmix"))
    assert (params["mix_alpha"].kind, params["mix_alpha"].low, params["mix_alpha"].high) == ("float", 0.2, 1.0)
    assert (params["augment_strength"].low, params["augment_strength"].high, params["augment_strength"].log) == (
        0.0, 0.5, False)
    assert params["ema"].choices == (False, True)
    assert all(params[name].when is None for name in ("mixing", "mix_alpha", "augment_strength", "ema"))


@pytest.mark.parametrize(("study", "direction"), [
    ({}, "maximize"), ({"metric": "balanced_accuracy"}, "maximize"), ({"metric": "macro_f1"}, "maximize"),
    ({"metric": "loss"}, "minimize"), ({"metric": "loss", "direction": "minimize"}, "minimize"),
])
def test_the_direction_follows_the_metric(study: dict[str, Any], direction: str) -> None:
    assert parse_study({"study": {"name": "m", **study}}).study.direction == direction


RECIPE_REFUSALS: list[tuple[str, dict[str, dict[str, Any]], str, tuple[str, ...]]] = [
    ("direction-against-metric", {"study": {"metric": "loss", "direction": "maximize"}}, "study.direction",
     ("'maximize'", "'loss'", "minimize", "leave direction out")),
    ("unknown-metric", {"study": {"metric": "auc"}}, "study.metric",
     ("'auc'", "accuracy", "balanced_accuracy", "macro_f1", "loss")),
    ("warmup-negative", {"space": {"warmup_epochs": [-1, 1]}}, "space.warmup_epochs", (">= 0",)),
    ("warmup-past-the-run", {"space": {"warmup_epochs": [0, 1]}}, "space.warmup_epochs", ("below [train] epochs",)),
    ("head-mult-zero", {"space": {"head_lr_mult": [0, 10]}}, "space.head_lr_mult", ("log scale", "> 0")),
    ("smoothing-one", {"space": {"label_smoothing": [0.0, 1.0]}}, "space.label_smoothing", ("[0, 1)",)),
    ("batch-size-range", {"space": {"batch_size": 64}}, "space.batch_size", ("list of positive integers",)),
    ("batch-size-zero", {"space": {"batch_size": [0, 32]}}, "space.batch_size", ("positive integers",)),
    ("batch-size-twice", {"space": {"batch_size": [32, 32]}}, "space.batch_size", ("twice",)),
    ("unknown-mixing", {"space": {"mixing": ["none", "mixmatch"]}}, "space.mixing",
     ("'mixmatch'", "'none'", "'mixup'", "'cutmix'")),
    ("mixing-empty", {"space": {"mixing": []}}, "space.mixing", ("at least one choice",)),
    ("mix-alpha-without-mixing", {"space": {"mix_alpha": [0.2, 1.0]}}, "space.mix_alpha",
     ("mixing", "mixup", "cutmix")),
    ("mix-alpha-with-none-only", {"space": {"mixing": ["none"], "mix_alpha": [0.2, 1.0]}}, "space.mix_alpha",
     ("offers neither",)),
    ("mix-alpha-zero", {"space": {"mixing": ["mixup"], "mix_alpha": [0, 1]}}, "space.mix_alpha", ("> 0",)),
    ("strength-above-one", {"space": {"augment_strength": [0, 2]}}, "space.augment_strength", ("[0, 1]",)),
    ("strength-a-number", {"space": {"augment_strength": 0.5}}, "space.augment_strength", ("[low, high]",)),
    ("ema-a-bool", {"space": {"ema": True}}, "space.ema", ("a list", "[false, true]")),
    ("ema-a-word", {"space": {"ema": ["on", "off"]}}, "space.ema", ("true or false",)),
    ("ema-decay-one", {"train": {"ema_decay": 1.0}}, "train.ema_decay", ("less than 1",)),
    ("unknown-lr-scaling", {"train": {"lr_scaling": "sqrt"}}, "train.lr_scaling", ("'sqrt'", "none", "linear")),
    ("lr-scaling-without-batch", {"train": {"lr_scaling": "linear"}}, "train.lr_scaling",
     ("batch_size", "none")),
    ("unfreeze-unfrozen", {"train": {"unfreeze_epoch": 1}}, "train.unfreeze_epoch", ("freeze", "backbone")),
    ("unfreeze-after-the-run", {"model": {"freeze": "backbone"}, "train": {"unfreeze_epoch": 3}},
     "train.unfreeze_epoch", ("after the last epoch",)),
]


@pytest.mark.parametrize(("overrides", "field", "allowed"), [r[1:] for r in RECIPE_REFUSALS],
                         ids=[r[0] for r in RECIPE_REFUSALS])
def test_recipe_refusal_names_the_field_and_the_fix(
    study_file: Callable[..., Path], overrides: dict[str, dict[str, Any]], field: str, allowed: tuple[str, ...]
) -> None:
    # The tiny study trains 1 epoch.
    err = refusal(lambda: read_study_file(study_file(**overrides)))
    assert_names(err, field, *allowed)
    assert isinstance(err, ConfigError)


# ------------------------------------------------------------------------------- digits-recipes.toml


RECIPES = next(p for p in STUDY_FILES if p.name == "digits-recipes.toml")


def test_the_recipes_study_searches_what_it_says() -> None:
    cfg = read_study_file(RECIPES)
    assert cfg.study.metric != "accuracy" and cfg.study.direction == "maximize"
    assert set(cfg.space.scheduler) <= {"cosine", "onecycle"}
    names = {p.name for p in cfg.space.parameters()}
    assert {"warmup_epochs", "weight_decay", "label_smoothing", "batch_size", "head_lr_mult"} <= names


def test_check_prints_the_resolved_space_of_the_recipes_study() -> None:
    proc = _hpsearch("check", str(RECIPES.relative_to(REPO)), "--storage", "sqlite:///unused.db")
    assert proc.returncode == 0, proc.stderr
    cfg = read_study_file(RECIPES)
    text = proc.stdout
    assert f"objective: val_{cfg.study.metric} (maximize)" in text
    space = text.split("search space")[1].splitlines()[1:]
    lines = {line.split()[0]: line for line in space if line.startswith("  ")}
    assert list(lines) == [p.name for p in cfg.space.parameters()]
    low, high = cfg.space.warmup_epochs or (None, None)
    assert f"uniform [{low:g}, {high:g}]" in lines["warmup_epochs"]
    assert f"one of {cfg.space.batch_size}" in lines["batch_size"]
    assert "(scheduler = cosine)" in lines["cosine_min_ratio"]
    assert f"lr * batch_size / {cfg.train.base_batch_size}" in text
    assert not (REPO / "unused.db").exists()


def test_check_prints_the_regularizers(study_file: Callable[..., Path]) -> None:
    path = study_file(space={"mixing": ["none", "cutmix"], "mix_alpha": [0.2, 1.0], "augment_strength": [0.0, 0.6],
                             "ema": [False, True]}, train={"ema_decay": 0.99})
    proc = _hpsearch("check", str(path), "--storage", "sqlite:///unused.db", cwd=path.parent)
    assert proc.returncode == 0, proc.stderr
    space = proc.stdout.split("search space")[1].splitlines()[1:]
    lines = {line.split()[0]: line for line in space if line.startswith("  ")}
    assert "one of ['none', 'cutmix']" in lines["mixing"]
    assert "uniform [0.2, 1]" in lines["mix_alpha"] and "uniform [0, 0.6]" in lines["augment_strength"]
    assert "one of [False, True]" in lines["ema"]
    assert list(lines)[:4] == ["lr", "optimizer", "scheduler", "dropout"]


def test_check_json_holds_the_objective_and_the_space() -> None:
    proc = _hpsearch("check", str(RECIPES.relative_to(REPO)), "--json", "--storage", "sqlite:///unused.db")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    cfg = read_study_file(RECIPES)
    assert (data["objective"], data["direction"]) == (f"val_{cfg.study.metric}", cfg.study.direction)
    assert [p["name"] for p in data["search_space"]] == [p.name for p in cfg.space.parameters()]
