"""What a trial needs to know about its device: the precision it trains in, which GPU it is, and which errors
leave the device unusable. Imports nothing of Optuna (training uses it).

- Precision (`[train] precision`): auto is bf16 autocast on a GPU with bf16 units (compute capability 8.0 and
  up), else fp16 with a gradient scaler: a V100 or T4 emulates bf16, slower than fp16. Full fp32 on the CPU
  (bf16 there is slow, though it can be asked for). bf16 asked for on a GPU that cannot even emulate it is
  refused in one line.
- A sticky device error (an illegal address, a device-side assert: `torch.AcceleratorError`) poisons the
  process's CUDA context: every later kernel fails. The trial ends FAIL with it and the worker exits with
  its own code, to be restarted with a fresh context, instead of failing trial after trial.
- Out of memory is `torch.OutOfMemoryError`, a cuBLAS/cuDNN workspace that could not be allocated, and a CUDA
  "out of memory" raised as `torch.AcceleratorError` (pinned host buffers, raw allocations): the device is
  full, not broken. Errors are read through their chain (`__cause__`, `__context__`): Dynamo and Inductor wrap
  what a compiled step raised.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from hpsearch.errors import UsageError

# Substrings of errors that leave a CUDA context unusable (what the CUDA runtime prints for them).
_STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
           "illegal instruction", "an illegal address", "uncorrectable ECC error", "CUDA error: unknown error")
# Library allocations that failed: the device is out of memory, not broken.
_LIBRARY_OOM = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
                "CUBLAS_STATUS_NOT_INITIALIZED")
# On the host, PyTorch's allocator failure is no torch.OutOfMemoryError but a plain RuntimeError with this text.
_CPU_ALLOCATOR_OOM = "DefaultCPUAllocator: can't allocate memory"
# What the CUDA runtime says for cudaErrorMemoryAllocation (cudaHostAlloc, cudaMalloc outside the caching allocator).
_CUDA_OOM = "CUDA error: out of memory"


@dataclass(frozen=True)
class Precision:
    """How a trial computes: autocast to `dtype` (None: full fp32), with a gradient scaler for fp16."""

    dtype: torch.dtype | None
    scaled: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(device.type, enabled=self.scaled)


def choose_precision(setting: str, device: torch.device) -> Precision:
    """`[train] precision` on this device (see the module's docstring)."""
    cuda = device.type == "cuda"
    if setting == "auto":
        if not cuda:
            return Precision(None, False)
        return Precision(torch.bfloat16, False) if native_bf16(device) else Precision(torch.float16, True)
    if setting == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():  # asked for: emulated bf16 is slow, but it runs
            raise UsageError(f"train.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; "
                             'use "fp16" (with a gradient scaler), "auto" or "fp32"')
        return Precision(torch.bfloat16, False)
    if setting == "fp16":
        return Precision(torch.float16, True)
    return Precision(None, False)


def native_bf16(device: torch.device) -> bool:
    """Whether this GPU computes bf16 in hardware (not emulated): `is_bf16_supported(including_emulation=False)`
    where this torch has it, else compute capability 8.0 (Ampere) and up."""
    if "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err` and what it wraps (`__cause__`, else `__context__`), outermost first; each once (a chain can loop)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (_CPU_ALLOCATOR_OOM in text or _CUDA_OOM in text
                                              or any(s in text for s in _LIBRARY_OOM))


def out_of_memory_cause(err: BaseException) -> BaseException | None:
    """The allocator refusal in `err`'s chain (see the module's docstring), None when it is no out of memory."""
    return next((e for e in _chain(err) if _is_oom(e)), None)


def is_out_of_memory(err: BaseException) -> bool:
    """An allocator refused, on the device or the host, anywhere in `err`'s chain. Anything else is a crash."""
    return out_of_memory_cause(err) is not None


def out_of_memory_where(err: BaseException, device: torch.device) -> str:
    """Which memory ran out: the host's for the CPU allocator's error, else the training device's (cuDNN and
    cuBLAS report theirs as plain RuntimeErrors)."""
    cause = out_of_memory_cause(err)
    return "cpu" if cause is None or _CPU_ALLOCATOR_OOM in str(cause) else str(device)


def is_sticky_device_error(err: BaseException) -> bool:
    """An error after which this process's CUDA context is unusable (its later kernels fail too), anywhere in
    `err`'s chain; an out of memory never is."""
    if is_out_of_memory(err):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    for e in _chain(err):
        if accelerator_error is not None and isinstance(e, accelerator_error):
            return True
        if isinstance(e, RuntimeError) and "CUDA error" in str(e) and any(s in str(e) for s in _STICKY):
            return True
    return False


def gpu_identity(device: torch.device) -> dict[str, Any]:
    """Which physical GPU this is (name, UUID, and the index among what the process sees), for `status`."""
    if device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {"index": index, "name": props.name, "uuid": str(getattr(props, "uuid", "")),
            "memory_mib": round(props.total_memory / 2**20)}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """The most GPU memory this trial's tensors held at once (since reset_peak_memory), None on the CPU."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def resolve_device(name: str) -> torch.device:
    """The device `[train] device` names; auto is CUDA when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device: cuda was asked for but no CUDA device is visible; use auto or cpu")
    return torch.device(name)
