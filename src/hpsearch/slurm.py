"""What SLURM tells a worker it started, through its environment: its array task id and the CPUs it holds.

A worker launched by deploy/slurm/hpsearch-workers.sbatch reads these: the array task id is its worker index, and
its CPU threads are the CPUs the job was given on a node that other jobs share (its trials name the job and array
task with their host: `keys.worker_tag`). Outside SLURM every function answers None.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from hpsearch.errors import UsageError

ARRAY_TASK_ID = "SLURM_ARRAY_TASK_ID"
CPUS_PER_TASK = "SLURM_CPUS_PER_TASK"


def array_task_index(env: Mapping[str, str] = os.environ) -> int | None:
    """This array task's id (SLURM_ARRAY_TASK_ID), None when the process is no array task."""
    return _whole(env, ARRAY_TASK_ID, "an array task id", minimum=0)


def worker_index(given: int | None, env: Mapping[str, str] = os.environ) -> int:
    """A worker's index (it seeds the worker's sampler): `--worker-index` when given, else its array task id, so
    that the tasks of one array draw different trials, else 0."""
    if given is not None:
        return given
    task = array_task_index(env)
    return task if task is not None else 0


def cpus_per_task(env: Mapping[str, str] = os.environ) -> int | None:
    """The CPUs the job holds per task (SLURM_CPUS_PER_TASK, set when the job asked --cpus-per-task), None
    when SLURM did not say."""
    return _whole(env, CPUS_PER_TASK, "a number of CPUs", minimum=1)


def _whole(env: Mapping[str, str], name: str, what: str, *, minimum: int) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise UsageError(f"{name}={value!r} is not {what} (a whole number from {minimum}); SLURM sets it in "
                         f"a job: unset it outside one")
    return number
