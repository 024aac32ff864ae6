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


def test_a_gpu_worker_takes_its_share_of_the_cpu_threads(tmp_path) -> None:
    """HPSEARCH_THREADS (a worker's share, from worker_env) is applied when the worker opens its run on a GPU
    too, intra-op and inter-op: N GPU workers each taking every core would fight over gathers and host copies.
    A fresh process (thread settings hold for a process's life) that sees a CUDA device (faked: none here)."""
    import subprocess
    import sys

    from tests.support import cli_env, tiny_tables, write_study

    study = write_study(tmp_path / "s.toml", tiny_tables())
    share = (os.cpu_count() or 1) + 1  # unlike torch's defaults (the core count), whatever the machine
    script = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "from hpsearch.search import open_run\n"
        f"run = open_run({str(study)!r}, device='cuda', storage='sqlite:///{tmp_path}/s.db',"
        f" artifacts={str(tmp_path / 'a')!r})\n"
        "print(run.device.type, torch.get_num_threads(), torch.get_num_interop_threads())\n")
    done = subprocess.run([sys.executable, "-c", script], env=cli_env(HPSEARCH_THREADS=str(share)), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["cuda", str(share), str(share)]
