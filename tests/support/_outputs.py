"""A real SQLite study and artifact folder whose trials stored given outputs: the ensemble's input, made without
training (tests/ensemble)."""

from __future__ import annotations

from pathlib import Path

import optuna
import torch

from hpsearch.store import StudyArtifacts, TrialOutputs, open_artifact_store, open_storage, upload_trial_artifacts
from tests.support._studies import tiny_tables, write_study


def study_of_outputs(tmp_path: Path, name: str, outputs: list[TrialOutputs], classes: int = 10
                     ) -> tuple[Path, str, Path]:
    """The study file, storage URL and artifact folder of a study whose trial i stored outputs[i] and the value
    0.9 - 0.001 i (best first); its recorded split is the outputs' own."""
    from hpsearch.config import read_study_file

    path = write_study(tmp_path / f"{name}.toml", tiny_tables(name))
    url, store_dir = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "artifacts"
    storage = open_storage(url)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    files = StudyArtifacts(open_artifact_store(store_dir), storage, name, str(store_dir))
    for attr, value in (("split_sha256", outputs[0].split_sha256), ("classes", [str(c) for c in range(classes)]),
                        ("config", read_study_file(path).model_dump(mode="json")), ("artifacts_dir", str(store_dir))):
        study.set_user_attr(attr, value)
    for i, o in enumerate(outputs):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        upload_trial_artifacts(files, trial, {"w": torch.zeros(2)}, o, {"arch": "resnet18"})
        study.tell(trial, 0.9 - 1e-3 * i)
    return path, url, store_dir
