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
