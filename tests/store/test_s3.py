"""The S3 artifact store (`--artifacts s3://bucket/prefix`): the store itself and its one-line errors. A whole study
run by parallel workers against it is in tests/process/test_s3.py.

The server is moto's S3 server over HTTP on 127.0.0.1; boto3 reaches it through AWS_ENDPOINT_URL, as it would
reach MinIO or AWS."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.artifacts import download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from hpsearch.errors import ArtifactStoreError
from hpsearch.store import (
    open_artifact_store,
    open_storage,
    remove_artifact,
    resolve_artifacts,
    store_size_bytes,
)
from tests.support import run_cli, s3_keys, tiny_tables, write_study


def test_s3_store_keeps_every_key_under_its_prefix(s3_bucket: str, tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    trial = study.ask()
    store = open_artifact_store(f"s3://{s3_bucket}/team/study-a/")
    neighbour = open_artifact_store(f"s3://{s3_bucket}/team/study-b")
    payload = tmp_path / "weights.bin"
    payload.write_bytes(bytes(range(256)) * 1000)

    artifact_id = upload_artifact(artifact_store=store, file_path=str(payload), study_or_trial=trial)
    assert s3_keys(s3_bucket) == {f"team/study-a/{artifact_id}": 256_000}
    download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == payload.read_bytes()
    assert store_size_bytes(f"s3://{s3_bucket}/team/study-a") == 256_000
    assert store_size_bytes(f"s3://{s3_bucket}/team/study-b") == 0
    with pytest.raises(ArtifactNotFound):
        neighbour.open_reader(artifact_id)  # another prefix is another store

    assert remove_artifact(store, artifact_id)
    assert s3_keys(s3_bucket) == {}
    with pytest.raises(ArtifactNotFound):
        store.open_reader(artifact_id)


def test_s3_location_is_normalised_and_chosen_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPSEARCH_ARTIFACTS", raising=False)
    assert resolve_artifacts("s3://bucket/a/b/", None, None) == "s3://bucket/a/b"
    assert resolve_artifacts(None, None, "s3://bucket") == "s3://bucket"
    assert resolve_artifacts("store", None, "s3://bucket") == str(Path("store").resolve())
    with pytest.raises(ArtifactStoreError, match="is not an S3 location"):
        resolve_artifacts("s3:///prefix", None, None)
    # The environment (docker-compose sets it) comes after --artifacts and before the study file.
    monkeypatch.setenv("HPSEARCH_ARTIFACTS", "s3://env-bucket/p/")
    assert resolve_artifacts(None, None, "s3://bucket") == "s3://env-bucket/p"
    assert resolve_artifacts("s3://cli-bucket", None, "s3://bucket") == "s3://cli-bucket"


def test_a_missing_bucket_is_one_line_naming_it(s3_endpoint: str) -> None:
    with pytest.raises(ArtifactStoreError) as raised:
        open_artifact_store("s3://no-such-bucket/x")
    message = str(raised.value)
    assert "bucket 'no-such-bucket' does not exist" in message and s3_endpoint in message
    assert "\n" not in message


@pytest.mark.parametrize(("case", "env", "expected"), [
    ("missing bucket", {}, "bucket 'no-such-bucket' does not exist"),
    ("no credentials", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"},
     "no AWS credentials"),
    ("unreachable endpoint", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1",
                              "AWS_RETRY_MODE": "standard"}, "cannot reach"),
])
# ------------------------------------------------------------------------------------- bad input, CLI


def test_run_with_an_unusable_s3_store_exits_2_before_training(case: str, env: dict[str, str | None],
                                                               expected: str,
                                                               s3_endpoint: str, tmp_path: Path) -> None:
    study = write_study(tmp_path / "s3bad.toml", tiny_tables("s3bad"))
    done = run_cli("run", str(study), "--storage", f"sqlite:///{tmp_path / 'study.db'}",
                     "--artifacts", "s3://no-such-bucket/x", cwd=tmp_path, timeout=120, **env)
    assert done.returncode == 2, (case, done.stderr)
    assert expected in done.stderr, (case, done.stderr)
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    # Refused before any study or trial: the user fixes the store and runs the same command again.
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert [s.study_name for s in storage.get_all_studies()] == []


def test_a_malformed_s3_location_in_the_study_file_names_the_field(tmp_path: Path) -> None:
    study = write_study(tmp_path / "s3cfg.toml", tiny_tables("s3cfg", study={"artifacts": "s3:///prefix-only"}))
    done = run_cli("check", str(study), cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "study.artifacts" in done.stderr and "s3://BUCKET/PREFIX" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
