"""timm members of an export (`arch = "timm:NAME"`): what hpsearch writes for them passes the loader's checks, and a
crafted manifest naming a timm model the installed timm lacks (or asking timm for anything hpsearch never writes)
is refused in one line before any model is built. Members are built with pretrained=False, always."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hpsearch import load_ensemble
from hpsearch.cli._main import main
from hpsearch.errors import ExportError
from hpsearch.predict._load import MANIFEST
from tests.predict.test_predict import crafted_export
from tests.support import Exported

timm = pytest.importorskip("timm")


def _timm_member(arch: str, builder_kwargs: object) -> Callable[[dict[str, Any]], object]:
    return lambda m: m["members"][0].update(arch=arch, builder_kwargs=builder_kwargs)


@pytest.mark.parametrize(("change", "field", "words"), [
    (_timm_member("timm:no_such_model", {}), "members[0].arch", "not a model of the installed timm"),
    (_timm_member("timm:../../etc/passwd", {}), "members[0].arch", "not a model of the installed timm"),
    # A pretrained tag names weights timm would download: hpsearch never writes one.
    (_timm_member("timm:resnet10t.a1_in1k", {}), "members[0].arch", "not a model of the installed timm"),
    (_timm_member("timm:test_convnext", {"pretrained": True}), "members[0].builder_kwargs", "none"),
    (_timm_member("timm:test_convnext", {"pretrained_cfg_overlay": {"file": "/x"}}), "members[0].builder_kwargs",
     "none"),
    (_timm_member("timm:test_vit", {}), "members[0].builder_kwargs", "img_size"),  # its fixed size is written
    (_timm_member("timm:test_vit", {"img_size": 10**6}), "members[0].builder_kwargs.img_size", "image size"),
    (_timm_member("timm:test_convnext", ["pretrained"]), "members[0].builder_kwargs", "none"),
])
def test_a_crafted_timm_member_never_reaches_a_builder(
        exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        change: Callable[[dict[str, Any]], object], field: str, words: str) -> None:
    from torchvision import models

    folder = crafted_export(exported, tmp_path, change)
    built: list[str] = []
    monkeypatch.setattr(models, "get_model", lambda name, **kw: built.append(name))
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: built.append(name))
    with pytest.raises(ExportError) as refused:
        load_ensemble(folder)
    message = str(refused.value)
    assert "\n" not in message and f"{MANIFEST}: {field} " in message and words in message, message
    assert main(["predict", str(folder), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err
    assert built == []


def test_a_timm_member_without_timm_installed_says_how_to_install_it(
        exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = crafted_export(exported, tmp_path, _timm_member("timm:test_convnext", {}))
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ExportError) as refused:
        load_ensemble(folder)
    message = str(refused.value)
    assert "\n" not in message and "members[0].arch" in message and "pip install 'hpsearch[timm]'" in message


def test_what_hpsearch_writes_for_timm_members_passes_the_member_checks(exported: Exported) -> None:
    from hpsearch.model import builder_kwargs
    from hpsearch.predict._load import check_members

    manifest = json.loads((exported.folder / MANIFEST).read_text())
    for arch in ("timm:test_convnext", "timm:test_vit", "timm:resnet10t", "timm:efficientnet_b0"):
        manifest["members"][0].update(arch=arch, builder_kwargs=builder_kwargs(arch, 32))
        check_members(exported.folder, manifest)


def test_timm_members_are_built_without_pretrained_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpsearch.predict import plain_model

    seen: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: seen.append((name, kw)))
    plain_model("timm:test_vit", 3, {"img_size": 32})
    assert seen == [("test_vit", {"pretrained": False, "num_classes": 3, "img_size": 32})]
