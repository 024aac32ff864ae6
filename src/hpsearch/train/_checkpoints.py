"""When a trial takes a resumable checkpoint, and writing it off the step loop.

A checkpoint is taken at the end of an epoch (the one moment the loop already waits for the device): every
`[train] checkpoint_minutes` of training by default, or every `checkpoint_every` epochs where a study says so.
Taking one only copies the state to host memory; serializing and uploading it to the artifact store happen on
one background thread while the next epoch trains. At most one write is pending: a checkpoint due while the
last one is still being written waits for it. When the trial ends, its pending write is finished (an
interrupted trial's retry resumes from it) before the trial's end is recorded, so nothing writes to a finished
trial.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from hpsearch.train._settings import TrainSettings

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointPolicy:
    """Which epoch ends take a checkpoint: every `every_epochs` epochs when set (0 = never), else once
    `minutes` of training have passed since the trial started or took its last one (0 = every epoch)."""

    every_epochs: int | None = None
    minutes: float = 5.0

    def due(self, epochs_since: int, seconds_since: float) -> bool:
        if self.every_epochs is not None:
            return self.every_epochs > 0 and epochs_since >= self.every_epochs
        return seconds_since >= self.minutes * 60


EVERY_EPOCH = CheckpointPolicy(every_epochs=1)
NEVER = CheckpointPolicy(every_epochs=0)


def checkpoint_policy(train: TrainSettings) -> CheckpointPolicy:
    """The policy a study's `[train]` section sets (checkpoint_every wins over checkpoint_minutes)."""
    return CheckpointPolicy(train.checkpoint_every, train.checkpoint_minutes)


def host_copy(state: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor copied to host memory: the optimizer's state
    dict holds its live tensors, which the next step changes while the copy is being written."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: host_copy(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(host_copy(v) for v in state)
    return state


class CheckpointWriter:
    """One background thread that runs a trial's checkpoint writes, one at a time, off the step loop.

    `submit(write)` returns at once (after waiting for a write still pending); the first error of a write is
    raised in the training thread by the next `submit`, `wait` or the end of the `with` block, so a store that
    is full fails the trial as it did when writes were inline. Leaving the block waits for the pending write:
    on success its error is raised; when the trial is already ending with an exception, it is logged instead.
    """

    # Only the training thread calls it: no lock.
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpsearch-checkpoint")
        self._pending: Future[None] | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self._pending = self._pool.submit(write)

    def wait(self) -> None:
        """Until the pending write is done; raises its error, once."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self.wait()
            else:
                try:
                    self.wait()
                except Exception as write_error:  # the trial's own error is the one to report
                    _log.warning("a pending checkpoint could not be written (%s)", write_error)
        finally:
            self._pool.shutdown(wait=True)
