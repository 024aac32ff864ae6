"""A study's artifact store: where it lives, and a trial's weights and outputs in it.

Every COMPLETE trial uploads, through Optuna's artifact store, `weights.safetensors` (best epoch, plain
torchvision keys) and `outputs.safetensors` (validation and test logits in split order, tagged with the
split's sha256). Their artifact ids sit in the trial's user attrs. Nothing here unpickles anything.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from safetensors.torch import load_file, save_file

DEFAULT_ARTIFACTS = "artifacts"
ATTR_ARTIFACTS = "artifacts_dir"
ATTR_WEIGHTS = "weights_artifact"
ATTR_OUTPUTS = "outputs_artifact"
ATTR_CHECKPOINT = "checkpoint_artifact"


def resolve_artifacts_dir(cli: str | None, study: optuna.Study | None, study_file: str | None) -> Path:
    """--artifacts > the location recorded in the study > [study] artifacts > ./artifacts."""
    recorded = study.user_attrs.get(ATTR_ARTIFACTS) if study is not None else None
    chosen = cli or recorded or study_file or DEFAULT_ARTIFACTS
    return Path(chosen).expanduser().resolve()


class AtomicFileSystemArtifactStore(FileSystemArtifactStore):
    """Optuna's filesystem store, but each file is written under a temporary name and then renamed.

    A worker killed mid-upload leaves no truncated artifact behind a valid id (a reader sees the whole
    file or none), and the ensemble never loads half a weights file.
    """

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        final = Path(self._get_filepath(artifact_id))
        with tempfile.NamedTemporaryFile(dir=final.parent, prefix=f".{final.name}.", delete=False) as tmp:
            try:
                shutil.copyfileobj(content_body, tmp)
                tmp.flush()
                os.fsync(tmp.fileno())
            except BaseException:
                tmp.close()
                os.unlink(tmp.name)
                raise
        os.replace(tmp.name, final)


def open_artifact_store(path: Path) -> FileSystemArtifactStore:
    path.mkdir(parents=True, exist_ok=True)
    return AtomicFileSystemArtifactStore(str(path))


def remove_artifact(store: FileSystemArtifactStore, artifact_id: str) -> bool:
    """Delete one artifact's file; False if it was already gone."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    try:
        store.remove(artifact_id)
    except ArtifactNotFound:
        return False
    except OSError as err:  # clean-up must never replace the error or result the caller is handling
        logging.getLogger(__name__).warning("could not delete artifact %s: %s", artifact_id, err)
        return False
    return True


@dataclass(frozen=True)
class TrialOutputs:
    val_logits: torch.Tensor  # float32 [n_val, classes], split order
    test_logits: torch.Tensor  # float32 [n_test, classes], split order
    split_sha256: str
    val_labels: torch.Tensor  # int64 [n_val]: the ensemble scores outputs without reloading the data
    test_labels: torch.Tensor  # int64 [n_test]


def upload_trial_artifacts(
    store: FileSystemArtifactStore,
    trial: optuna.Trial,
    state_dict: dict[str, torch.Tensor],
    outputs: TrialOutputs,
    metadata: dict[str, str],
) -> dict[str, str]:
    """Write both files completely, upload them, and return their artifact ids (also set as user attrs)."""
    with tempfile.TemporaryDirectory(prefix="hpsearch-") as tmp:
        weights = Path(tmp) / "weights.safetensors"
        save_file(state_dict, str(weights), metadata=metadata)
        out = Path(tmp) / "outputs.safetensors"
        save_file(
            {"val_logits": outputs.val_logits.contiguous(), "test_logits": outputs.test_logits.contiguous(),
             "val_labels": outputs.val_labels.contiguous(), "test_labels": outputs.test_labels.contiguous()},
            str(out),
            metadata={"split_sha256": outputs.split_sha256},
        )
        ids = {
            ATTR_WEIGHTS: upload_artifact(artifact_store=store, file_path=str(weights), study_or_trial=trial,
                                          mimetype="application/octet-stream"),
            ATTR_OUTPUTS: upload_artifact(artifact_store=store, file_path=str(out), study_or_trial=trial,
                                          mimetype="application/octet-stream"),
        }
    for key, value in ids.items():
        trial.set_user_attr(key, value)
    return ids


def download_to(store: FileSystemArtifactStore, artifact_id: str, folder: Path, name: str) -> Path:
    path = folder / name
    download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(path))
    return path


def load_trial_weights(store: FileSystemArtifactStore, trial: optuna.trial.FrozenTrial) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory(prefix="hpsearch-") as tmp:
        path = download_to(store, trial.user_attrs[ATTR_WEIGHTS], Path(tmp), "weights.safetensors")
        return load_file(str(path))


def load_trial_outputs(store: FileSystemArtifactStore, trial: optuna.trial.FrozenTrial) -> TrialOutputs:
    from safetensors import safe_open

    with tempfile.TemporaryDirectory(prefix="hpsearch-") as tmp:
        path = download_to(store, trial.user_attrs[ATTR_OUTPUTS], Path(tmp), "outputs.safetensors")
        with safe_open(str(path), framework="pt") as f:
            sha = (f.metadata() or {}).get("split_sha256", "")
            return TrialOutputs(f.get_tensor("val_logits"), f.get_tensor("test_logits"), sha,
                                f.get_tensor("val_labels"), f.get_tensor("test_labels"))


def store_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
