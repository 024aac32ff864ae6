"""Pinning supervised workers: round-robin over the GPUs (or sharing the CPU cores), through the parent's own
CUDA_VISIBLE_DEVICES, and a GPU index the parent does not see refused in one line.
"""

from __future__ import annotations

import os

import pytest


def test_workers_are_pinned_round_robin_to_gpus_or_share_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpsearch.workers._supervisor import worker_env

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # every GPU visible: indices pass through
    gpus = [0, 1, 2]
    # One worker per GPU, round-robin past the last one.
    assert [worker_env(i, 4, gpus, 1)["CUDA_VISIBLE_DEVICES"] for i in range(4)] == ["0", "1", "2", "0"]
    # --workers-per-gpu 2 packs two neighbours on each GPU.
    assert [worker_env(i, 6, gpus, 2)["CUDA_VISIBLE_DEVICES"] for i in range(6)] == ["0", "0", "1", "1", "2", "2"]
    # CPU only: no GPU is pinned, the cores are split among the workers.
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    cpu = [worker_env(i, 4, [], 1) for i in range(4)]
    assert all("CUDA_VISIBLE_DEVICES" not in env or env["CUDA_VISIBLE_DEVICES"] == os.environ.get(
        "CUDA_VISIBLE_DEVICES") for env in cpu)
    assert {env["HPSEARCH_THREADS"] for env in cpu} == {"2"}
    assert [env["HPSEARCH_APP_NAME"] for env in cpu] == [f"hpsearch-worker-{i}" for i in range(4)]
    # GPU workers split the cores too: each feeds its GPU from the host.
    assert {worker_env(i, 4, gpus, 1)["HPSEARCH_THREADS"] for i in range(4)} == {"2"}


@pytest.mark.parametrize(("parent", "children"), [
    ("4,5", ["4", "5", "4"]),  # indices: the workers get the parent's 4 and 5, never 0 and 1
    ("GPU-8f1c2b3a-aaaa-bbbb-cccc-000000000001,GPU-8f1c2b3a-aaaa-bbbb-cccc-000000000002",
     ["GPU-8f1c2b3a-aaaa-bbbb-cccc-000000000001", "GPU-8f1c2b3a-aaaa-bbbb-cccc-000000000002",
      "GPU-8f1c2b3a-aaaa-bbbb-cccc-000000000001"]),
    ("MIG-4b2a1c3d-0000-1111-2222-333333333333, MIG-4b2a1c3d-0000-1111-2222-444444444444",
     ["MIG-4b2a1c3d-0000-1111-2222-333333333333", "MIG-4b2a1c3d-0000-1111-2222-444444444444",
      "MIG-4b2a1c3d-0000-1111-2222-333333333333"]),
])
def test_gpu_pinning_maps_through_the_parents_visible_devices(monkeypatch: pytest.MonkeyPatch, parent: str,
                                                              children: list[str]) -> None:
    from hpsearch.workers._supervisor import worker_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    assert [worker_env(i, 3, [0, 1], 1)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == children


def test_a_gpu_index_the_parent_does_not_see_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpsearch.errors import UsageError
    from hpsearch.workers._supervisor import worker_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(UsageError, match=r"--gpus 2: this process sees 2 GPU\(s\)"):
        worker_env(0, 1, [2], 1)
