"""Which errors are out of memory (the accelerator's, or the CPU allocator's RuntimeError) and which are not. A real
allocator failure in a capped `hpsearch run`, retried once and stopped on the streak, is in tests/process/test_oom.py.
"""

from __future__ import annotations

import pytest
import torch

from hpsearch.train import is_out_of_memory as _out_of_memory


def test_out_of_memory_is_the_accelerator_error_or_the_cpu_allocator_error():
    assert _out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    assert _out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    try:  # a real refusal: 1 PiB is beyond any machine's address space
        torch.empty(2**50, dtype=torch.uint8)
    except RuntimeError as err:
        assert not isinstance(err, torch.OutOfMemoryError)  # why the plain RuntimeError needs its own check
        assert _out_of_memory(err), str(err)
    else:
        pytest.fail("allocating 1 PiB succeeded")


def test_other_errors_are_no_out_of_memory():
    assert not _out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    assert not _out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not _out_of_memory(ValueError("DefaultCPUAllocator: can't allocate memory"))  # only the torch error


def _wrapped_by_dynamo(err: Exception) -> Exception:
    """What a compiled step raises when `err` comes out of its backend: Dynamo's own wrapper around it."""
    import torch._dynamo

    def failing_backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> None:
        raise err

    torch._dynamo.reset()
    try:
        torch.compile(lambda x: x * 2 + 1, backend=failing_backend)(torch.ones(3))
    except Exception as wrapped:
        return wrapped
    finally:
        torch._dynamo.reset()
    pytest.fail("the compiled call did not raise")


def test_a_cuda_out_of_memory_raised_as_an_accelerator_error_is_out_of_memory_even_wrapped():
    """Pinned host buffers and raw allocations report cudaErrorMemoryAllocation as torch.AcceleratorError: the
    device is full, not broken (the worker must not exit for a fresh context), also inside Dynamo's wrapper."""
    from hpsearch.train import is_sticky_device_error

    raw = torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
    for err in (raw, _wrapped_by_dynamo(raw)):
        assert _out_of_memory(err), repr(err)
        assert not is_sticky_device_error(err), repr(err)
    wrapped = _wrapped_by_dynamo(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"))
    assert not isinstance(wrapped, torch.OutOfMemoryError) and _out_of_memory(wrapped)


def test_a_broken_device_is_found_under_dynamos_wrapper():
    """A sticky error a compiled step raised, wrapped by Dynamo: still a broken context (the worker exits to be
    restarted, instead of failing trial after trial)."""
    from hpsearch.train import is_sticky_device_error

    timeout = torch.AcceleratorError("CUDA error: the launch timed out and was terminated")
    wrapped = _wrapped_by_dynamo(timeout)
    assert not isinstance(wrapped, torch.AcceleratorError)
    assert is_sticky_device_error(wrapped) and not _out_of_memory(wrapped)
    # A chain built by hand, `raise ... from ...`, looping back on itself: read once, no endless walk.
    try:
        try:
            raise timeout
        except torch.AcceleratorError as inner:
            raise RuntimeError("step failed") from inner
    except RuntimeError as outer:
        timeout.__context__ = outer  # a loop
        assert is_sticky_device_error(outer)
        assert not is_sticky_device_error(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("text", ["cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
                                  "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                                  "CUDA error: out of memory"])
def test_library_out_of_memory_is_labelled_with_the_gpu_not_the_cpu(text: str):
    """cuDNN and cuBLAS report their failed allocations as plain RuntimeErrors: the trial's reason names the GPU
    that ran out (what --workers-per-gpu and batch_size are chosen by), not "cpu"."""
    from hpsearch.train import out_of_memory_where

    gpu = torch.device("cuda:0")
    assert out_of_memory_where(RuntimeError(text), gpu) == "cuda:0"
    assert out_of_memory_where(_wrapped_by_dynamo(RuntimeError(text)), gpu) == "cuda:0"
    try:
        torch.empty(2**50, dtype=torch.uint8)  # the host allocator's own refusal
    except RuntimeError as host:
        assert out_of_memory_where(host, gpu) == "cpu"
