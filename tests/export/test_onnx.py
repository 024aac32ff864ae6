"""`hpsearch ensemble ... --onnx`: ensemble.onnx in the exported folder, checked against the PyTorch module.

Reuses the `exported` fixture's study (conftest.py: two ResNet-18 members with closed-form heads); the ONNX tests
skip cleanly when the optional ONNX packages are absent, the missing-packages error is tested either way.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hpsearch.cli._main import main
from hpsearch.errors import ExportError
from hpsearch.predict import MANIFEST, SUMS, Ensemble, load_ensemble, sha256_file
from hpsearch.preprocess import Preprocess
from tests.support import Exported

TOLERANCE = 1e-4


def _ort() -> object:
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name)
    return pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_folder(exported: Exported) -> Path:
    _ort()
    out = exported.tmp / "ens-onnx"
    rc = main(["ensemble", str(exported.tmp / "tiny.toml"), "--storage", exported.url, "--artifacts",
               str(exported.store), "--out", str(out), "--method", "weighted", "--onnx"])
    assert rc == 0
    return out


def _session(path: Path) -> object:
    ort = _ort()
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]


def test_onnx_graph_matches_the_pytorch_module(onnx_folder: Path, exported: Exported) -> None:
    session = _session(onnx_folder / "ensemble.onnx")
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()  # type: ignore[attr-defined]
    assert inp.name == "images" and inp.type == "tensor(float)" and inp.shape[1:] == [3, 32, 32]
    assert isinstance(inp.shape[0], str)  # the batch axis is dynamic
    assert outp.name == "probabilities" and outp.shape[1:] == [10]
    ensemble = load_ensemble(onnx_folder)
    x_all = exported.pre(exported.pool_images)
    for n in (7, 16):  # two batch sizes through the one graph
        x = x_all[:n]
        with torch.no_grad():
            expected = ensemble(x).numpy()
        (got,) = session.run(["probabilities"], {"images": x.numpy()})  # type: ignore[attr-defined]
        assert got.shape == (n, 10) and got.dtype == np.float32
        assert float(np.abs(got - expected).max()) <= TOLERANCE
    manifest = json.loads((onnx_folder / MANIFEST).read_text())
    assert manifest["combine"]["method"] == "weighted"  # the weighted average and T are in the graph


def test_onnx_files_are_in_the_manifest_and_sha256sums(onnx_folder: Path) -> None:
    manifest = json.loads((onnx_folder / MANIFEST).read_text())
    entry = manifest["onnx"]
    assert entry["file"] == "ensemble.onnx" and entry["sha256"] == sha256_file(onnx_folder / "ensemble.onnx")
    assert entry["input"]["shape"] == ["batch", 3, 32, 32] and entry["output"]["shape"] == ["batch", 10]
    assert entry["check"]["max_abs_diff"] <= TOLERANCE and isinstance(entry["opset"], int)
    sums = dict(line.split("  ")[::-1] for line in (onnx_folder / SUMS).read_text().splitlines())
    listed = [entry["file"], *(f["file"] for f in entry["external_data"])]
    for name in listed:
        assert sums[name] == sha256_file(onnx_folder / name)
    for f in entry["external_data"]:
        assert f["sha256"] == sha256_file(onnx_folder / f["file"])
    written = {p.name for p in onnx_folder.iterdir()}
    assert written == {MANIFEST, SUMS, "README.md", "report.md", "ensemble.json", *listed,
                       *(m["file"] for m in manifest["members"])}


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_onnx_file_is_refused(onnx_folder: Path, tmp_path: Path, damage: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(onnx_folder, folder)
    path = folder / "ensemble.onnx"
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    with pytest.raises(ExportError, match=f"ensemble.onnx is {'corrupt' if damage == 'flip' else 'missing'}"):
        load_ensemble(folder)
    assert main(["predict", str(folder), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ensemble.onnx" in err and "Traceback" not in err


def test_hard_voting_exports_too(tmp_path: Path) -> None:
    from hpsearch.export._onnx import write_onnx

    _ort()
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
               for _ in range(3)]
    ensemble = Ensemble(members, [1 / 3] * 3, "hard", None, ["a", "b", "c"], Preprocess(8, (0.0,) * 3, (1.0,) * 3),
                        {}).eval()
    entry = write_onnx(tmp_path, ensemble)
    assert entry["check"]["max_abs_diff"] <= TOLERANCE
    x = torch.randn(9, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    (got,) = _session(tmp_path / "ensemble.onnx").run(None, {"images": x.numpy()})  # type: ignore[attr-defined]
    with torch.no_grad():
        expected = ensemble(x).numpy()
    assert np.abs(got - expected).max() <= TOLERANCE and set(np.round(got.ravel() * 3).tolist()) <= {0, 1, 2, 3}


def test_weights_past_the_size_limit_go_to_listed_external_data(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from hpsearch.export._onnx import write_onnx
    from hpsearch.predict import onnx_files

    _ort()
    program = pytest.importorskip("torch.onnx._internal.exporter._onnx_program")
    if not hasattr(program, "_LARGE_MODEL_THRESHOLD"):
        pytest.skip("this torch.onnx has no size threshold to lower")
    monkeypatch.setattr(program, "_LARGE_MODEL_THRESHOLD", 0)  # every model is "past 2 GB"
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
               for _ in range(2)]
    ensemble = Ensemble(members, [0.4, 0.6], "weighted", 1.3, ["a", "b", "c"], Preprocess(8, (0.0,) * 3, (1.0,) * 3),
                        {}).eval()
    entry = write_onnx(tmp_path, ensemble)
    assert [f["file"] for f in entry["external_data"]] == ["ensemble.onnx.data"]
    assert entry["external_data"][0]["sha256"] == sha256_file(tmp_path / "ensemble.onnx.data")
    assert [name for name, _ in onnx_files({"onnx": entry})] == ["ensemble.onnx", "ensemble.onnx.data"]
    x = torch.randn(4, 3, 8, 8)
    (got,) = _session(tmp_path / "ensemble.onnx").run(None, {"images": x.numpy()})  # type: ignore[attr-defined]
    with torch.no_grad():
        assert np.abs(got - ensemble(x).numpy()).max() <= TOLERANCE


def test_onnx_without_its_packages_is_one_line_exit_2(exported: Exported, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    out = tmp_path / "ens"
    rc = main(["ensemble", str(exported.tmp / "tiny.toml"), "--storage", exported.url, "--artifacts",
               str(exported.store), "--out", str(out), "--onnx"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "onnxscript missing" in err and "pip install -e '.[onnx]'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_onnx_with_no_export_is_refused(exported: Exported, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ensemble", str(exported.tmp / "tiny.toml"), "--storage", exported.url, "--no-export",
                 "--onnx"]) == 2
    assert "--no-export" in capsys.readouterr().err
