"""A study over two architectures (`[space] arch`) end to end: each trial trains the one it drew and records it,
its stored weights load strictly into that architecture and give its stored outputs, and the ensemble of the two
exports members of each architecture that `hpsearch.load_ensemble` (and the ONNX graph, and the model card's
lines) rebuild to the trials' stored test outputs."""

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

pytest.importorskip("timm")

ARCHS = ["resnet18", "timm:test_convnext"]


@pytest.mark.slow
@pytest.mark.inprocess
def test_trials_of_two_archs_train_store_and_export_their_own(study_file: Callable[..., Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = study_file("archs", space={"arch": ARCHS, "scheduler": ["exponential"]})
    url, artifacts = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "artifacts"
    cfg, prepared, study, objective = start(path, url, artifacts)
    for arch in ARCHS:  # one trial of each, the rest of its parameters drawn
        study.enqueue_trial({"arch": arch})

    run_trials(study, objective, 2)

    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, [t.user_attrs.get("fail_reason") for t in trials]
    assert [t.params["arch"] for t in trials] == ARCHS
    store = open_artifact_store(artifacts)
    n_classes = prepared.pool.num_classes
    heads = {"resnet18": "fc.weight", "timm:test_convnext": "head.fc.weight"}
    for trial in trials:
        weights = load_trial_weights(store, trial)
        arch = trial.params["arch"]  # its own head, not the other's
        assert heads[arch] in weights and all(h not in weights for a, h in heads.items() if a != arch)
        model = build_model(cfg.trial_model(trial.params), n_classes, cfg.data.image_size)
        model.load_state_dict(weights, strict=True)
        torch.testing.assert_close(predict_logits(model.eval(), objective.data.val, objective.data.preprocess, 512),
                                   load_trial_outputs(store, trial).val_logits)

    out = tmp_path / "ensemble"
    onnx = importlib.util.find_spec("onnxruntime") is not None  # the test extra has it
    assert main(["ensemble", str(path), "--storage", url, "--artifacts", str(artifacts), "--top-k", "2",
                 "--method", "soft", "--out", str(out), *(["--onnx"] if onnx else [])]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    if onnx:  # one graph of both members, run with ONNX Runtime against the modules within its tolerance
        assert manifest["onnx"]["check"]["max_abs_diff"] <= manifest["onnx"]["check"]["tolerance"]
    assert {m["trial"]: m["arch"] for m in manifest["members"]} == {0: ARCHS[0], 1: ARCHS[1]}
    ensemble = hpsearch.load_ensemble(out)
    images = prepared.pool.images[torch.from_numpy(prepared.split.test)]
    x = ensemble.preprocess(images)
    with torch.no_grad():
        for member, entry in zip(ensemble.members, manifest["members"], strict=True):
            expected = load_trial_outputs(store, trials[entry["trial"]]).test_logits
            torch.testing.assert_close(member(x), expected, rtol=1e-4, atol=1e-4)
        probs = ensemble(x[:16])

    # The model card's plain lines build each member as its own architecture too (torchvision and timm).
    code = (out / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(out)
    scope: dict[str, object] = {"x": x[:16]}
    with torch.no_grad():
        exec(code, scope)  # the card's own code: running it is the point
    torch.testing.assert_close(scope["probs"].float(), probs, rtol=1e-4, atol=1e-5)
