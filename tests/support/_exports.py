"""An export the export and predict tests read: a real study on real digits whose members are not trained,
their heads fitted in closed form."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import torch
from torch import nn

from tests.support._studies import tiny_tables, write_study

if TYPE_CHECKING:
    from hpsearch.preprocess import Preprocess


def fit_head(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int) -> None:
    """Fit a ResNet's head in closed form (ridge regression of one-hot labels on its features): trained-
    enough members for ensemble tests, without training."""
    fc = model.fc
    model.fc = nn.Identity()
    with torch.no_grad():
        f = model(x).double()
        f1 = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], dim=1)
        target = nn.functional.one_hot(y, classes).double() * 10 - 5
        w = torch.linalg.solve(f1.T @ f1 + 1e-2 * torch.eye(f1.shape[1], dtype=f.dtype), f1.T @ target)
        fc.weight.copy_(w[:-1].T.float())
        fc.bias.copy_(w[-1].float())
    model.fc = fc


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


def build_export(tmp: Path) -> Exported:
    """A real study on real digits (search.open_study), not trained: N_MEMBERS randomly initialised ResNet-18s
    whose heads are fitted in closed form, exported by `hpsearch ensemble --method soft` into tmp/ens."""
    from torchvision import models

    from hpsearch.cli._main import main
    from hpsearch.config import read_study_file
    from hpsearch.preprocess import Preprocess
    from hpsearch.search._objective import suggest
    from hpsearch.search._study import open_study, prepare
    from hpsearch.store import StudyArtifacts, TrialOutputs, open_artifact_store, open_storage, upload_trial_artifacts

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


def member_state(ex: Exported, trial: int) -> dict[str, torch.Tensor]:
    """The weights the study stored for `trial` of an export's study."""
    from hpsearch.store import load_trial_weights, open_artifact_store, open_storage

    study = optuna.load_study(study_name="tiny", storage=open_storage(ex.url))
    return load_trial_weights(open_artifact_store(ex.store), study.trials[trial])
