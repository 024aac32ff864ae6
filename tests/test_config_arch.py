"""`[space] arch`: a choice of architectures drawn per trial. Off by default (a study file without it keeps its
fingerprint), part of the fingerprint when given, the first Optuna parameter `check` prints, and refusals of one
line naming space.arch: an unknown name, weights the listed models cannot all take, an image size one of them
cannot take. A trial's model settings follow its drawn `arch`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hpsearch.archs import trial_arch
from hpsearch.cli._main import main
from hpsearch.config import SpaceSection, parse_study
from hpsearch.model import check_study_model
from tests.test_config import assert_names, refusal
from tests.test_config_recipes import _space

ARCHS = ["resnet18", "mobilenet_v3_small", "timm:test_convnext"]


def _study(space: dict[str, Any] | None = None, **tables: dict[str, Any]) -> dict[str, Any]:
    return {"study": {"name": "archs"}, "space": {"arch": ARCHS, **(space or {})}, **tables}


def test_arch_is_off_by_default_and_keeps_the_fingerprint() -> None:
    assert SpaceSection().arch is None
    assert "arch" not in SpaceSection().fingerprint_data()
    assert "arch" not in {p.name for p in SpaceSection().parameters()}
    assert parse_study({"study": {"name": "a"}}).searched_archs is None


def test_arch_is_a_choice_drawn_first_and_part_of_the_fingerprint() -> None:
    cfg = parse_study(_study())
    assert cfg.searched_archs == tuple(ARCHS)
    first = cfg.space.parameters()[0]
    assert (first.name, first.kind, first.choices, first.when) == ("arch", "choice", tuple(ARCHS), None)
    assert cfg.space.fingerprint_data()["arch"] == ARCHS
    assert _space(arch=ARCHS) != _space() and _space(arch=ARCHS) != _space(arch=ARCHS[:2])


def test_a_trial_trains_the_arch_it_drew_with_the_study_weights() -> None:
    cfg = parse_study(_study(model={"arch": "resnet34", "freeze": "backbone"}))
    model = cfg.trial_model({"arch": "timm:test_convnext", "lr": 0.1})
    assert (model.arch, model.weights, model.freeze) == ("timm:test_convnext", "none", "backbone")
    assert cfg.trial_model({"lr": 0.1}) is cfg.model  # a trial of a study without [space] arch
    assert trial_arch("resnet34", {"arch": "resnet18"}) == "resnet18" and trial_arch("resnet34", {}) == "resnet34"


@pytest.mark.parametrize(("space", "model", "words"), [
    ({"arch": []}, {}, ["at least one"]),
    ({"arch": ["resnet18", "resnet18"]}, {}, ["twice"]),
    ({"arch": ["resnet18", "resnet_18"]}, {}, ["'resnet_18'", "efficientnet_b0"]),
    ({"arch": ["timm:ConvNext"]}, {}, ["timm model name"]),
    ({"arch": "resnet18"}, {}, ["a list", "[model] arch"]),
    ({"arch": ["resnet18", "timm:test_convnext"]}, {"weights": "DEFAULT"}, ["'timm:test_convnext'", "none"]),
])
def test_bad_archs_are_refused_in_one_line_naming_space_arch(space: dict[str, Any], model: dict[str, Any],
                                                             words: list[str]) -> None:
    err = refusal(lambda: parse_study({"study": {"name": "a"}, "model": model, "space": space}))
    assert_names(err, "space.arch", *words)


def test_a_local_weights_file_fits_one_arch_and_refuses_the_choice(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    err = refusal(lambda: parse_study(_study(model={"weights": str(weights)})))
    assert_names(err, "space.arch", "local file", "[model] arch")


@pytest.mark.parametrize(("archs", "tables", "words"), [
    # resnet18 has no IMAGENET1K_V2 weights (resnet50 has): each listed model is asked, not only [model] arch.
    (["resnet50", "resnet18"], {"model": {"weights": "IMAGENET1K_V2"}}, ["'IMAGENET1K_V2'", "resnet18"]),
    (["resnet18", "vit_b_16"], {"data": {"image_size": 40}}, ["vit_b_16", "patch size 16"]),
    (["resnet18", "timm:no_such_model_here"], {}, ["no_such_model_here", "timm.list_models"]),
])
def test_every_listed_arch_is_checked_up_front(archs: list[str], tables: dict[str, Any],
                                               words: list[str]) -> None:
    cfg = parse_study({"study": {"name": "a"}, "space": {"arch": archs}, **tables}, "s.toml")
    err = refusal(lambda: check_study_model(cfg))
    assert_names(err, "space.arch", *words)
    assert err.source == "s.toml"


def test_listed_archs_that_fit_pass_the_check_whatever_model_arch_is() -> None:
    # [model] arch (vit_b_16 cannot take 40 px) is not what the trials train.
    check_study_model(parse_study(_study(model={"arch": "vit_b_16"}, data={"image_size": 40})))
    check_study_model(parse_study({"study": {"name": "a"}, "model": {"weights": "DEFAULT"},
                                   "space": {"arch": ["resnet18", "efficientnet_b0"]}}))


def test_check_prints_the_arch_parameter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.toml"
    path.write_text('[study]\nname = "a"\n[space]\narch = ["resnet18", "timm:test_convnext"]\n')
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "arch" in out and "one of ['resnet18', 'timm:test_convnext']" in out



def test_the_run_banner_names_the_searched_archs(capsys: pytest.CaptureFixture[str]) -> None:
    from argparse import Namespace

    from hpsearch.cli._run import _banner

    for space, words in (({"arch": ARCHS}, " | ".join(ARCHS) + " on digits"), ({}, "resnet18 on digits")):
        cfg = parse_study({"study": {"name": "a"}, "space": space})
        _banner(Namespace(workers=1), cfg, "sqlite:///x.db", 0, 20, "(split)", "cpu", "artifacts")
        assert words in capsys.readouterr().err.replace("\n", " ")  # the console writes to stderr
