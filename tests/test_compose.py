"""docker-compose.yml is valid (checked by Compose itself) and safe by default."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor `docker-compose` is installed (.ci/run installs it)")


def _config(env: dict[str, str], *profiles: str) -> subprocess.CompletedProcess[str]:
    args = [*_compose(), "-f", str(ROOT / "docker-compose.yml")]
    for profile in profiles:
        args += ["--profile", profile]
    clean = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "STUDY")}
    return subprocess.run([*args, "config"], capture_output=True, text=True, cwd=ROOT, env={**clean, **env},
                          timeout=120)


def test_compose_file_is_valid_with_every_profile() -> None:
    result = _config({"POSTGRES_PASSWORD": "s3cret-for-test"}, "cpu", "gpu", "tools")
    assert result.returncode == 0, result.stderr
    services = result.stdout
    for name in ("postgres:", "storage-proxy:", "dashboard:", "worker:", "worker-gpu0:", "worker-gpu1:", "export:"):
        assert name in services


def test_password_must_come_from_the_environment() -> None:
    result = _config({})
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr
    assert "s3cret" not in (ROOT / "docker-compose.yml").read_text()


def _services(*profiles: str) -> dict[str, dict[str, object]]:
    result = _config({"POSTGRES_PASSWORD": "x"}, *profiles)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def test_dashboard_is_published_on_loopback_only() -> None:
    dashboard = _services()["dashboard"]
    ports = dashboard["ports"]
    assert ports, "the dashboard publishes its port"
    for port in ports:
        host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
        # No authentication and endpoints that delete studies: loopback only on the host.
        assert host_ip == "127.0.0.1", port
    assert "--allow-remote" in dashboard["command"]


def test_gpu_workers_are_pinned_to_distinct_gpus() -> None:
    services = _services("gpu")
    pinned = []
    for name in ("worker-gpu0", "worker-gpu1"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        pinned += [tuple(d["device_ids"]) for d in devices]
        assert services[name]["restart"] == "on-failure"
    assert sorted(pinned) == [("0",), ("1",)]


S3_ENV = {"HPSEARCH_ARTIFACTS": "s3://team-bucket/hpsearch", "AWS_ENDPOINT_URL": "http://minio:9000",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "key-for-test",
          "AWS_SECRET_ACCESS_KEY": "secret-for-test"}


def _config_s3(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    args = [*_compose(), "-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker-compose.s3.yml"),
            "--profile", "cpu", "--profile", "gpu", "--profile", "tools", "config"]
    clean = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "STUDY", *S3_ENV)}
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**clean, **env}, timeout=120)


def test_every_hpsearch_service_uses_one_artifact_store() -> None:
    for name, service in _services("cpu", "gpu", "tools").items():
        if name not in ("postgres", "storage-proxy"):
            assert service["environment"]["HPSEARCH_ARTIFACTS"] == "/artifacts", name
            assert "--artifacts" not in str(service.get("command")) + str(service.get("entrypoint")), name


def test_every_hpsearch_service_reaches_the_study_through_the_storage_proxy() -> None:
    services = _services("cpu", "gpu", "tools")
    proxy = services.pop("storage-proxy")
    postgres = services.pop("postgres")
    # Only the proxy holds the database URL (and its password, from .env); it is never published on the host.
    assert proxy["environment"]["HPSEARCH_STORAGE"].startswith("postgresql+psycopg://hpsearch:")
    assert "ports" not in proxy and proxy["command"][0] == "storage-proxy" and "--allow-remote" in proxy["command"]
    assert proxy["depends_on"]["postgres"]["condition"] == "service_healthy" and "healthcheck" in proxy
    assert "healthcheck" in postgres
    for name, service in services.items():
        assert service["environment"]["HPSEARCH_STORAGE"] == "grpc://storage-proxy:13000", name
        assert service["depends_on"]["storage-proxy"]["condition"] == "service_healthy", name


def test_s3_override_puts_every_hpsearch_service_on_s3_with_secrets_from_the_environment() -> None:
    result = _config_s3({"POSTGRES_PASSWORD": "x", **S3_ENV})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name, service in services.items():
        if name in ("postgres", "storage-proxy"):  # neither touches the artifacts
            assert "AWS_SECRET_ACCESS_KEY" not in service["environment"]
            continue
        for key, value in S3_ENV.items():
            assert service["environment"][key] == value, (name, key)
    committed = (ROOT / "docker-compose.s3.yml").read_text() + (ROOT / ".env.example").read_text()
    assert "secret-for-test" not in committed and "key-for-test" not in committed


@pytest.mark.parametrize("missing", sorted(S3_ENV))
def test_s3_override_refuses_to_start_without_each_setting(missing: str) -> None:
    result = _config_s3({"POSTGRES_PASSWORD": "x", **{k: v for k, v in S3_ENV.items() if k != missing}})
    assert result.returncode != 0
    assert missing in result.stderr
