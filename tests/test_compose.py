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
    for name in ("postgres:", "dashboard:", "worker:", "worker-gpu0:", "worker-gpu1:", "export:"):
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
