"""Artifacts in S3 (`--artifacts s3://bucket/prefix`): the store itself, its one-line errors, and a whole
study run by parallel workers against it, then read back by status, the ensemble and the dashboard.

The server is moto's S3 server over HTTP on 127.0.0.1; boto3 in every process reaches it through
AWS_ENDPOINT_URL, as it would reach MinIO or AWS."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import optuna
import pytest
import safetensors.torch
import torch
from optuna.artifacts import download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState
from safetensors.torch import load_file

from hpsearch.errors import ArtifactStoreError
from hpsearch.keys import OUTPUTS as ATTR_OUTPUTS
from hpsearch.keys import WEIGHTS as ATTR_WEIGHTS
from hpsearch.store import (
    open_artifact_store,
    open_storage,
    remove_artifact,
    resolve_artifacts,
    store_size_bytes,
)
from tests.support import cli_env, free_port, run_cli, tiny_tables, write_study


def _keys(bucket: str, prefix: str = "") -> dict[str, int]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"]: obj["Size"] for page in pages for obj in page.get("Contents", [])}


# ----------------------------------------------------------------------------------------- the store


def test_s3_store_keeps_every_key_under_its_prefix(s3_bucket: str, tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    trial = study.ask()
    store = open_artifact_store(f"s3://{s3_bucket}/team/study-a/")
    neighbour = open_artifact_store(f"s3://{s3_bucket}/team/study-b")
    payload = tmp_path / "weights.bin"
    payload.write_bytes(bytes(range(256)) * 1000)

    artifact_id = upload_artifact(artifact_store=store, file_path=str(payload), study_or_trial=trial)
    assert _keys(s3_bucket) == {f"team/study-a/{artifact_id}": 256_000}
    download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == payload.read_bytes()
    assert store_size_bytes(f"s3://{s3_bucket}/team/study-a") == 256_000
    assert store_size_bytes(f"s3://{s3_bucket}/team/study-b") == 0
    with pytest.raises(ArtifactNotFound):
        neighbour.open_reader(artifact_id)  # another prefix is another store

    assert remove_artifact(store, artifact_id)
    assert _keys(s3_bucket) == {}
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


# ------------------------------------------------------------------------------------- bad input, CLI


@pytest.mark.parametrize(("case", "env", "expected"), [
    ("missing bucket", {}, "bucket 'no-such-bucket' does not exist"),
    ("no credentials", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"},
     "no AWS credentials"),
    ("unreachable endpoint", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1",
                              "AWS_RETRY_MODE": "standard"}, "cannot reach"),
])
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


# --------------------------------------------------------------- a whole study with its store in S3


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_parallel_workers_status_ensemble_and_dashboard_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    location = f"s3://{s3_bucket}/studies/s3run"
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study_path = write_study(tmp_path / "s3run.toml", tiny_tables(
        "s3run", study={"n_trials": 3, "keep_weights": 2}, ensemble={"top_k": 2}))

    run = run_cli("run", str(study_path), "--storage", url, "--artifacts", location, "--workers", "2",
                    cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "artifacts").exists()  # nothing fell back to a local folder

    study = optuna.load_study(study_name="s3run", storage=open_storage(url))
    assert study.user_attrs["artifacts_dir"] == location
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert 3 <= len(complete) <= 4  # n_trials, at most workers - 1 over
    best = sorted(complete, key=lambda t: (-(t.value or 0.0), t.number))[:2]
    keys = _keys(s3_bucket)
    assert all(k.startswith("studies/s3run/") for k in keys)
    stored = {k.removeprefix("studies/s3run/") for k in keys}
    # Every trial's outputs stay; weights only for the best `keep_weights`; no checkpoint is left over.
    assert stored == {t.user_attrs[ATTR_OUTPUTS] for t in complete} | {t.user_attrs[ATTR_WEIGHTS] for t in best}

    # status reads the store the study recorded (no --artifacts) and sizes it from S3.
    status = run_cli("status", str(study_path), "--storage", url, cwd=tmp_path, timeout=120)
    assert status.returncode == 0, status.stderr
    assert f"artifacts: {location} ({sum(keys.values()) / 1e6:.1f} MB)" in status.stdout, status.stdout

    # The ensemble reads outputs and weights from S3 and exports exactly the members' stored weights.
    out = tmp_path / "ensemble"
    ens = run_cli("ensemble", str(study_path), "--storage", url, "--method", "soft", "--out", str(out),
                    cwd=tmp_path, timeout=300)
    assert ens.returncode == 0, ens.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(m["trial"] for m in manifest["members"]) == sorted(t.number for t in best)
    client = boto3.client("s3")
    for member in manifest["members"]:
        trial = study.trials[member["trial"]]
        body = client.get_object(Bucket=s3_bucket, Key=f"studies/s3run/{trial.user_attrs[ATTR_WEIGHTS]}")["Body"]
        stored_state, exported = safetensors.torch.load(body.read()), load_file(out / member["file"])
        assert stored_state.keys() == exported.keys()
        assert all(torch.equal(stored_state[k], exported[k]) for k in stored_state)

    _dashboard_serves_an_artifact_from_s3(study_path, url, study, best[0], s3_bucket, tmp_path)


def _dashboard_serves_an_artifact_from_s3(study_path: Path, url: str, study: optuna.Study,
                                          trial: optuna.trial.FrozenTrial, bucket: str, cwd: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch", "dashboard", str(study_path), "--storage", url,
                             "--port", str(port)], cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    artifact_id = trial.user_attrs[ATTR_OUTPUTS]
    link = f"http://127.0.0.1:{port}/artifacts/{study._study_id}/{trial._trial_id}/{artifact_id}"
    try:
        deadline = time.monotonic() + 90
        body = None
        while body is None and time.monotonic() < deadline:
            assert proc.poll() is None, f"dashboard exited {proc.returncode}: {proc.communicate()[1]}"
            try:
                with urllib.request.urlopen(link, timeout=30) as response:
                    body = response.read()
            except OSError:
                time.sleep(0.25)
        assert body is not None, "dashboard did not answer within 90 s"
        expected = io.BytesIO(boto3.client("s3").get_object(Bucket=bucket, Key=f"studies/s3run/{artifact_id}")
                              ["Body"].read())
        assert body == expected.getvalue()
    finally:
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert re.search(r"artifacts: s3://\S+/studies/s3run\)", err), err
