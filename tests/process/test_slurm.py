"""deploy/slurm/hpsearch-workers.sbatch on a real SLURM (a single-node slurmctld + slurmd the test starts: see
tests/support/_slurm.py), against a fresh PostgreSQL database:

- `sbatch --wait --array=0-1`: the study finishes with trials from both array tasks, each trial naming its job
  and task, nothing left RUNNING;
- `scancel` of one array task mid-trial, and the SIGTERM to the batch shell that `--signal=B:TERM@120` sends before
  the time limit: that task's trial ends FAIL with one retry queued and its checkpoint kept; the other task's
  worker runs the retry from that checkpoint; nothing is left RUNNING;
- `scontrol requeue` of one task mid-trial (--requeue; what preemption with PreemptMode=REQUEUE does): the task
  comes back and its new worker resumes the trial from its checkpoint.

The machine has no GPU: the jobs ask `--gres=none --cpus-per-task=1`, overriding the script's `--gres=gpu:1`, as
a user on CPU nodes does. Each trial holds after its first epoch's checkpoint (HPSEARCH_TEST_HOLD) until the
test releases it, so both tasks hold a trial at once and the cancel lands mid-trial, however loaded the machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from optuna.trial import FrozenTrial, TrialState

from hpsearch._testhooks import HOLD_ENV
from tests.support import (
    SlurmCluster,
    postgres_database,
    process_env,
    slurm_cluster,
    states_of,
    trials_of,
    wait_until,
)

SBATCH = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "hpsearch-workers.sbatch"
SRC = Path(__file__).resolve().parents[2] / "src"
HELD_S = 240.0  # from sbatch until both tasks hold a trial: scheduling, then imports and data on 2 loaded cores
CANCEL_TO_FAIL_S = 30.0  # scancel's SIGTERM until the trial is FAIL: within KillWait, before SIGKILL


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    yield from slurm_cluster(tmp_path_factory.mktemp("slurm"))


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from postgres_database()


def _submit(cluster: SlurmCluster, study: Path, folder: Path, url: str, release: Path) -> subprocess.Popen[str]:
    """`sbatch --wait --array=0-1` of the script on `study`, as a user submits it: the storage in
    HPSEARCH_STORAGE, `hpsearch` on PATH (this tree's, through a wrapper), no GPU asked."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "hpsearch"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{SRC}" exec "{sys.executable}" -m hpsearch "$@"\n')
    wrapper.chmod(0o755)
    env = {**process_env(), **cluster.env, "HPSEARCH_STORAGE": url, "HPSEARCH_ARTIFACTS": str(folder / "artifacts"),
           "HPSEARCH_THREADS": "", HOLD_ENV: f"1:{release}", "PATH": f"{bin_dir}:{process_env()['PATH']}"}
    argv = ["sbatch", "--wait", "--array=0-1", "--gres=none", "--cpus-per-task=1", "--parsable",
            f"--chdir={folder}", f"--output={folder}/task-%A_%a.out", str(SBATCH), str(study)]
    return subprocess.Popen(argv, env=env, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _job_id(sbatch: subprocess.Popen[str]) -> str:
    """What `sbatch --parsable` prints first: the array job's id."""
    assert sbatch.stdout is not None
    line = sbatch.stdout.readline().strip()
    assert line, f"sbatch printed no job id: {sbatch.stderr.read() if sbatch.stderr else ''}"
    return line.split(";")[0]


def _held_by_both_tasks(url: str, name: str, job: str, cluster: SlurmCluster, folder: Path
                        ) -> dict[str, FrozenTrial]:
    """Wait until each array task holds a trial after its first epoch; the held trial of `JOB_0` and `JOB_1`."""

    def held() -> dict[str, FrozenTrial]:
        running = [t for t in trials_of(url, name) if t.state == TrialState.RUNNING
                   and t.user_attrs.get("checkpoint_epoch") == 1]
        by_task = {tag.rsplit(" ", 1)[1]: t for t in running
                   if " slurm " in (tag := t.user_attrs.get("worker", ""))}
        if not cluster.jobs():
            pytest.fail(f"the job ended before both tasks held a trial:\n{_outputs(folder)}\n{cluster.logs()}")
        return by_task if set(by_task) == {f"{job}_0", f"{job}_1"} else {}

    return wait_until("a held trial in each array task", held, timeout=HELD_S, every=0.5)


def _outputs(folder: Path) -> str:
    return "\n".join(f"--- {out.name}\n{out.read_text(errors='replace')[-3000:]}"
                     for out in sorted(folder.glob("task-*.out")))


def _finish(sbatch: subprocess.Popen[str], folder: Path, timeout: float = 300) -> int:
    try:
        return sbatch.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sbatch --wait did not return within {timeout:.0f} s:\n{_outputs(folder)}")


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(600)
def test_a_job_array_runs_the_study_with_a_worker_per_task(cluster: SlurmCluster, postgres_url: str,
                                                          study_file: Callable[..., Path], tmp_path: Path) -> None:
    n_trials = 3
    path = study_file("slurm", study={"n_trials": n_trials}, train={"epochs": 2, "checkpoint_every": 1})
    release = tmp_path / "release"
    sbatch = _submit(cluster, path, tmp_path, postgres_url, release)
    job = _job_id(sbatch)
    held = _held_by_both_tasks(postgres_url, "slurm", job, cluster, tmp_path)
    release.touch()

    code = _finish(sbatch, tmp_path)
    assert code == 0, f"sbatch --wait exited {code}: {sbatch.stderr.read() if sbatch.stderr else ''}\n" \
                      f"{_outputs(tmp_path)}"
    trials = trials_of(postgres_url, "slurm")
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], states_of(trials)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= n_trials, states_of(trials)
    tasks = {t.user_attrs["worker"].rsplit(" ", 1)[1] for t in finished}
    assert tasks == {f"{job}_0", f"{job}_1"}, "both array tasks ran trials, each named by its job and task"
    assert {t.number for t in held.values()} <= {t.number for t in finished}
    outputs = _outputs(tmp_path)
    assert "worker 0 " in outputs and "worker 1 " in outputs, "each task's array id is its worker index"


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(600)
# `scancel`: SIGTERM to every process of the task, SIGKILL after KillWait (as preemption with its GraceTime).
# `--batch --signal=TERM`: SIGTERM to the batch shell only, what `--signal=B:TERM@120` sends before the time
# limit; it reaches the worker only because the script execs it.
@pytest.mark.parametrize("scancel", [["scancel"], ["scancel", "--batch", "--signal=TERM"]],
                         ids=["cancelled", "time-limit-signal"])
def test_scancel_of_a_task_mid_trial_fails_its_trial_and_the_retry_resumes(
        cluster: SlurmCluster, postgres_url: str, study_file: Callable[..., Path], tmp_path: Path,
        scancel: list[str]) -> None:
    path = study_file("cancel", study={"n_trials": 2}, train={"epochs": 2, "checkpoint_every": 1})
    release = tmp_path / "release"
    sbatch = _submit(cluster, path, tmp_path, postgres_url, release)
    job = _job_id(sbatch)
    held = _held_by_both_tasks(postgres_url, "cancel", job, cluster, tmp_path)
    victim = held[f"{job}_1"]

    cluster.command(*scancel, f"{job}_1")
    cancelled_at = time.monotonic()

    def victim_failed() -> bool:
        return {t.number: t.state for t in trials_of(postgres_url, "cancel")}[victim.number] == TrialState.FAIL

    wait_until(f"trial {victim.number} FAIL within {CANCEL_TO_FAIL_S:.0f} s of scancel", victim_failed,
               timeout=CANCEL_TO_FAIL_S, every=0.2)
    cancel_to_fail = time.monotonic() - cancelled_at
    release.touch()  # task 0 finishes its trial, then takes the retry

    _finish(sbatch, tmp_path)  # nonzero: one task was cancelled
    trials = trials_of(postgres_url, "cancel")
    by_number = {t.number: t for t in trials}
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], states_of(trials)
    killed = by_number[victim.number]
    assert killed.state == TrialState.FAIL
    assert killed.user_attrs.get("interrupted"), killed.user_attrs
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1, states_of(trials)
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE, (retry.state.name, _outputs(tmp_path))
    assert retry.params == killed.params
    assert retry.user_attrs["resumed_from"] == {"trial": victim.number, "epochs_done": 1}
    assert retry.user_attrs["worker"].endswith(f" slurm {job}_0"), "the surviving task ran the retry"
    print(f"\nSLURM scancel of a task mid-trial: its trial FAIL {cancel_to_fail:.1f} s after, retried from epoch 1")


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(600)
def test_a_requeued_task_comes_back_and_resumes_its_trial_from_the_checkpoint(
        cluster: SlurmCluster, postgres_url: str, study_file: Callable[..., Path], tmp_path: Path) -> None:
    # `scontrol requeue` does what preemption with PreemptMode=REQUEUE does to a --requeue job: SIGTERM, then the
    # task back in the queue. The other task stays held, so only the requeued task's new worker can take the retry.
    path = study_file("requeue", study={"n_trials": 2}, train={"epochs": 2, "checkpoint_every": 1})
    release = tmp_path / "release"
    sbatch = _submit(cluster, path, tmp_path, postgres_url, release)
    job = _job_id(sbatch)
    victim = _held_by_both_tasks(postgres_url, "requeue", job, cluster, tmp_path)[f"{job}_1"]

    cluster.command("scontrol", "requeue", f"{job}_1")
    # SLURM holds a requeued job for a while (BeginTime, about 2 minutes); a test has no minutes to wait.
    wait_until("the requeued task pending", lambda: "PENDING" in cluster.command(
        "squeue", "--noheader", "--array", f"--jobs={job}_1", "--format=%T").stdout, timeout=60, every=0.5)
    cluster.command("scontrol", "update", f"JobId={job}_1", "StartTime=now")

    def resumed() -> FrozenTrial | None:
        return next((t for t in trials_of(postgres_url, "requeue") if t.system_attrs.get("failed_trial")
                     == victim.number and t.state in (TrialState.RUNNING, TrialState.COMPLETE)), None)

    retry = wait_until("the requeued task running the retry", resumed, timeout=HELD_S, every=0.5)
    release.touch()
    _finish(sbatch, tmp_path)

    trials = trials_of(postgres_url, "requeue")
    by_number = {t.number: t for t in trials}
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], states_of(trials)
    assert by_number[victim.number].state == TrialState.FAIL
    retry = by_number[retry.number]
    assert retry.state == TrialState.COMPLETE, (retry.state.name, _outputs(tmp_path))
    assert retry.user_attrs["resumed_from"] == {"trial": victim.number, "epochs_done": 1}
    assert retry.user_attrs["worker"].endswith(f" slurm {job}_1"), "the requeued task's worker ran it"
    assert retry.user_attrs["worker"] != victim.user_attrs["worker"], "a new worker process, after the requeue"
