"""The exported ensemble: manifest, member files, checksums, `load_ensemble`, and the `predict`/`select` commands.

The study is real (created by `search.open_study` on real digits, so its recorded preprocessing is the one
trials use) but not trained: each member is a randomly initialised ResNet-18 whose head is fitted in closed
form (ridge regression on its features), which is accurate enough to make predictions meaningful, in seconds.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import hpsearch
from conftest import fit_head, tiny_tables, write_study
from hpsearch.cli._main import main
from hpsearch.config import read_study_file
from hpsearch.errors import ExitCode, ExportError
from hpsearch.predict import MANIFEST, SUMS, Ensemble, load_ensemble, sha256_file
from hpsearch.predict._score import BY, entropy, select_csv, uncertainty
from hpsearch.preprocess import Preprocess
from hpsearch.search._objective import suggest
from hpsearch.search._run import open_study, prepare
from hpsearch.store import (
    StudyArtifacts,
    TrialOutputs,
    load_trial_weights,
    open_artifact_store,
    open_storage,
    upload_trial_artifacts,
)

N_MEMBERS = 2


@dataclass(frozen=True)
class Exported:
    folder: Path
    url: str
    store: Path
    pool_images: torch.Tensor  # uint8 test images of the pool, split order
    test_labels: torch.Tensor
    pre: Preprocess
    tmp: Path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    from torchvision import models

    tmp = tmp_path_factory.mktemp("export")
    path = write_study(tmp / "tiny.toml", tiny_tables("tiny", data={"subset": 300}))
    cfg = read_study_file(path)
    url, store_dir = f"sqlite:///{tmp / 'study.db'}", tmp / "artifacts"
    prepared = prepare(cfg)
    storage = open_storage(url)
    study = open_study(cfg, storage, prepared, store_dir)
    attrs = study.user_attrs["preprocess"]
    pre = Preprocess(attrs["image_size"], tuple(attrs["mean"]), tuple(attrs["std"]))
    pool, split = prepared.pool, prepared.split
    images = {k: pre(pool.images[torch.from_numpy(getattr(split, k))]) for k in ("train", "val", "test")}
    labels = {k: pool.labels[torch.from_numpy(getattr(split, k))] for k in ("train", "val", "test")}
    files = StudyArtifacts(open_artifact_store(store_dir), storage, study.study_name, str(store_dir))
    for seed in range(N_MEMBERS):
        trial = study.ask()
        suggest(trial, cfg.space)
        torch.manual_seed(seed)
        model = models.get_model("resnet18", num_classes=10).eval()
        fit_head(model, images["train"], labels["train"], 10)
        with torch.no_grad():
            val, test = model(images["val"]), model(images["test"])
        outputs = TrialOutputs(val, test, split.sha256(), labels["val"], labels["test"])
        upload_trial_artifacts(files, trial, {k: v.contiguous() for k, v in model.state_dict().items()}, outputs,
                               {"arch": "resnet18"})
        study.tell(trial, float((val.argmax(1) == labels["val"]).float().mean()))
    out = tmp / "ens"
    rc = main(["ensemble", str(path), "--storage", url, "--artifacts", str(store_dir), "--out", str(out),
               "--method", "soft"])
    assert rc == 0
    test_idx = torch.from_numpy(split.test)
    return Exported(out, url, store_dir, pool.images[test_idx], pool.labels[test_idx], pre, tmp)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _member_state(ex: Exported, trial: int) -> dict[str, torch.Tensor]:
    import optuna

    study = optuna.load_study(study_name="tiny", storage=open_storage(ex.url))
    return load_trial_weights(open_artifact_store(ex.store), study.trials[trial])


# ------------------------------------------------------------------------------------------ the folder


def test_manifest_records_everything_a_stranger_needs(exported: Exported) -> None:
    manifest = json.loads((exported.folder / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["classes"] == [str(c) for c in range(10)]
    p = manifest["preprocessing"]
    assert p["image_size"] == 32 and p["channels"] == "RGB" and p["resize"]["interpolation"] == "bilinear"
    assert p["value_range"] == [0.0, 1.0] and "shorter side" in p["resize"]["policy"]
    assert p["mean"] == pytest.approx(list(exported.pre.mean)) and p["std"] == pytest.approx(list(exported.pre.std))
    assert p["mean"] != pytest.approx([0.485, 0.456, 0.406])  # from scratch: the training split's own stats
    assert manifest["combine"]["method"] == "soft" and manifest["study"] == "tiny"
    assert manifest["storage"] == exported.url
    assert [r["method"] for r in manifest["metrics"]] == ["single", "hard", "soft", "weighted"]
    members = manifest["members"]
    assert sorted(m["trial"] for m in members) == [0, 1] and sum(m["weight"] for m in members) == pytest.approx(1.0)
    for m in members:
        assert m["arch"] == "resnet18" and m["num_classes"] == 10 and "lr" in m["hyperparameters"]
        assert (exported.folder / m["file"]).name == f"member-{m['trial']}.safetensors"
    sums = (exported.folder / SUMS).read_text()
    assert MANIFEST in sums and all(m["file"] in sums for m in members)
    assert not list(exported.folder.glob("*.pt")) and not list(exported.folder.glob("*.pkl"))


def test_member_loads_strict_into_plain_torchvision(exported: Exported) -> None:
    from torchvision import models

    model = models.get_model("resnet18", num_classes=10)
    model.load_state_dict(load_file(str(exported.folder / "member-1.safetensors")), strict=True)
    stored = _member_state(exported, 1)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())


def test_load_ensemble_matches_in_process_computation(exported: Exported) -> None:
    from torchvision import models

    ensemble = hpsearch.load_ensemble(exported.folder)
    x = exported.pre(exported.pool_images)
    with torch.no_grad():
        got = ensemble(x).double()
        probs = []
        for trial in range(N_MEMBERS):
            model = models.get_model("resnet18", num_classes=10)
            model.load_state_dict(_member_state(exported, trial))
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
    folder = _copy(exported.folder, tmp_path / "copy")
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

    folder = _copy(exported.folder, tmp_path / "copy")
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


def test_weights_deleted_during_an_export_are_one_line(exported: Exported, tmp_path: Path, monkeypatch,
                                                       capsys) -> None:
    """The last window of the keep_weights race (a worker that read the pins just before the export set them):
    one line naming the trial and what to do, exit 2, and the pins released."""
    import optuna

    import hpsearch.export._write
    from hpsearch.store import pinned

    store = _copy(exported.store, tmp_path / "store")
    study = optuna.load_study(study_name="tiny", storage=open_storage(exported.url))
    doomed = store / study.trials[0].user_attrs["weights_artifact"]

    def worker_deletes(point: str) -> None:
        assert point == "ensemble" and len(pinned(study.user_attrs)) == N_MEMBERS
        doomed.unlink()

    monkeypatch.setattr(hpsearch.export._write, "hold_at", worker_deletes)
    rc = main(["ensemble", str(exported.tmp / "tiny.toml"), "--storage", exported.url, "--artifacts", str(store),
               "--out", str(tmp_path / "ens"), "--method", "soft"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "trial 0's weights were deleted (keep_weights of a running worker) while this ensemble was exported; " \
           "run `hpsearch ensemble` again" in err.replace("\n", " ")
    assert "Traceback" not in err
    assert not (tmp_path / "ens").exists(), "no half-written export"
    assert not pinned(study.user_attrs)


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
