"""A study of a timm model end to end: one tiny trial of timm's test_convnext trained through the objective on
digits, exported with `hpsearch export --trial` (with its ONNX graph), and reloaded by `hpsearch.load_ensemble`
(and by the model card's own lines) to give the outputs the trial stored."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

import hpsearch
from hpsearch.cli._main import main
from hpsearch.model import build_model
from hpsearch.predict._load import MANIFEST
from hpsearch.search._run import run_trials
from hpsearch.store import load_trial_outputs, load_trial_weights, open_artifact_store
from hpsearch.train import predict_logits
from tests.search.test_search import start

timm = pytest.importorskip("timm")


@pytest.mark.slow
@pytest.mark.inprocess
def test_a_timm_trial_trains_exports_and_reloads_to_its_stored_outputs(
        study_file: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = study_file("timmy", model={"arch": "timm:test_convnext"}, space={"dropout": [0.2, 0.4]})
    url, artifacts = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "artifacts"
    cfg, prepared, study, objective = start(path, url, artifacts)

    run_trials(study, objective, 1)

    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert 0.2 <= trial.params["dropout"] <= 0.4
    store = open_artifact_store(artifacts)
    weights = load_trial_weights(store, trial)
    n_classes = prepared.pool.num_classes
    # timm's keys, its head resized for the 10 digits.
    assert weights["head.fc.weight"].shape == (n_classes, 64) and "stem.0.weight" in weights
    model = build_model(cfg.model, n_classes, cfg.data.image_size, trial.params["dropout"])
    assert model.get_classifier().p == trial.params["dropout"]
    model.load_state_dict(weights)
    outputs = load_trial_outputs(store, trial)
    torch.testing.assert_close(predict_logits(model, objective.data.val, objective.data.preprocess, 512),
                               outputs.val_logits)

    out = tmp_path / "export"
    onnx = importlib.util.find_spec("onnxruntime") is not None  # the test extra has it; the graph is checked too
    assert main(["export", str(path), "--storage", url, "--artifacts", str(artifacts), "--trial", "0",
                 "--out", str(out), *(["--onnx"] if onnx else [])]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    if onnx:  # the export ran the graph with ONNX Runtime against the module, within its tolerance
        assert manifest["onnx"]["check"]["max_abs_diff"] <= manifest["onnx"]["check"]["tolerance"]
    (member,) = manifest["members"]
    assert (member["arch"], member["builder_kwargs"], member["num_classes"]) == ("timm:test_convnext", {}, n_classes)

    # Members are rebuilt by timm, never with its pretrained weights.
    created: list[dict[str, object]] = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: created.append({"name": name, **kw})
                        or real(name, **kw))
    ensemble = hpsearch.load_ensemble(out)
    assert created == [{"name": "test_convnext", "pretrained": False, "num_classes": n_classes}]
    images = prepared.pool.images[torch.from_numpy(prepared.split.test)]
    x = ensemble.preprocess(images)
    with torch.no_grad():
        torch.testing.assert_close(ensemble.members[0](x), outputs.test_logits, rtol=1e-4, atol=1e-4)
        probs = ensemble(x)
    assert (probs.argmax(1) == outputs.test_logits.argmax(1)).all()

    # The model card's plain lines (torchvision, and timm for this member) give load_ensemble's probabilities.
    card = (out / "README.md").read_text()
    assert "timm.create_model" in card and "pretrained=False" in card
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(out)
    scope: dict[str, object] = {"x": x[:16]}
    with torch.no_grad():
        exec(code, scope)  # the card's own code: running it is the point
    torch.testing.assert_close(scope["probs"].float(), probs[:16], rtol=1e-4, atol=1e-5)
