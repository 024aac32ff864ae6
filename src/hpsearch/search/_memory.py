"""A trial's memory: what its process holds when it starts, freeing what it left, and running out of it."""

from __future__ import annotations

import gc
import logging
import os

import torch

from hpsearch.errors import first_line

_log = logging.getLogger(__name__)


class TrialOutOfMemory(RuntimeError):
    """A trial ran out of memory, on its GPU or on the host (see `is_out_of_memory`); the worker lives on and the
    trial is retried once."""


def free_device_memory() -> None:
    """Between trials (and after an OOM): drop what the last trial held, host and device."""
    gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except RuntimeError as err:  # a context a sticky error broke: the process is about to exit anyway
            _log.warning("could not free GPU memory (%s)", first_line(err))


def memory_in_use(device: torch.device) -> dict[str, float]:
    """What this process holds now, in MiB: host resident set (Linux), and tensors on its CUDA device.

    Recorded when each trial starts, it is what earlier trials left behind: flat over a worker's trials
    unless something leaks (a user sees it per trial in the dashboard; the tests check it).
    """
    held: dict[str, float] = {}
    try:
        with open("/proc/self/statm") as statm:
            held["host_rss_mib"] = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # no procfs (not Linux): the host figure is simply absent
        pass
    if device.type == "cuda":
        held["cuda_allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
    return {k: round(v, 1) for k, v in held.items()}
