"""The tests' hooks in a command: holds at named points (HPSEARCH_TEST_HOLD) and GPU faults (HPSEARCH_TEST_FAULT).

A process-level test stops a command at a named point until the test releases it.
`HPSEARCH_TEST_HOLD="POINT:PATH"` makes the process wait at POINT until PATH exists. The points: a number N
(a trial, after writing its checkpoint of epoch N), `ensemble` (`hpsearch ensemble`, after pinning and
choosing its members, before writing them) and `prepared` (the child that prepares `run --workers`' study, once
the study is open, before it reports back). A signal, a kill or a concurrent run then lands at the same moment
every time, however loaded the machine, with no polling for a window. Unset (always, outside tests), it costs
one environment lookup.

`HPSEARCH_TEST_FAULT="device-assert:PATH"` makes the first training step of a GPU process run a real
out-of-range index in a CUDA kernel (a device-side assert: the context is broken for good), once per PATH:
the fault creates PATH, and a process that finds PATH runs normally. `HPSEARCH_TEST_FAULT="oom:PATH"` makes that
step allocate 1 GiB more than the device has free: a real CUDA out-of-memory inside a step, once per PATH. The GPU
tests use them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

HOLD_ENV = "HPSEARCH_TEST_HOLD"


def hold_at(point: str, before: Callable[[], None] | None = None) -> None:
    """Wait at `point` until the test releases it; `before` runs first when this point holds (a trial finishes
    writing the checkpoint it holds after)."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    at, _, release = spec.partition(":")
    if at != point:
        return
    if before is not None:
        before()
    while not Path(release).exists():
        time.sleep(0.05)


FAULT_ENV = "HPSEARCH_TEST_FAULT"


def fault_at(point: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or point != "step":
        return
    kind, _, once = spec.partition(":")
    if kind not in ("device-assert", "oom") or Path(once).exists():
        return
    import torch

    if not torch.cuda.is_available():
        return
    try:  # created exclusively: of workers reaching their first step together, exactly one faults
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    if kind == "oom":
        free, _ = torch.cuda.mem_get_info()
        torch.empty(free + (1 << 30), dtype=torch.uint8, device="cuda")  # more than is free: a real CUDA OOM
        return
    values = torch.zeros(4, device="cuda")
    values[torch.tensor([1 << 20], device="cuda")].sum().item()  # a gather far past the end: the kernel asserts
