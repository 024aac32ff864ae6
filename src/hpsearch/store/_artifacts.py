"""A study's artifact store: where it lives, and a trial's weights and outputs in it.

Every COMPLETE trial uploads, through Optuna's artifact store, `weights.safetensors` (best epoch, plain
torchvision keys) and `outputs.safetensors` (validation and test logits in split order, tagged with the
split's sha256). Their artifact ids sit in the trial's user attrs. Nothing here unpickles anything.

optuna-dashboard lists a trial's files from the study's system attrs `dashboard:artifacts:<trial id>:<artifact
id>` (the record its own uploads use) as well as from the trial's. A finished trial's attrs can never change
again, but a study's can: so hpsearch lists its files there, and a file that `keep_weights` deletes later
gets a null entry, which the dashboard skips; no dead link stays behind. Checkpoints are never listed: each
lives only until the next one.

A store is a local (or shared) folder, or `s3://bucket/prefix` through Optuna's Boto3 store, with the
credentials and endpoint boto3 reads from the environment (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, ...).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import optuna
from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore, download_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from hpsearch import keys
from hpsearch.errors import ArtifactStoreError, StoreFullError
from hpsearch.record import read_study_record, read_trial_record

if TYPE_CHECKING:
    import torch

DEFAULT_ARTIFACTS = "artifacts"
S3_SCHEME = "s3://"


class ArtifactStore(Protocol):
    """What hpsearch asks of a store: Optuna's artifact-store protocol."""

    def open_reader(self, artifact_id: str) -> BinaryIO: ...

    def write(self, artifact_id: str, content_body: BinaryIO) -> None: ...

    def remove(self, artifact_id: str) -> None: ...


def is_s3(location: str | Path) -> bool:
    return str(location).startswith(S3_SCHEME)


def split_s3(location: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix"); a bad name is an ArtifactStoreError."""
    bucket, _, prefix = location.removeprefix(S3_SCHEME).partition("/")
    if not bucket or "/" in bucket or " " in location:
        raise ArtifactStoreError(f"artifacts: {location!r} is not an S3 location; write s3://BUCKET or "
                                 "s3://BUCKET/PREFIX")
    return bucket, prefix.strip("/")


def resolve_artifacts(cli: str | None, study: optuna.Study | None, study_file: str | None) -> str:
    """--artifacts > HPSEARCH_ARTIFACTS > the location recorded in the study > [study] artifacts > ./artifacts.

    A folder comes back absolute (workers in other directories must agree on it); S3 as s3://bucket/prefix.
    """
    recorded = read_study_record(study).artifacts if study is not None else None
    chosen = cli or os.environ.get("HPSEARCH_ARTIFACTS") or recorded or study_file or DEFAULT_ARTIFACTS
    if is_s3(chosen):
        bucket, prefix = split_s3(chosen)
        return f"{S3_SCHEME}{bucket}/{prefix}" if prefix else f"{S3_SCHEME}{bucket}"
    return str(Path(chosen).expanduser().resolve())


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


class S3ArtifactStore(Boto3ArtifactStore):
    """Optuna's Boto3 store with every key under a prefix, so one bucket holds many studies.

    No temporary name is needed here: an S3 object appears whole or not at all.
    """

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        # avoid_buf_copy: stream files to S3 rather than holding a whole checkpoint in memory first.
        super().__init__(bucket, client, avoid_buf_copy=True)
        self.prefix = prefix

    def key(self, artifact_id: str) -> str:
        return f"{self.prefix}/{artifact_id}" if self.prefix else artifact_id

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return super().open_reader(self.key(artifact_id))

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        super().write(self.key(artifact_id), content_body)

    def remove(self, artifact_id: str) -> None:
        super().remove(self.key(artifact_id))

    def size_bytes(self) -> int:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "")
        return sum(obj["Size"] for page in pages for obj in page.get("Contents", []))


def open_artifact_store(location: str | Path, *, create: bool = True) -> ArtifactStore:
    """The store at a folder (made if `create`) or an S3 location (its bucket must exist and be readable)."""
    if is_s3(location):
        return _open_s3(str(location))
    path = Path(location)
    if not create and not path.is_dir():
        raise ArtifactStoreError(f"artifacts: {path} is not a folder; pass the study's artifact store "
                                 "with --artifacts")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a folder should be, no permission to make it, a read-only disk
        raise ArtifactStoreError(f"artifacts: cannot make the folder {path} ({err.strerror}); point --artifacts "
                                 "or [study] artifacts at a folder you can write") from None
    if create and not os.access(path, os.W_OK | os.X_OK):
        raise ArtifactStoreError(f"artifacts: {path} is not writable by this user; point --artifacts or [study] "
                                 "artifacts at a folder you can write") from None
    return AtomicFileSystemArtifactStore(str(path))


def _open_s3(location: str) -> S3ArtifactStore:
    bucket, prefix = split_s3(location)
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    except ImportError:
        raise ArtifactStoreError(f"artifacts: {location} needs boto3; install it with "
                                 "pip install 'hpsearch[s3]'") from None
    try:
        client = boto3.client("s3")
    except (BotoCoreError, ValueError) as err:  # e.g. an empty AWS_DEFAULT_REGION or a malformed endpoint
        raise ArtifactStoreError(f"artifacts: no S3 client for {location} ({err}); check AWS_ENDPOINT_URL and "
                                 "AWS_DEFAULT_REGION in the environment") from None
    where = f"{location} (endpoint {client.meta.endpoint_url})"
    try:
        client.head_bucket(Bucket=bucket)  # once per process: a wrong name or key fails here, not mid-trial
    except NoCredentialsError:
        raise ArtifactStoreError(f"artifacts: no AWS credentials for {where}; set AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment") from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise ArtifactStoreError(f"artifacts: bucket {bucket!r} does not exist at {where}; create it or "
                                     "fix --artifacts / [study] artifacts") from None
        if code in ("403", "AccessDenied"):
            raise ArtifactStoreError(f"artifacts: access to bucket {bucket!r} denied at {where}; the credentials "
                                     "in the environment need s3:ListBucket, and s3:GetObject, s3:PutObject and "
                                     "s3:DeleteObject under the prefix") from None
        raise ArtifactStoreError(f"artifacts: {where}: {err}") from None
    except BotoCoreError as err:
        raise ArtifactStoreError(f"artifacts: cannot reach {where}: {err}; check AWS_ENDPOINT_URL") from None
    return S3ArtifactStore(bucket, prefix, client)


def remove_artifact(store: ArtifactStore, artifact_id: str) -> bool:
    """Delete one artifact; False if it was already gone or could not be deleted (never raises)."""
    try:
        store.remove(artifact_id)
    except ArtifactNotFound:
        return False
    except Exception as err:  # clean-up must never replace the error or result the caller is handling
        logging.getLogger(__name__).warning("could not delete artifact %s: %s", artifact_id, err)
        return False
    return True


WEIGHTS_FILE = "weights.safetensors"
OUTPUTS_FILE = "outputs.safetensors"

# The record optuna-dashboard lists a trial's files from, besides the trial's own system attrs.
DASHBOARD_LISTING = "dashboard:artifacts:"
OCTET_STREAM = "application/octet-stream"


@dataclass
class StudyArtifacts:
    """One study's artifact store as its trials write to it: each file uploaded whole under a new id, listed for
    the dashboard (unless transient), and on deletion removed from the store and from that listing."""

    store: ArtifactStore
    storage: optuna.storages.BaseStorage
    study_name: str
    location: str  # a folder or s3://bucket/prefix, for messages
    sizes: dict[str, int] = field(default_factory=dict)  # file name -> bytes, as last uploaded (or tried)
    _ids: dict[int, int] = field(default_factory=dict, repr=False)  # trial number -> trial id

    def upload(self, trial_number: int, path: Path, *, listed: bool = True) -> str:
        """Write the file at `path` to the store; its artifact id. A store without room raises StoreFullError."""
        artifact_id = str(uuid.uuid4())
        self.sizes[path.name] = path.stat().st_size
        try:
            with open(path, "rb") as body:
                self.store.write(artifact_id, body)
        except Exception as err:
            reason = store_full_reason(err)
            if reason is None:
                raise
            raise StoreFullError(f"{reason} writing {path.name} to {self.location}") from None
        if listed:
            meta = {"artifact_id": artifact_id, "filename": path.name, "mimetype": OCTET_STREAM, "encoding": None}
            self._list(trial_number, artifact_id, meta)
        return artifact_id

    def delete(self, trial_number: int, artifact_id: str) -> bool:
        """Remove the artifact and its dashboard entry; False if it was already gone (never raises)."""
        removed = remove_artifact(self.store, artifact_id)
        try:
            self._list(trial_number, artifact_id, None)
        except Exception as err:  # clean-up must never replace the error or result the caller is handling
            logging.getLogger(__name__).warning("could not unlist artifact %s: %s", artifact_id, err)
        return removed

    def _list(self, trial_number: int, artifact_id: str, meta: dict[str, Any] | None) -> None:
        study_id = self.storage.get_study_id_from_name(self.study_name)
        if trial_number not in self._ids:
            self._ids[trial_number] = self.storage.get_trial_id_from_study_id_trial_number(study_id, trial_number)
        key = f"{DASHBOARD_LISTING}{self._ids[trial_number]}:{artifact_id}"
        self.storage.set_study_system_attr(study_id, key, json.dumps(meta))  # the dashboard json.loads the value


# ----------------------------------------------------------------------------------------- a full store



# S3 error codes that mean "no room" (AWS, MinIO, Ceph): the run stops at once instead of failing trial after trial.
S3_FULL_CODES = ("QuotaExceeded", "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "InsufficientStorage",
                 "StorageFull", "XAmzContentSHA256Mismatch-NoSpace")
_S3_CODE = re.compile(r"\(([A-Za-z0-9-]+)\)")


def store_full_reason(err: BaseException) -> str | None:
    """Why a write failed for want of room ("no space left", "disk quota exceeded", an S3 code), else None."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left" if err.errno == errno.ENOSPC else "disk quota exceeded"
    response = getattr(err, "response", None)  # botocore's ClientError
    codes = [str(response.get("Error", {}).get("Code", ""))] if isinstance(response, dict) else []
    codes += _S3_CODE.findall(str(err))  # boto3's S3UploadFailedError carries the code in its text only
    full = [code for code in codes if code in S3_FULL_CODES]
    return f"S3 {full[0]}" if full else None


def free_bytes(location: str) -> int | None:
    """Free space where a folder store lives; None for S3 (its quota is the server's)."""
    if is_s3(location):
        return None
    path = Path(location)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


# ------------------------------------------------------------------------------------ a trial's files


@dataclass(frozen=True)
class TrialOutputs:
    val_logits: torch.Tensor  # float32 [n_val, classes], split order
    test_logits: torch.Tensor  # float32 [n_test, classes], split order
    split_sha256: str
    val_labels: torch.Tensor  # int64 [n_val]: the ensemble scores outputs without reloading the data
    test_labels: torch.Tensor  # int64 [n_test]
    # A fold model's outputs ([data] folds): its validation images' pool indices, the study's folds, the fold.
    val_index: torch.Tensor | None = None  # int64 [n_val]
    folds_sha256: str = ""
    fold: int | None = None
    # The calibration split's (hpsearch.data), on which the ensemble fits; None where the study has none.
    calibration_logits: torch.Tensor | None = None  # float32 [n_calibration, classes]
    calibration_labels: torch.Tensor | None = None  # int64 [n_calibration]


def upload_trial_artifacts(
    files: StudyArtifacts,
    trial: optuna.Trial,
    state_dict: dict[str, torch.Tensor],
    outputs: TrialOutputs,
    metadata: dict[str, str],
) -> dict[str, str]:
    """Write both files completely, upload them, and return their artifact ids (also set as user attrs)."""
    ids = upload_model_files(files, trial.number, state_dict, outputs, metadata)
    for key, value in ids.items():
        trial.set_user_attr(key, value)
    return ids


def upload_model_files(files: StudyArtifacts, trial_number: int, state_dict: dict[str, torch.Tensor],
                       outputs: TrialOutputs, metadata: dict[str, str]) -> dict[str, str]:
    """One model's weights and outputs, uploaded; {keys.WEIGHTS: id, keys.OUTPUTS: id}.

    All or nothing: if the second upload fails, the first is deleted again, so no file without its trial's
    record stays in the store."""
    from safetensors.torch import save_file  # torch: only where tensors are written (`status` reads no tensor)

    with tempfile.TemporaryDirectory(prefix="hpsearch-") as tmp:
        weights = Path(tmp) / WEIGHTS_FILE
        save_file(state_dict, str(weights), metadata=metadata)
        out = Path(tmp) / OUTPUTS_FILE
        tensors = {"val_logits": outputs.val_logits.contiguous(), "test_logits": outputs.test_logits.contiguous(),
                   "val_labels": outputs.val_labels.contiguous(), "test_labels": outputs.test_labels.contiguous()}
        out_meta = {"split_sha256": outputs.split_sha256}
        if outputs.val_index is not None:
            tensors["val_index"] = outputs.val_index.contiguous()
            out_meta.update(folds_sha256=outputs.folds_sha256, fold=str(outputs.fold))
        if outputs.calibration_logits is not None and outputs.calibration_labels is not None:
            tensors["calibration_logits"] = outputs.calibration_logits.contiguous()
            tensors["calibration_labels"] = outputs.calibration_labels.contiguous()
        save_file(tensors, str(out), metadata=out_meta)
        ids: dict[str, str] = {}
        try:
            for key, path in ((keys.WEIGHTS, weights), (keys.OUTPUTS, out)):
                ids[key] = files.upload(trial_number, path)
        except BaseException:
            for artifact_id in ids.values():
                files.delete(trial_number, artifact_id)
            raise
    return ids


def download_to(store: ArtifactStore, artifact_id: str, folder: Path, name: str) -> Path:
    path = folder / name
    download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(path))
    return path


def load_weights(store: ArtifactStore, artifact_id: str) -> dict[str, torch.Tensor]:
    """A weights.safetensors artifact as a state dict (safetensors: nothing is unpickled)."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="hpsearch-") as tmp:
        return load_file(str(download_to(store, artifact_id, Path(tmp), WEIGHTS_FILE)))


def _required(artifact_id: str | None, attr: str) -> str:
    if artifact_id is None:  # like a missing file to callers (the report catches KeyError), not a crash
        raise KeyError(attr)
    return artifact_id


def load_trial_weights(store: ArtifactStore, trial: optuna.trial.FrozenTrial) -> dict[str, torch.Tensor]:
    return load_weights(store, _required(read_trial_record(trial).weights, keys.WEIGHTS))


def load_trial_outputs(store: ArtifactStore, trial: optuna.trial.FrozenTrial) -> TrialOutputs:
    return load_outputs(store, _required(read_trial_record(trial).outputs, keys.OUTPUTS))


def load_outputs(store: ArtifactStore, artifact_id: str) -> TrialOutputs:
    """An outputs.safetensors artifact: a trial's (or, with folds, one fold model's) logits and labels."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory(prefix="hpsearch-") as tmp:
        path = download_to(store, artifact_id, Path(tmp), OUTPUTS_FILE)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            fold = meta.get("fold")
            names = set(f.keys())

            def optional(name: str) -> torch.Tensor | None:
                return f.get_tensor(name) if name in names else None

            return TrialOutputs(f.get_tensor("val_logits"), f.get_tensor("test_logits"), meta.get("split_sha256", ""),
                                f.get_tensor("val_labels"), f.get_tensor("test_labels"), optional("val_index"),
                                meta.get("folds_sha256", ""), int(fold) if fold is not None else None,
                                optional("calibration_logits"), optional("calibration_labels"))


def store_size_bytes(location: str) -> int:
    """Bytes held by the store (0 for a folder that does not exist yet)."""
    if is_s3(location):
        return _open_s3(location).size_bytes()
    path = Path(location)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
