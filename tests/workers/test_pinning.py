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


def test_each_gpu_worker_is_told_how_many_workers_share_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """What divides the GPU memory a worker may keep its data in (hpsearch.data placement_for)."""
    from hpsearch.workers._supervisor import worker_env

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def sharers(n: int, gpus: list[int], per_gpu: int) -> list[str]:
        return [worker_env(i, n, gpus, per_gpu)["HPSEARCH_GPU_SHARERS"] for i in range(n)]

    assert sharers(6, [0, 1, 2], 2) == ["2"] * 6  # --workers-per-gpu 2
    assert sharers(4, [0, 1, 2], 1) == ["2", "1", "1", "2"]  # round-robin puts worker 3 beside worker 0
    assert sharers(3, [0, 1], 2) == ["2", "2", "1"]
    assert sharers(2, [3, 3], 1) == ["2", "2"]  # one GPU named twice
    assert "HPSEARCH_GPU_SHARERS" not in worker_env(0, 2, [], 1)


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


def _auto_study(tmp_path) -> str:
    from tests.support import tiny_tables, write_study

    return str(write_study(tmp_path / "s.toml", tiny_tables(train={"device": "auto"})))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA sees a GPU here")
@pytest.mark.parametrize("extra", [["--gpus", "0"], ["--gpus", "0", "--workers", "2"],
                                   ["--gpus", "0", "--device", "cpu"]])
def test_gpus_where_cuda_sees_none_is_one_line_and_no_trial(tmp_path, extra: list[str]) -> None:
    """On a machine where CUDA sees no GPU (here: this one, with or without a CUDA build of torch), `run --gpus`
    used to train on the CPU without a word. Now one line, exit 2, before the study even exists."""
    import optuna

    from hpsearch.errors import ExitCode
    from tests.support import run_cli

    url = f"sqlite:///{tmp_path / 's.db'}"
    done = run_cli("run", _auto_study(tmp_path), "--storage", url, *extra, cwd=tmp_path)
    assert done.returncode == ExitCode.BAD_INPUT, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --gpus 0: "), done.stderr
    assert ("the study trains on the cpu" if "cpu" in extra else "CUDA sees no GPU here") in lines[0]
    assert optuna.study.get_all_study_names(url) == []


def _prepare_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --gpus` prepares its study in a spawned child (hpsearch.cli._prepare), which would not see the CUDA
    these tests fake in their own process: here the preparation runs in the test's process."""
    from hpsearch.cli import _prepare

    monkeypatch.setattr(_prepare, "prepare", _prepare.prepared_in_this_process)


def test_a_gpu_cuda_does_not_see_is_one_line(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import torch

    from hpsearch.cli import main
    from hpsearch.errors import ExitCode

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # a machine with two GPUs
    _prepare_in_this_process(monkeypatch)
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["run", _auto_study(tmp_path), "--storage", url, "--gpus", "1,3"]) == ExitCode.BAD_INPUT
    assert capsys.readouterr().err.strip() == "error: --gpus 1,3: CUDA sees 2 GPU(s) here; give indices 0..1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert main(["run", _auto_study(tmp_path), "--storage", url, "--gpus", "2"]) == ExitCode.BAD_INPUT
    assert "CUDA sees 2 GPU(s) here (CUDA_VISIBLE_DEVICES=4,5); give indices 0..1" in capsys.readouterr().err


def test_one_worker_with_gpus_runs_pinned_to_that_gpu(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --gpus 3` with one worker used to train inside `run` on cuda:0, unpinned. It starts one worker process
    pinned to GPU 3 (CUDA_VISIBLE_DEVICES, set before CUDA starts in it), on a machine of four GPUs (faked: the
    worker launched is a real process that records what it was started with, then exits)."""
    import json
    import sys

    import optuna
    import torch

    import hpsearch.workers._supervisor as supervisor
    from hpsearch.cli import main

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    _prepare_in_this_process(monkeypatch)
    seen = tmp_path / "worker.json"
    record = ("import json, os, sys; open(sys.argv[1], 'w').write(json.dumps("
              "[os.environ.get('CUDA_VISIBLE_DEVICES'), sys.argv[2:]]))")
    monkeypatch.setattr(supervisor, "worker_command",
                        lambda args: [sys.executable, "-c", record, str(seen), *args])
    url = f"sqlite:///{tmp_path / 's.db'}"
    main(["run", _auto_study(tmp_path), "--storage", url, "--gpus", "3", "--artifacts", str(tmp_path / "a")])
    visible, argv = json.loads(seen.read_text())
    assert visible == "3"
    assert argv[argv.index("--device") + 1] == "cuda"
    assert optuna.load_study(study_name="tiny", storage=url).get_trials() == []  # nothing trained in `run`
