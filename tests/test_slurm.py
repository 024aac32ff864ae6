"""A worker under SLURM, from the environment SLURM gives its job: its trials name the job and array task with
their host (and `status` shows them), the array task id is its worker index, and its torch threads are the CPUs
the job holds. Bad values are one line (exit 2). The real SLURM run is tests/process/test_slurm.py.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from hpsearch import keys
from hpsearch.errors import UsageError
from hpsearch.monitor import status_renderables
from hpsearch.search import thread_share
from hpsearch.slurm import worker_index
from hpsearch.workers._supervisor import worker_env
from tests.support import run_cli

# What sbatch --array=0-1 sets in task 1 of job 1234 (SLURM_JOB_ID is the task's own job id).
ARRAY_TASK = {"SLURM_JOB_ID": "1236", "SLURM_ARRAY_JOB_ID": "1234", "SLURM_ARRAY_TASK_ID": "1"}
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_CPUS_PER_TASK")


@pytest.fixture
def outside_slurm(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """This process as if no SLURM job had started it (the CI machine may run the tests inside one)."""
    for name in (*SLURM_VARS, "HPSEARCH_THREADS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_trial_names_its_slurm_job_and_array_task_with_its_host(outside_slurm: pytest.MonkeyPatch) -> None:
    host = socket.gethostname()
    assert keys.worker_tag(4242) == f"{host}:4242"
    assert keys.slurm_job() is None

    outside_slurm.setenv("SLURM_JOB_ID", "99")  # a plain job, no array
    assert keys.worker_tag(4242) == f"{host}:4242 slurm 99"
    for name, value in ARRAY_TASK.items():
        outside_slurm.setenv(name, value)
    # The array's own notation, what scancel, squeue and sacct take: 1234_1, not the task's job id 1236.
    assert keys.worker_tag(4242) == f"{host}:4242 slurm 1234_1"
    assert keys.worker_tag() == f"{host}:{os.getpid()} slurm 1234_1"


def test_status_shows_the_slurm_job_of_a_running_trial(outside_slurm: pytest.MonkeyPatch) -> None:
    for name, value in ARRAY_TASK.items():
        outside_slurm.setenv(name, value)
    study = optuna.create_study(study_name="slurm-status", direction="maximize")
    trial = study.ask()
    trial.set_user_attr(keys.WORKER, keys.worker_tag())  # what the objective records when a trial starts
    console = Console(width=200, record=True)
    for part in status_renderables(study, "sqlite:///s.db", "artifacts", top_k=2, default_epochs=3):
        console.print(part)
    assert f"{socket.gethostname()}:{os.getpid()} slurm 1234_1" in console.export_text()


def test_the_array_task_id_is_the_worker_index_unless_one_is_given(outside_slurm: pytest.MonkeyPatch) -> None:
    assert worker_index(None) == 0
    outside_slurm.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert worker_index(None) == 7
    assert worker_index(3) == 3  # --worker-index wins


def test_torch_threads_are_the_cpus_the_slurm_job_holds(outside_slurm: pytest.MonkeyPatch) -> None:
    assert thread_share() is None  # torch's default
    outside_slurm.setenv("SLURM_CPUS_PER_TASK", "6")
    assert thread_share() == 6
    # A supervisor's share for its worker wins: `run --workers 2` inside that job gives each worker 3.
    assert worker_env(0, 2, [], 1)["HPSEARCH_THREADS"] == "3"
    outside_slurm.setenv("HPSEARCH_THREADS", "3")
    assert thread_share() == 3


@pytest.mark.parametrize(("name", "value"), [("SLURM_CPUS_PER_TASK", "0"), ("SLURM_CPUS_PER_TASK", "four"),
                                             ("SLURM_ARRAY_TASK_ID", "-1"), ("HPSEARCH_THREADS", "x")])
def test_a_bad_value_is_refused_naming_the_variable(outside_slurm: pytest.MonkeyPatch, name: str,
                                                    value: str) -> None:
    outside_slurm.setenv(name, value)
    with pytest.raises(UsageError, match=f"^{name}='{value}'"):
        worker_index(None) if name == "SLURM_ARRAY_TASK_ID" else thread_share()


def test_worker_with_a_bad_array_task_id_exits_2_in_one_line(study_file: object, tmp_path: Path) -> None:
    path = study_file("badtask")  # type: ignore[operator]
    done = run_cli("worker", str(path), "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}", cwd=tmp_path,
                   SLURM_ARRAY_TASK_ID="one")
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SLURM_ARRAY_TASK_ID='one'" in lines[0], done.stderr
    assert not (tmp_path / "db.sqlite").exists(), "refused before the storage was opened"
