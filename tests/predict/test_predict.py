"""Loading an export and the `predict`/`select` commands: `load_ensemble` against an in-process computation, its
strategies, its refusal of a damaged or escaping folder; `predict` on image files and `select` ranking by
uncertainty; a hard-voting module breaking ties as the report counted them.

The export is the `exported` fixture (conftest.py, tests/support/_exports.py: build_export): a real study on real
digits, not trained, each member a randomly initialised ResNet-18 whose head is fitted in closed form.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import hpsearch
from hpsearch.cli._main import main
from hpsearch.errors import ExitCode, ExportError
from hpsearch.predict import MANIFEST, SUMS, Ensemble, csv_text, load_ensemble, sha256_file
from hpsearch.predict._score import BY, entropy, select_csv, uncertainty
from hpsearch.preprocess import Preprocess
from tests.support import N_MEMBERS, Exported, bomb_png, member_state

# ------------------------------------------------------------------------------------- loading an export


def test_load_ensemble_matches_in_process_computation(exported: Exported) -> None:
    from torchvision import models

    ensemble = hpsearch.load_ensemble(exported.folder)
    x = exported.pre(exported.pool_images)
    with torch.no_grad():
        got = ensemble(x).double()
        probs = []
        for trial in range(N_MEMBERS):
            model = models.get_model("resnet18", num_classes=10)
            model.load_state_dict(member_state(exported, trial))
            probs.append(model.eval()(x).double().softmax(-1))
    t = json.loads((exported.folder / MANIFEST).read_text())["temperature"] or 1.0
    expected = (torch.stack(probs).mean(0).log() / t).softmax(-1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.sum(-1).allclose(torch.ones(len(got), dtype=got.dtype), atol=1e-5)
    assert float((got.argmax(1) == exported.test_labels).float().mean()) > 0.5  # the members learned something


def test_load_ensemble_strategies_agree(exported: Exported) -> None:
    x = exported.pre(exported.pool_images[:16])
    loop = load_ensemble(exported.folder, strategy="loop")
    with torch.inference_mode():
        expected = loop(x)
        for strategy in ("vmap", "auto"):
            ensemble = load_ensemble(exported.folder, strategy=strategy)
            assert ensemble._runner.strategy == ("vmap" if strategy == "vmap" else "loop")  # auto: loop on the CPU
            assert torch.allclose(ensemble(x), expected, atol=1e-6), strategy
    with pytest.raises(ExportError, match="strategy 'fast'"):
        load_ensemble(exported.folder, strategy="fast")


@pytest.mark.parametrize("name", ["member-0.safetensors", MANIFEST])
def test_a_flipped_byte_is_refused(exported: Exported, tmp_path: Path, name: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = shutil.copytree(exported.folder, tmp_path / "copy")
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(ExportError, match=f"{name} is corrupt"):
        load_ensemble(folder)
    assert main(["predict", str(folder), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_manifest_naming_a_file_outside_the_folder_is_refused(exported: Exported, tmp_path: Path, where: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Checksums alone do not stop this: the outside file is a valid member and every sum is recomputed."""
    import json
    import shutil

    folder = shutil.copytree(exported.folder, tmp_path / "copy")
    manifest = json.loads((folder / MANIFEST).read_text())
    member = manifest["members"][0]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / member["file"], outside)
    member["file"] = "../outside.safetensors" if where == "parent" else str(outside)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    sums = [line for line in (folder / SUMS).read_text().splitlines() if not line.endswith(f"  {MANIFEST}")]
    (folder / SUMS).write_text("\n".join([f"{sha256_file(folder / MANIFEST)}  {MANIFEST}", *sums]) + "\n")
    with pytest.raises(ExportError, match="is not a plain file name inside the export folder"):
        load_ensemble(folder)
    assert main(["predict", str(folder), str(tmp_path)]) == 2
    assert "not a plain file name" in capsys.readouterr().err


def test_predict_on_a_missing_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(tmp_path / "nope"), str(tmp_path)]) == 2
    assert "no exported ensemble" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- predict


def _write_pngs(ex: Exported, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(ex.pool_images):
        path = folder / f"{i:03d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


def _read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_predict_pngs_agrees_with_in_process(exported: Exported, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    pngs = tmp_path / "pngs"
    paths = _write_pngs(exported, pngs / "sub")
    (pngs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "pred.csv"
    rc = main(["predict", str(exported.folder), str(pngs), "--batch-size", "16", "--device", "cpu",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == ExitCode.INPUTS_SKIPPED
    assert "broken.png" in err and "not a readable image" in err and "Traceback" not in err
    rows = _read_csv(out.read_text())
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert list(rows[0])[:4] == ["path", "predicted", "probability", "entropy"]
    assert list(rows[0])[4:] == [f"p_{c}" for c in range(10)]
    ensemble = load_ensemble(exported.folder)
    with torch.no_grad():
        in_process = ensemble(exported.pre(exported.pool_images)).argmax(1)
    predicted = torch.tensor([int(r["predicted"]) for r in rows])
    labels = exported.test_labels
    acc_files, acc_mem = (float((p == labels).float().mean()) for p in (predicted, in_process))
    assert abs(acc_files - acc_mem) <= 0.01 + 1 / len(labels)
    assert float((predicted == in_process).float().mean()) >= 0.9
    for r in rows[:5]:
        probs = np.array([float(r[f"p_{c}"]) for c in range(10)])
        assert probs.sum() == pytest.approx(1.0, abs=1e-4)
        assert float(r["probability"]) == pytest.approx(probs.max(), abs=1e-6)


def test_predict_all_good_exits_0(exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _write_pngs(exported, tmp_path / "pngs")[:3]
    assert main(["predict", str(exported.folder), *map(str, paths)]) == 0
    rows = _read_csv(capsys.readouterr().out)
    assert len(rows) == 3


def test_predict_skips_a_bomb_and_links_out_of_its_folder(exported: Exported, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    pngs = tmp_path / "pngs"
    good, outside = _write_pngs(exported, pngs)[:2], _write_pngs(exported, tmp_path / "elsewhere")[:2]
    for extra in sorted(pngs.iterdir())[2:]:
        extra.unlink()
    bomb = bomb_png(pngs / "bomb.png")  # 48 KiB declaring 20,000 x 20,000
    os.symlink(outside[0], pngs / "out.png")  # a file linked out of the folder
    os.symlink(outside[0].parent, pngs / "out")  # a folder linked out of it
    os.symlink("/", pngs / "everything")  # never crawled
    os.symlink(good[0], pngs / "in.png")  # inside: followed
    rc = main(["predict", str(exported.folder), str(pngs), "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == ExitCode.INPUTS_SKIPPED and "Traceback" not in captured.err
    for path in (bomb, pngs / "out.png", pngs / "out", pngs / "everything"):
        assert f"{path}:" in captured.err
    assert [r["path"] for r in _read_csv(captured.out)] == [str(p) for p in (*good, pngs / "in.png")]


# ---------------------------------------------------------------------------------------------- select


class _Threshold(nn.Module):
    """A member that calls class 0 when the image's mean intensity exceeds its threshold, confidently."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 40 * (x.mean(dim=(1, 2, 3)) - self.threshold)
        return torch.stack([s, -s], dim=1)


def test_uncertainty_measures_by_hand() -> None:
    ensemble = Ensemble([nn.Identity(), nn.Identity()], [0.5, 0.5], "soft", None, ["a", "b"],
                        Preprocess(4, (0.0,) * 3, (1.0,) * 3), {})
    # sample 0: both members say [1, 0]; sample 1: [1, 0] vs [0, 1] (confident disagreement);
    # sample 2: both say [.5, .5] (agree on not knowing).
    member = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [.5, .5]], [[1.0, 0.0], [0.0, 1.0], [.5, .5]]],
                          dtype=torch.float64)
    stats = uncertainty(ensemble, member)
    ln2 = float(np.log(2))
    assert stats["entropy"].tolist() == pytest.approx([0.0, ln2, ln2], abs=1e-9)
    assert stats["margin"].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-9)
    assert stats["disagreement"].tolist() == pytest.approx([0.0, ln2, 0.0], abs=1e-9)
    assert entropy(torch.tensor([0.25] * 4)).item() == pytest.approx(np.log(4))


def test_select_puts_the_disagreed_sample_first(tmp_path: Path) -> None:
    # Members with thresholds .3 and .7: grey .5 splits them; .1 and .9 both agree; .45 and .55 also split.
    ensemble = Ensemble([_Threshold(0.3), _Threshold(0.7)], [0.5, 0.5], "soft", None, ["bright", "dark"],
                        Preprocess(8, (0.0,) * 3, (1.0,) * 3), {})
    paths = []
    for name, level in [("dark", 0.1), ("bright", 0.9), ("split", 0.5), ("dark2", 0.15)]:
        path = tmp_path / f"{name}.png"
        Image.new("RGB", (8, 8), (round(level * 255),) * 3).save(path)
        paths.append(path)
    for by in BY:
        sink = io.StringIO()
        assert select_csv(ensemble, paths, sink, 2, by, 2, torch.device("cpu"), pytest.fail) == 2
        rows = _read_csv(sink.getvalue())
        assert Path(rows[0]["path"]).name == "split.png", by
        assert rows[0]["rank"] == "1" and len(rows) == 2


def test_select_cli_on_the_export(exported: Exported, tmp_path: Path) -> None:
    _write_pngs(exported, tmp_path / "pool")
    out = tmp_path / "sel.csv"
    assert main(["select", str(exported.folder), str(tmp_path / "pool"), "--n", "5", "--by", "disagreement",
                 "--out", str(out)]) == 0
    rows = _read_csv(out.read_text())
    scores = [float(r["disagreement"]) for r in rows]
    assert len(rows) == 5 and scores == sorted(scores, reverse=True)


# ------------------------------------------------------------------------------------- the exported module


def test_a_hard_voting_export_breaks_ties_as_the_report_counts_them() -> None:
    """Two members that disagree: the vote is tied, and the class with the higher summed probability wins in the
    exported module (so `predict` and ONNX label a sample as the report's accuracy counted it), not the lowest."""
    from hpsearch.ensemble._combine import hard_vote

    member_probs = torch.tensor([[[0.60, 0.00, 0.40], [0.10, 0.80, 0.10]],     # member 0: class 0, class 1
                                 [[0.05, 0.05, 0.90], [0.10, 0.85, 0.05]]],    # member 1: class 2, class 1
                                dtype=torch.float64)
    ensemble = Ensemble([nn.Identity(), nn.Identity()], [0.5, 0.5], "hard", None, ["a", "b", "c"],
                        Preprocess(8, (0.0,) * 3, (1.0,) * 3), {})
    probs = ensemble.combine(member_probs).float()  # float32, as forward() returns it
    expected, _, ties = hard_vote(member_probs.log().numpy())
    assert ties == 1 and probs.argmax(1).tolist() == expected.tolist() == [2, 1]
    assert torch.allclose(probs.sum(1), torch.ones(2)) and abs(float(probs[1, 1]) - 1.0) < 2e-3  # still vote shares


# --------------------------------------------------------------------------------- hostile names and manifests


def crafted_export(exported: Exported, tmp_path: Path, change: Callable[[dict[str, Any]], object]) -> Path:
    """A copy of the export whose manifest `change` edited in place, with SHA256SUMS recomputed as a crafted
    export would: the checksums pass, so only the loader's own checks stand between it and the builder."""
    folder = shutil.copytree(exported.folder, tmp_path / "crafted")
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    sums = [line for line in (folder / SUMS).read_text().splitlines() if not line.endswith(f"  {MANIFEST}")]
    (folder / SUMS).write_text("\n".join([f"{sha256_file(folder / MANIFEST)}  {MANIFEST}", *sums]) + "\n")
    return folder


FORMULAS = ["=cmd|x", "@SUM(1)", "+1+cmd", "-2+cmd", "\tx", "=HYPERLINK(1)", "@a", "+b", "-c", "=d"]


def test_csv_text_prefixes_formulas_and_leaves_numbers() -> None:
    assert [csv_text(v) for v in FORMULAS] == ["'" + v for v in FORMULAS]
    assert [csv_text(v) for v in ("-0.5", "+3", "-1e-3", "a=b", "x@y", "", "/abs/path.png")] == \
        ["-0.5", "+3", "-1e-3", "a=b", "x@y", "", "/abs/path.png"]


def test_predict_and_select_write_formula_names_with_a_leading_quote(
        exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every class named like a formula (the manifest's classes) and image files named `=cmd|x.png` and
    `@SUM(1).png`, given relative to the current directory: each such cell of either CSV starts with '."""
    folder = crafted_export(exported, tmp_path, lambda m: m.__setitem__("classes", FORMULAS))
    images = tmp_path / "images"
    images.mkdir()
    names = ["=cmd|x.png", "@SUM(1).png"]
    for name, img in zip(names, exported.pool_images, strict=False):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(images / name)
    monkeypatch.chdir(images)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(folder), *names, "--out", str(out)]) == 0
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[0][4:] == [f"p_{c}" for c in FORMULAS]
    assert [r[0] for r in rows[1:]] == ["'" + n for n in names]
    assert all(r[1].startswith("'") and r[1][1:] in FORMULAS for r in rows[1:])
    assert all(float(cell) >= 0 for r in rows[1:] for cell in r[2:])  # the numbers stay numbers
    sel = tmp_path / "sel.csv"
    assert main(["select", str(folder), *names, "--n", "2", "--out", str(sel)]) == 0
    rows = list(csv.reader(io.StringIO(sel.read_text())))
    assert sorted(r[1] for r in rows[1:]) == sorted("'" + n for n in names)
    assert all(r[2].startswith("'") and r[2][1:] in FORMULAS for r in rows[1:])


def _member(field: str, value: object) -> Callable[[dict[str, Any]], object]:
    def change(manifest: dict[str, Any]) -> None:
        manifest["members"][0][field] = value
    return change


def _vit(image_size: object) -> Callable[[dict[str, Any]], object]:
    return _member("arch", "vit_b_16") if image_size is None else \
        lambda m: m["members"][0].update(arch="vit_b_16", builder_kwargs={"image_size": image_size})


@pytest.mark.parametrize(("change", "field"), [
    (_member("arch", "alexnet"), "members[0].arch"),  # in torchvision, not a supported family
    (_member("arch", "resnet99999"), "members[0].arch"),  # a supported family's name, not in torchvision
    (_member("arch", ["resnet18"]), "members[0].arch"),
    (_member("builder_kwargs", {"weights": "DEFAULT"}), "members[0].builder_kwargs"),  # a download
    (_member("builder_kwargs", {"image_size": 224}), "members[0].builder_kwargs"),  # only ViT takes one
    (_member("builder_kwargs", {"dropout": 0.5}), "members[0].builder_kwargs"),
    (_member("builder_kwargs", ["weights"]), "members[0].builder_kwargs"),
    (_vit(10**6), "members[0].builder_kwargs.image_size"),  # a position embedding of billions of floats
    (_vit(True), "members[0].builder_kwargs.image_size"),
    (_vit(40), "members[0].builder_kwargs.image_size"),  # not a multiple of the patch size
    (_member("num_classes", 10**9), "members[0].num_classes"),
    (lambda m: m.__setitem__("classes", [str(i) for i in range(100_001)]), "classes"),
    (lambda m: m.__setitem__("classes", [0, 1]), "classes"),
    (lambda m: m["preprocessing"].__setitem__("image_size", 10**6), "preprocessing.image_size"),
    (lambda m: m.__setitem__("members", {}), "members"),
    (_member("weight", "0.5"), "members[0].weight"),
    (_member("weight", float("nan")), "members[0].weight"),
    (_member("weight", -1.0), "members[0].weight"),
    (lambda m: [member.__setitem__("weight", 0) for member in m["members"]], "members[].weight"),
    (lambda m: m["combine"].__setitem__("method", "median"), "combine.method"),
    (lambda m: m.__setitem__("temperature", 0), "temperature"),
    (lambda m: m.__setitem__("temperature", "1"), "temperature"),
])
def test_a_crafted_manifest_never_reaches_the_model_builder(
        exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        change: Callable[[dict[str, Any]], object], field: str) -> None:
    """Checksums recomputed, as a crafted export would: the loader refuses the field in one line, and torchvision's
    builder is never called."""
    from torchvision import models

    folder = crafted_export(exported, tmp_path, change)
    built: list[str] = []
    real = models.get_model
    monkeypatch.setattr(models, "get_model", lambda name, **kw: built.append(name) or real(name, **kw))
    with pytest.raises(ExportError) as refused:
        load_ensemble(folder)
    message = str(refused.value)
    assert "\n" not in message and f"{MANIFEST}: {field} " in message, message
    assert built == []
    assert main(["predict", str(folder), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err
    assert built == []


def test_members_are_built_without_torchvision_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision import models

    from hpsearch.predict import plain_model

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(models, "get_model", lambda name, **kw: seen.append(kw))
    plain_model("resnet18", 3, {})
    assert seen == [{"weights": None, "num_classes": 3}]


def test_what_hpsearch_writes_for_a_vit_passes_the_member_checks(exported: Exported) -> None:
    """builder_kwargs as hpsearch.model.builder_kwargs writes them: ViT's image size, nothing for the others."""
    from hpsearch.model import builder_kwargs
    from hpsearch.predict._load import check_members

    manifest = json.loads((exported.folder / MANIFEST).read_text())
    for arch in ("vit_b_16", "vit_b_32", "resnet18", "efficientnet_b0", "swin_t"):
        manifest["members"][0].update(arch=arch, builder_kwargs=builder_kwargs(arch, 32))
        check_members(exported.folder, manifest)
