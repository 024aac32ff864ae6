"""An ensemble of a cross-validated study: members from out-of-fold outputs, exported and reproduced from the
manifest alone (load_ensemble, a plain torchvision client, ONNX), and the soup refused.

The study is real and trained in this process: 2 trials of 2 folds, 2 epochs each, on 300 digits (SQLite file,
artifact folder), so each member is two fold models as `hpsearch run` leaves them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from safetensors.torch import load_file

from hpsearch import keys, load_ensemble
from hpsearch.cli._main import main
from hpsearch.config import read_study_file
from hpsearch.ensemble._candidates import select_candidates
from hpsearch.predict import MANIFEST, SUMS, sha256_file
from hpsearch.preprocess import Preprocess
from hpsearch.record import read_trial_record
from hpsearch.search._objective import Objective, Prepared
from hpsearch.search._run import run_trials
from hpsearch.search._study import open_study, prepare
from hpsearch.store import StudyArtifacts, load_outputs, open_artifact_store, open_storage
from tests.support import tiny_tables, write_study

pytestmark = [pytest.mark.slow, pytest.mark.inprocess]

K = 2


@dataclass(frozen=True)
class CVStudy:
    path: Path
    url: str
    store: Path
    study: optuna.Study
    prepared: Prepared
    pre: Preprocess
    tmp: Path

    def test_images(self) -> torch.Tensor:
        return self.pre(self.prepared.pool.images[torch.from_numpy(self.prepared.split.test)])

    def export(self, name: str, *args: str) -> Path:
        out = self.tmp / name
        rc = main(["ensemble", str(self.path), "--storage", self.url, "--artifacts", str(self.store), "--out",
                   str(out), *args])
        assert rc == 0
        return out


@pytest.fixture(scope="module")
def cv(tmp_path_factory: pytest.TempPathFactory) -> CVStudy:
    tmp = tmp_path_factory.mktemp("cv")
    path = write_study(tmp / "cv.toml", tiny_tables("cv", data={"subset": 300, "folds": K}, train={"epochs": 2},
                                                    space={"lr": [1e-3, 3e-3], "scheduler": ["none"]}))
    cfg = read_study_file(path)
    url, store = f"sqlite:///{tmp / 'study.db'}", tmp / "artifacts"
    prepared = prepare(cfg)
    storage = open_storage(url)
    study = open_study(cfg, storage, prepared, store)
    files = StudyArtifacts(open_artifact_store(store), storage, study.study_name, str(store))
    torch.set_num_threads(1)
    run_trials(study, Objective(cfg, prepared, torch.device("cpu"), files), 2)
    attrs = study.user_attrs[keys.PREPROCESS]
    pre = Preprocess(attrs["image_size"], tuple(attrs["mean"]), tuple(attrs["std"]))
    return CVStudy(path, url, store, study, prepared, pre, tmp)


def stored_fold_test_probs(cv: CVStudy, trial: int) -> torch.Tensor:
    """[K, n_test, C] softmaxes of a trial's fold models on test, as the trial stored them."""
    store = open_artifact_store(cv.store)
    records = list(read_trial_record(cv.study.trials[trial]).folds)
    return torch.stack([load_outputs(store, r["outputs_artifact"]).test_logits.double().softmax(-1) for r in records])


def test_candidates_are_out_of_fold_over_train_and_val(cv: CVStudy) -> None:
    selection = select_candidates(cv.study, open_artifact_store(cv.store), 2)
    assert not selection.skipped and len(selection.candidates) == 2
    folds, pool = cv.prepared.folds, cv.prepared.pool
    for c in selection.candidates:
        o = c.outputs
        # Every train+val image once, in pool order, predicted by the fold model that never saw it.
        assert o.val_index.tolist() == folds.pool.tolist()
        assert o.val_labels.tolist() == pool.labels[torch.from_numpy(folds.pool)].tolist()
        assert len(o.val_logits) == len(cv.prepared.split.train) + len(cv.prepared.split.val)
        assert np.isclose(float((o.val_logits.argmax(1) == o.val_labels).double().mean()),
                          np.average([r["val_accuracy"] for r in read_trial_record(cv.study.trials[c.trial]).folds],
                                     weights=folds.sizes()))
        # Test: the uniform average of the K fold models' softmaxes.
        assert torch.allclose(o.test_logits.exp(), stored_fold_test_probs(cv, c.trial).mean(0), atol=1e-12)
        assert len(c.fold_weights) == K and c.weights_artifact == ""


def test_the_export_records_each_members_fold_models_and_the_rule(cv: CVStudy) -> None:
    folder = cv.export("ens")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["format_version"] == 2
    assert "mean_k softmax(z_mk)" in manifest["combine"]["rule"]
    sums = (folder / SUMS).read_text()
    result = json.loads((folder / "ensemble.json").read_text())
    assert [r["method"] for r in result["metrics"]] == ["single", "hard", "soft", "weighted"]  # the same table
    assert any("out-of-fold outputs of all" in note for note in result["notes"])
    for member in manifest["members"]:
        assert "file" not in member and [f["fold"] for f in member["folds"]] == list(range(K))
        assert "mean" in member["fold_rule"]
        for f in member["folds"]:
            assert f["file"] == f"member-{member['trial']}-fold-{f['fold']}.safetensors"
            assert sha256_file(folder / f["file"]) == f["sha256"] and f"{f['sha256']}  {f['file']}" in sums


def _client_probs(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """What a stranger computes with torchvision and safetensors from the manifest alone."""
    from torchvision import models

    manifest = json.loads((folder / MANIFEST).read_text())
    members = []
    with torch.no_grad():
        for spec in manifest["members"]:
            fold_probs = []
            for f in spec["folds"]:
                model = models.get_model(spec["arch"], num_classes=spec["num_classes"], **spec["builder_kwargs"])
                model.load_state_dict(load_file(str(folder / f["file"])), strict=True)
                fold_probs.append(model.eval()(x).double().softmax(-1))
            members.append((spec["weight"], torch.stack(fold_probs).mean(0)))  # p_m = mean_k softmax(z_mk)
    t = manifest["combine"]["temperature"] or 1.0
    if manifest["combine"]["method"] == "hard":
        votes = torch.stack([w * torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).double()
                             for w, p in members]).sum(0)
        mean = torch.stack([p for _, p in members]).mean(0)  # ties: the highest summed probability wins
        return (votes + 1e-3 * mean) / (1 + 1e-3)
    mix = torch.stack([w * p for w, p in members]).sum(0)
    return (mix.log() / t).softmax(-1)


@pytest.mark.parametrize("method", ["weighted", "hard"])
def test_the_manifest_alone_reproduces_the_ensemble(cv: CVStudy, method: str) -> None:
    folder = cv.export(f"ens-{method}", "--method", method)
    x = cv.test_images()
    client = _client_probs(folder, x)
    with torch.no_grad():
        loaded = load_ensemble(folder)(x).double()
    assert torch.allclose(loaded, client, atol=1e-6)
    # ... and what the ensemble measured from the stored outputs: the chosen row's test accuracy.
    manifest = json.loads((folder / MANIFEST).read_text())
    row = next(r for r in manifest["metrics"] if r["method"] == method)
    labels = cv.prepared.pool.labels[torch.from_numpy(cv.prepared.split.test)]
    assert float((loaded.argmax(1) == labels).double().mean()) == pytest.approx(row["test_accuracy"])
    if method == "weighted":  # the stored fold test outputs mixed by the manifest's weights give the same probs
        t = manifest["combine"]["temperature"] or 1.0
        mix = sum(m["weight"] * stored_fold_test_probs(cv, m["trial"]).mean(0) for m in manifest["members"])
        assert torch.allclose(loaded, (mix.log() / t).softmax(-1), atol=1e-5)


def test_onnx_reproduces_the_cross_validated_ensemble(cv: CVStudy) -> None:
    ort = pytest.importorskip("onnxruntime")
    folder = cv.export("ens-onnx", "--onnx")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["onnx"]["check"]["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(folder / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    x = cv.test_images()[:9]
    (got,) = session.run(["probabilities"], {"images": x.numpy()})
    assert np.abs(got - _client_probs(folder, x).float().numpy()).max() <= 1e-4


def test_a_soup_of_a_cross_validated_study_is_refused_in_one_line(cv: CVStudy,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["ensemble", str(cv.path), "--storage", cv.url, "--artifacts", str(cv.store), "--out",
               str(cv.tmp / "soup"), "--method", "soup"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--method soup" in err and "cross-validated" in err, err
    assert not (cv.tmp / "soup").exists()


def test_the_study_report_uses_the_out_of_fold_outputs(cv: CVStudy) -> None:
    ensemble = cv.export("ens-report", "--method", "soft")  # two members whatever the weights fit
    out = cv.tmp / "report"
    rc = main(["report", str(cv.path), "--storage", cv.url, "--artifacts", str(cv.store), "--out", str(out),
               "--ensemble", str(ensemble)])
    assert rc == 0
    for figure in ("confusion_matrix.png", "confident_mistakes.png", "ensemble_reliability.png"):
        assert (out / figure).stat().st_size > 0, figure
    per_class = (out / "per_class.csv").read_text().splitlines()
    header = per_class[0].split(",")
    images = sum(int(line.split(",")[header.index("images")]) for line in per_class[1:])
    assert images == len(cv.prepared.folds.pool)  # every train+val image, out of fold
    assert "Fold accuracies" in (out / "report.html").read_text()


def test_predict_on_image_files_reproduces_the_cross_validated_ensemble(cv: CVStudy, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from hpsearch.preprocess import decode_image

    folder = cv.export("ens-predict")
    test = cv.prepared.pool.images[torch.from_numpy(cv.prepared.split.test[:6])]
    paths = []
    for i, image in enumerate(test):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    out = tmp_path / "pred.csv"
    assert main(["predict", str(folder), *map(str, paths), "--device", "cpu", "--out", str(out)]) == 0
    rows = out.read_text().splitlines()[1:]
    got = torch.tensor([[float(v) for v in row.split(",")[4:]] for row in rows], dtype=torch.float64)
    # The plain client on the same files, decoded as predict decodes them (shorter side resized, centre crop).
    x = cv.pre(torch.stack([decode_image(p, cv.pre.image_size) for p in paths]))
    assert torch.allclose(got, _client_probs(folder, x), atol=2e-6)
