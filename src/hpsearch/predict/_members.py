"""How an ensemble's members are built and run: plain torchvision (or timm) models; one forward per member (loop),
or one batched forward per architecture (vmap).

`vmap` stacks the parameters and buffers of the members that share an architecture
(`torch.func.stack_module_state`) and runs them as one call (`torch.func.functional_call` under `torch.vmap`),
so a group of M members costs one kernel launch per layer instead of M. The members keep working on their own:
after stacking, each member's parameters and buffers are views into the stacked tensors (no second copy).

`auto` picks per device (bench/ensemble_infer.py, bench/RESULTS.md): the loop on the CPU, where vmap's batched
(grouped) convolutions did less work per CPU-second than the loop's plain ones (0.87x with one thread; 0.45x in
an earlier quiet two-thread run), and vmap on CUDA, where one launch per layer for the whole group is the point
(not measured on a GPU yet).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from hpsearch.archs import timm_name
from hpsearch.timm_archs import create_timm

Strategy = Literal["auto", "loop", "vmap"]
STRATEGIES: tuple[Strategy, ...] = ("auto", "loop", "vmap")


def plain_model(arch: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
    """A member's architecture as plain torchvision (or, for `timm:NAME`, timm) builds it, never with pretrained
    weights (a manifest cannot ask for a download): its own are loaded with strict=True."""
    name = timm_name(arch)
    if name is not None:
        return create_timm(name, num_classes, kwargs)
    from torchvision import models

    return models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def resolve_strategy(strategy: str, device: torch.device | str) -> Literal["loop", "vmap"]:
    """`loop` or `vmap` for `strategy` on `device` (`auto`: vmap on CUDA, the loop elsewhere)."""
    if strategy == "loop" or strategy == "vmap":
        return strategy
    if strategy != "auto":
        raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    return "vmap" if torch.device(device).type == "cuda" else "loop"


def _signature(module: nn.Module) -> tuple[object, ...] | None:
    """Members with equal signatures can be stacked: same class and layer configuration (repr), same tensor
    names, shapes, dtypes and device. None for a member with no tensors (nothing to stack)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    if not tensors:
        return None
    return (type(module), repr(module), tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in tensors))


def _skeleton(module: nn.Module) -> nn.Module:
    """A copy of `module` with every tensor on the meta device, copying no data (deepcopy of a tensor that is a
    view of a stacked one would copy the whole stack)."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
                            for p in module.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in module.buffers()})
    return copy.deepcopy(module, memo)


class _Group:
    """Members of one architecture, stacked: their logits in one vmapped call."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        self.base = _skeleton(members[0])  # the structure; functional_call supplies every tensor
        with torch.inference_mode(False), torch.no_grad():
            params, buffers = stack_module_state(list(members))
            self.params = {k: v.detach() for k, v in params.items()}
            self.buffers = dict(buffers)
            for i, member in enumerate(members):  # each member now reads its slice of the stacked tensors
                for name, p in member.named_parameters():
                    p.data = self.params[name][i]
                for name, _ in list(member.named_buffers()):
                    owner, _, leaf = name.rpartition(".")
                    member.get_submodule(owner)._buffers[leaf] = self.buffers[name][i]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        def one(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.base, (params, buffers), (x,))

        return torch.vmap(one, in_dims=(0, 0, None))(self.params, self.buffers, x)


class MemberRunner:
    """Logits [M, N, C] of `members` on a batch, by the loop or by one vmapped call per architecture group.

    Built for the members as they are now (device, dtype); rebuild it after moving them.
    """

    def __init__(self, members: Sequence[nn.Module], strategy: str) -> None:
        self.members = list(members)
        device = next((t.device for m in self.members for t in (*m.parameters(), *m.buffers())),
                      torch.device("cpu"))
        self.strategy = resolve_strategy(strategy, device)
        self.groups: list[tuple[list[int], _Group]] = []
        if self.strategy == "vmap":
            by_signature: dict[tuple[object, ...], list[int]] = {}
            for i, member in enumerate(self.members):
                key = _signature(member)
                if key is not None:
                    by_signature.setdefault(key, []).append(i)
            self.groups = [(idx, _Group([self.members[i] for i in idx])) for idx in by_signature.values()
                           if len(idx) > 1]
        grouped = {i for idx, _ in self.groups for i in idx}
        self.singles = [i for i in range(len(self.members)) if i not in grouped]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.groups:
            return torch.stack([m(x) for m in self.members])
        out: list[torch.Tensor | None] = [None] * len(self.members)
        for idx, group in self.groups:
            for i, logits in zip(idx, group(x).unbind(0), strict=True):
                out[i] = logits
        for i in self.singles:
            out[i] = self.members[i](x)
        return torch.stack([t for t in out if t is not None])
