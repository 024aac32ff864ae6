"""`[train] compile = true`: torch.compile once per worker, reused by every later trial of the same shape.

A compiled graph belongs to one module object. Each trial still builds its own model (its seed's initial
weights, or the pretrained ones) and then copies those weights into the worker's one compiled module of that
architecture, class count, image size, batch size, freeze and device: the parameters keep their identity, so
the graph (its guards) stays valid, and Dynamo treats parameters and buffers as inputs, not constants. The
head's dropout is a 0-d buffer (`model.TensorDropout`) filled in place: a new trial's dropout is a new input
value, not a recompilation. The first trial pays the compilation (its training and evaluation graphs, and a
graph per distinct last-batch size); the later ones reuse them. Not bit-for-bit reproducible on resume:
compiled kernels draw dropout masks from their own RNG stream.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import nn

from hpsearch.model import set_dropout


@dataclass
class _Compiled:
    module: nn.Module  # the weights trials load into; what optimizers, checkpoints and plain_state_dict see
    compiled: nn.Module  # torch.compile(module): what the trial's steps and evaluation call


_BY_SHAPE: dict[Hashable, _Compiled] = {}


def compiled_model(key: Hashable, fresh: nn.Module, dropout: float) -> tuple[nn.Module, nn.Module]:
    """(module, compiled) for a trial whose freshly built model is `fresh` (built with tensor_dropout)."""
    entry = _BY_SHAPE.get(key)
    if entry is None:
        entry = _Compiled(fresh, torch.compile(fresh))
        _BY_SHAPE[key] = entry
    else:
        with torch.no_grad():
            entry.module.load_state_dict(fresh.state_dict())  # into the same tensors: nothing recompiles
    set_dropout(entry.module, dropout)
    return entry.module, entry.compiled

