"""A lab: real studies of one fine-tuned model and perturbations of it.

The soup and TTA tests' studies are real (search.open_study on real digits, with a local "pretrained" weights file)
and their trials start from that file; instead of training, each trial is the fine-tuned model moved by a known
perturbation of its head, so what averaging or a test-time view does is known in advance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tests.support._exports import fit_head
from tests.support._studies import tiny_tables, write_study

if TYPE_CHECKING:
    from hpsearch.preprocess import Preprocess


State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Lab:
    tmp: Path
    init: Path  # the shared "pretrained" weights file
    url: str
    store: Path
    base: State  # the fine-tuned model every perturbed trial is built around
    pre: Preprocess
    test_images: torch.Tensor  # uint8, split order
    test_x: torch.Tensor  # preprocessed


def perturbed(base: State, sigma: float, seed: int, sign: float = 1.0) -> State:
    state = {k: v.clone() for k, v in base.items()}
    noise = torch.randn(state["fc.weight"].shape, generator=torch.Generator().manual_seed(seed))
    state["fc.weight"] += sign * sigma * float(base["fc.weight"].std()) * noise
    return state


def lab_study_file(tmp: Path, name: str, weights: str) -> Path:
    return write_study(tmp / f"{name}.toml", tiny_tables(name, data={"subset": 300}, model={"weights": weights}))


def lab_study(lab: Lab, name: str, states: Sequence[State], weights: str | None = None,
                init_tags: Sequence[str | None] | None = None, archs: Sequence[str] | None = None) -> Path:
    """A real study whose trials carry `states` as their weights, outputs computed from them."""
    from torchvision import models

    from hpsearch.config import read_study_file
    from hpsearch.keys import INIT_WEIGHTS as ATTR_INIT_WEIGHTS
    from hpsearch.model import init_weights_tag
    from hpsearch.search._objective import suggest
    from hpsearch.search._study import open_study, prepare
    from hpsearch.store import StudyArtifacts, TrialOutputs, open_artifact_store, open_storage, upload_trial_artifacts

    path = lab_study_file(lab.tmp, name, weights or str(lab.init))
    cfg = read_study_file(path)
    prepared = prepare(cfg)
    storage = open_storage(lab.url)
    study = open_study(cfg, storage, prepared, lab.store)
    pool, split = prepared.pool, prepared.split
    parts = ("val", "test", "calibration")  # what a trial stores outputs of
    x = {k: lab.pre(pool.images[torch.from_numpy(getattr(split, k))]) for k in parts}
    y = {k: pool.labels[torch.from_numpy(getattr(split, k))] for k in parts}
    files = StudyArtifacts(open_artifact_store(lab.store), storage, study.study_name, str(lab.store))
    for i, state in enumerate(states):
        trial = study.ask()
        suggest(trial, cfg.space)
        tag = init_tags[i] if init_tags is not None else init_weights_tag(cfg.model)
        if tag is not None:
            trial.set_user_attr(ATTR_INIT_WEIGHTS, tag)
        model = models.get_model(archs[i] if archs else "resnet18", num_classes=10)
        model.load_state_dict(state)
        with torch.no_grad():
            val, test = model.eval()(x["val"]), model(x["test"])
            calibration = model(x["calibration"]) if len(split.calibration) else None  # as a trial stores it
        outputs = TrialOutputs(val, test, split.sha256(), y["val"], y["test"], calibration_logits=calibration,
                               calibration_labels=y["calibration"] if calibration is not None else None)
        upload_trial_artifacts(files, trial, state, outputs, {"arch": "resnet18"})
        study.tell(trial, float((val.argmax(1) == y["val"]).float().mean()))
    return path


def make_lab(tmp: Path) -> Lab:
    """A "pretrained" ResNet-18 weights file in tmp, and the model fine-tuned from it (head fitted in closed form)."""
    from safetensors.torch import save_file
    from torchvision import models

    from hpsearch.config import read_study_file
    from hpsearch.model import build_model
    from hpsearch.preprocess import Preprocess
    from hpsearch.search._study import prepare

    torch.manual_seed(0)
    init = tmp / "init.safetensors"
    save_file(models.resnet18().state_dict(), str(init))  # a "pretrained" ImageNet-shaped checkpoint
    cfg = read_study_file(lab_study_file(tmp, "probe", str(init)))
    prepared = prepare(cfg)
    pre = Preprocess(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # pretrained: ImageNet statistics
    pool, split = prepared.pool, prepared.split
    model = build_model(cfg.model, 10, 32).eval()  # backbone from the file, new head
    train = torch.from_numpy(split.train)
    fit_head(model, pre(pool.images[train]), pool.labels[train], 10)
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    test_images = pool.images[torch.from_numpy(split.test)]
    return Lab(tmp, init, f"sqlite:///{tmp / 'study.db'}", tmp / "artifacts", base, pre, test_images,
               pre(test_images))


def lab_ensemble(lab: Lab, path: Path, out: Path, *extra: str) -> int:
    """`hpsearch ensemble` (in this process) of a lab study."""
    from hpsearch.cli._main import main

    return main(["ensemble", str(path), "--storage", lab.url, "--artifacts", str(lab.store), "--out", str(out),
                 "--device", "cpu", *extra])
