"""Test-time augmentation (`predict --tta`): the views (shifts of the crop, mirror images only where the study flipped),
the manifest refusing TTA without recorded augmentations, and `predict --tta` on a real export checked by hand.

The export is built from a real study whose trials carry a fine-tuned model and a perturbation of it (the `lab`
fixture, tests/support/_lab.py: make_lab), as in tests/ensemble/test_soup.py.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image

from hpsearch.cli._main import main
from hpsearch.errors import TTAError
from hpsearch.predict import MANIFEST, SUMS, load_ensemble, sha256_file
from hpsearch.predict._tta import crop_shifts, manifest_augment, shift, tta_views
from hpsearch.preprocess import decode_image
from tests.support import Lab, lab_ensemble, lab_study, perturbed


def _asymmetric(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.arange(n * 3 * size * size, dtype=torch.float32).reshape(n, 3, size, size).sin()


def _contains(views: Sequence[torch.Tensor], x: torch.Tensor) -> bool:
    return any(torch.equal(v, x) for v in views)


def test_tta_without_flip_never_flips() -> None:
    x = _asymmetric()
    for augment in (["crop"], ["crop", "cutout"], ["cutout"], []):
        views = tta_views(x, augment)
        assert torch.equal(views[0], x)
        assert not _contains(views, x.flip(-1)), augment
        for view in views:  # no view is a mirror image of any shift of x either
            assert not any(torch.equal(view, shift(x, dy, dx).flip(-1)) for dy, dx in [(0, 0), *crop_shifts(16)])
    assert len(tta_views(x, ["crop"])) == 5 and len(tta_views(x, ["cutout"])) == 1


def test_tta_with_flip_mirrors_every_view() -> None:
    x = _asymmetric()
    assert len(tta_views(x, ["flip"])) == 2 and _contains(tta_views(x, ["flip"]), x.flip(-1))
    views = tta_views(x, ["crop", "flip"])
    assert len(views) == 10 and _contains(views, x.flip(-1))
    assert all(_contains(views, v.flip(-1)) for v in views)
    assert all(torch.equal(a, b) for a, b in zip(views, tta_views(x, ["flip", "crop"]), strict=True))  # fixed


def test_shift_moves_content_with_reflect_padding() -> None:
    x = _asymmetric(1, 8)
    assert crop_shifts(8) == [(-1, 0), (1, 0), (0, -1), (0, 1)] and crop_shifts(32)[1] == (2, 0)
    down = shift(x, 1, 0)
    assert torch.equal(down[..., 1:, :], x[..., :-1, :]) and torch.equal(down[..., 0, :], x[..., 1, :])
    right = shift(x, 0, -1)
    assert torch.equal(right[..., :, :-1], x[..., :, 1:])


def test_manifest_without_augment_is_refused_for_tta() -> None:
    assert manifest_augment({"preprocessing": {"augment": ["crop", "flip"]}}) == ("crop", "flip")
    with pytest.raises(TTAError, match="records no training augmentations"):
        manifest_augment({"preprocessing": {}})


def _pngs(lab: Lab, folder: Path, n: int = 12) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(lab.test_images[:n]):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def weighted_export(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = lab_study(lab, "tta", [lab.base, perturbed(lab.base, 0.1, seed=4)])
    out = tmp_path_factory.mktemp("tta") / "ens"
    assert lab_ensemble(lab, path, out, "--method", "soft") == 0
    return out


def test_predict_tta_writes_the_csv(lab: Lab, weighted_export: Path, tmp_path: Path) -> None:
    manifest = json.loads((weighted_export / MANIFEST).read_text())
    assert manifest["preprocessing"]["augment"] == ["crop"]  # the study's own
    pngs = _pngs(lab, tmp_path / "pngs")
    plain, tta = tmp_path / "plain.csv", tmp_path / "tta.csv"
    assert main(["predict", str(weighted_export), str(tmp_path / "pngs"), "--out", str(plain)]) == 0
    assert main(["predict", str(weighted_export), str(tmp_path / "pngs"), "--tta", "--out", str(tta)]) == 0
    rows = list(csv.DictReader(io.StringIO(tta.read_text())))
    assert [r["path"] for r in rows] == [str(p) for p in pngs]
    for r in rows:
        assert sum(float(r[f"p_{c}"]) for c in range(10)) == pytest.approx(1.0, abs=1e-4)
    assert tta.read_text() != plain.read_text()  # the shifted views change the probabilities
    again = tmp_path / "again.csv"
    assert main(["predict", str(weighted_export), *map(str, pngs), "--tta", "--out", str(again)]) == 0
    assert again.read_text() == tta.read_text()  # deterministic
    # By hand: each member's softmax averaged over the 5 crop views, then the manifest's combination.
    ensemble = load_ensemble(weighted_export)
    x = ensemble.preprocess(torch.stack([decode_image(p, 32) for p in pngs]))  # what predict decodes
    with torch.no_grad():
        member = torch.stack([ensemble.member_probs(v) for v in tta_views(x, ["crop"])]).mean(0)
        expected = ensemble.combine(member)
    got = torch.tensor([[float(r[f"p_{c}"]) for c in range(10)] for r in rows], dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-5)


def test_predict_tta_on_an_export_without_augment_exits_2(lab: Lab, weighted_export: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "old"
    shutil.copytree(weighted_export, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["preprocessing"]["augment"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    sums = [line.split("  ") for line in (folder / SUMS).read_text().splitlines()]
    (folder / SUMS).write_text("".join(f"{sha256_file(folder / name)}  {name}\n" for _, name in sums))
    pngs = _pngs(lab, tmp_path / "pngs", 2)
    assert main(["predict", str(folder), *map(str, pngs), "--tta"]) == 2
    assert "records no training augmentations" in capsys.readouterr().err
    assert main(["predict", str(folder), *map(str, pngs)]) == 0  # without --tta the old export still works
