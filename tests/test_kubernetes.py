"""deploy/kubernetes: every manifest valid against the Kubernetes API schema of a named version (offline, the
schemas kubernetes-validate ships), and wired as the README says: the database URL reaches the storage proxy
only, the workers and the dashboard point at the proxy's Service, each worker pod gets one GPU and a grace
period to end its trial, and every container's arguments parse as the hpsearch command they run."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpsearch.cli._parser import build_parser
from hpsearch.config import read_study_file

KUBERNETES = "1.34.0"  # the API version the manifests are checked against
DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
PROXY_PORT = 13000


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def _resources() -> list[dict[str, Any]]:
    return [doc for name in _kustomization()["resources"]
            for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def _named(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in _resources():
        template = doc.get("spec", {}).get("template")
        if template:
            for container in template["spec"]["containers"]:
                yield doc["metadata"]["name"], container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_every_manifest_validates_against_the_kubernetes_api_schema() -> None:
    import kubernetes_validate

    listed = set(_kustomization()["resources"])
    assert listed == {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}, "every manifest is applied"
    for doc in _resources():
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises on an unknown or mistyped field


def test_a_schema_violation_is_caught() -> None:
    import kubernetes_validate

    job = _named("Job", "hpsearch-workers")
    for spec in ({**job["spec"], "completions": "four"},  # a mistyped value
                 {**job["spec"], "gpusPerPod": 1}):  # a field the API does not have
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate({**job, "spec": spec}, KUBERNETES, strict=True)


def test_the_database_url_reaches_the_storage_proxy_only() -> None:
    holders = [name for name, container in _containers() if "hpsearch-database" in str(container)]
    assert holders == ["hpsearch-storage-proxy"]
    proxy = _env(dict(_containers())["hpsearch-storage-proxy"])
    assert proxy["HPSEARCH_STORAGE"] == {"secretKeyRef": {"name": "hpsearch-database", "key": "url"}}
    assert not [d for d in _resources() if d["kind"] == "Secret"], "the Secret is created by hand, never committed"


def test_workers_and_dashboard_reach_the_proxy_through_its_service() -> None:
    service = _named("Service", "hpsearch-storage-proxy")
    deployment = _named("Deployment", "hpsearch-storage-proxy")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]
                       ["ports"]}
    assert port["port"] == PROXY_PORT and container_ports[port["targetPort"]] == PROXY_PORT
    for name in ("hpsearch-workers", "hpsearch-dashboard"):
        assert _env(dict(_containers())[name])["HPSEARCH_STORAGE"] == f"grpc://hpsearch-storage-proxy:{PROXY_PORT}"


def test_workers_are_an_indexed_job_with_one_gpu_and_time_to_end_their_trials() -> None:
    job = _named("Job", "hpsearch-workers")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] >= 60
    index = _env(worker)["WORKER_INDEX"]
    assert index == {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert "$(WORKER_INDEX)" in worker["args"]


def test_the_dashboard_stays_inside_the_cluster_and_needs_its_token() -> None:
    assert _named("Service", "hpsearch-dashboard")["spec"]["type"] == "ClusterIP"
    assert not [d for d in _resources() if d["kind"] == "Ingress"]
    assert "--allow-remote" in dict(_containers())["hpsearch-dashboard"]["args"]  # the token is then required


def test_every_container_runs_a_real_hpsearch_command() -> None:
    parser = build_parser()
    images = {image["name"] for image in _kustomization()["images"]}
    for name, container in _containers():
        assert container["image"] in images, f"{name}: its image is the one kustomization sets"
        args = [re.sub(r"\$\((\w+)\)", "0", arg) for arg in container["args"]]  # $(VAR): Kubernetes fills it
        parsed = parser.parse_args(args)
        assert parsed.handler, name


def test_the_study_config_map_is_a_valid_study_file_mounted_where_the_workers_read_it() -> None:
    (generator,) = _kustomization()["configMapGenerator"]
    (file,) = generator["files"]
    cfg = read_study_file(DEPLOY / file)
    assert cfg.study.storage is None, "the storage comes from the proxy, never from the study file"
    pod = _named("Job", "hpsearch-workers")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    study_volume = next(n for n, v in volumes.items() if v.get("configMap", {}).get("name") == generator["name"])
    worker_args = pod["containers"][0]["args"]
    assert f"{mounts[study_volume]}/{file}" == worker_args[1]
