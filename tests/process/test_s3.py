"""Artifacts in S3 (`--artifacts s3://bucket/prefix`): a whole study run by parallel workers against it, then read
back by status, the ensemble and the dashboard. The store itself and its one-line errors are in
tests/store/test_s3.py.

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
from optuna.trial import TrialState
from safetensors.torch import load_file

from hpsearch.keys import OUTPUTS as ATTR_OUTPUTS
from hpsearch.keys import WEIGHTS as ATTR_WEIGHTS
from hpsearch.store import (
    open_storage,
)
from tests.support import cli_env, free_port, run_cli, s3_keys, tiny_tables, write_study

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
    keys = s3_keys(s3_bucket)
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
