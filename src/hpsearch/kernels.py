"""Which kernels a model's fp32 math runs on: IEEE fp32, the same in training, stored outputs, predict and export.

On Ampere and newer GPUs PyTorch lets cuDNN convolutions run in TF32 by default (10-bit mantissas; cuBLAS
matmuls are fp32 by default): "fp32" outputs would then differ from an fp32 `predict`, an ONNX run or another GPU
by about 1e-3. Inside `ieee_fp32()` both are IEEE fp32, whatever the training precision: under bf16 or fp16
autocast the convolutions and matmuls run in half precision anyway, so TF32 would only change what was asked
to be fp32 (`precision = "fp32"`, the stored validation and test outputs the ensemble is fit on, `predict`).
cuDNN autotuning (`benchmark`) is on inside it everywhere: it picks among fp32 algorithms that agree to about
1e-6, far inside the 1e-4 the comparisons allow, and a worker and `predict` no longer run different algorithms
by policy. The legacy `allow_tf32` flags are used, never mixed with torch's newer `fp32_precision` settings
(reading one kind after setting the other raises in torch 2.9 and later).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and cuBLAS matmuls, cuDNN autotuning on, inside the block; the flags as
    they were (a caller's own choice) after it."""
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = before
