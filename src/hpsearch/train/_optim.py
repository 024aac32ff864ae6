"""The optimizer (with the head's and the backbone's param groups) and the learning-rate schedule a trial's
hyperparameters name: warmup, then a per-step (cosine, one-cycle) or per-epoch (step, exponential, plateau)
scheduler, all torch's own.

The schedule's two cadences:

- cosine and one-cycle move the learning rate after every optimizer step, over the trial's whole run
  (epochs × steps per epoch). Cosine is `SequentialLR(LinearLR warmup, CosineAnnealingLR)`, its warmup a linear
  ramp from 1% of lr; one-cycle is `OneCycleLR` with a linear rise over the warmup (its own warmup: from
  lr / onecycle_div) and a linear decay after it, its momentum left as the optimizer's choice set it.
- step, exponential and plateau move it at each epoch's end, as they always did; a warmup ahead of them is a
  `LinearLR` stepped per optimizer step for the warmup's steps only, its factor multiplying theirs (torch's
  schedulers chain: each scales the lr the other left).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hpsearch.train._hyperparams import Hyperparams

Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
ParamGroups = list[dict[str, Any]]
WARMUP_START = 0.01  # a warmup starts at this fraction of the learning rate


def param_groups(model: nn.Module, head: str, lr: float, head_lr_mult: float, *,
                 keep_frozen: bool = False) -> ParamGroups:
    """The backbone (everything but the replaced head) at `lr`, the head at `lr * head_lr_mult`; one group when
    the multiplier is 1 (as before). Frozen parameters are left out, unless `keep_frozen` (a backbone to be
    unfrozen later: a parameter without a gradient takes no step, so it stays as loaded until then)."""
    kept = [(n, p) for n, p in model.named_parameters() if keep_frozen or p.requires_grad]
    if head_lr_mult == 1.0:
        return [{"params": [p for _, p in kept], "lr": lr}]
    is_head = [n == head or n.startswith(head + ".") for n, _ in kept]
    return [{"params": [p for (_, p), h in zip(kept, is_head, strict=True) if not h], "lr": lr},
            {"params": [p for (_, p), h in zip(kept, is_head, strict=True) if h], "lr": lr * head_lr_mult}]


def make_optimizer(params: Iterable[nn.Parameter] | ParamGroups, hp: Hyperparams,
                   lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer over `params` (trainable parameters, or `param_groups`), at `lr` (default: hp.lr)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        groups: list[Any] = [g for g in params if g["params"]]
        first = groups[0]["params"][0] if groups else None
    else:
        groups = [p for p in params if p.requires_grad]
        first = groups[0] if groups else None
    lr = hp.lr if lr is None else lr
    # Fused kernels (one launch for all parameters) where torch has them: Adam and AdamW on a GPU.
    fused = {"fused": True} if first is not None and first.is_cuda else {}
    if hp.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=hp.weight_decay, **fused)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=hp.weight_decay, **fused)
    if hp.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, weight_decay=hp.weight_decay, alpha=0.9, eps=1e-6)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=hp.weight_decay, momentum=0.9, nesterov=True)
    raise ValueError(f"optimizer: {hp.optimizer!r} is not one of adam, rmsprop, sgd, adamw")


def make_scheduler(optimizer: torch.optim.Optimizer, hp: Hyperparams) -> Scheduler | None:
    """Epoch-level schedulers; ReduceLROnPlateau watches the validation loss."""
    sched = torch.optim.lr_scheduler
    if hp.scheduler == "step":
        return sched.StepLR(optimizer, step_size=hp.step_size, gamma=hp.step_gamma)
    if hp.scheduler == "exponential":
        return sched.ExponentialLR(optimizer, gamma=hp.exp_gamma)
    if hp.scheduler == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode="min", factor=hp.plateau_factor,
                                       patience=hp.plateau_patience)
    if hp.scheduler == "none":
        return None
    raise ValueError(f"scheduler: {hp.scheduler!r} is not one of step, exponential, plateau, cosine, onecycle, "
                     "none")


def step_scheduler(scheduler: Scheduler | None, val_loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif scheduler is not None:
        scheduler.step()


@dataclass
class Schedule:
    """A trial's learning-rate schedule: `after_step` after each optimizer step, `after_epoch` at each epoch's
    end. `per_step` is stepped for the first `step_limit` optimizer steps (all of them for cosine and one-cycle,
    the warmup's ahead of an epoch scheduler)."""

    per_step: torch.optim.lr_scheduler.LRScheduler | None
    per_epoch: Scheduler | None
    step_limit: int
    steps_done: int = field(default=0)

    def after_step(self) -> None:
        if self.steps_done < self.step_limit:
            self.per_step.step()  # type: ignore[union-attr]  # step_limit is 0 without one
            self.steps_done += 1

    def after_epoch(self, val_loss: float) -> None:
        step_scheduler(self.per_epoch, val_loss)

    def state_dict(self) -> dict[str, Any]:
        return {"per_step": self.per_step.state_dict() if self.per_step is not None else None,
                "per_epoch": self.per_epoch.state_dict() if self.per_epoch is not None else None,
                "steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "steps_done" not in state:  # a checkpoint of an older hpsearch: its epoch scheduler's own state
            state = {"per_step": None, "per_epoch": state, "steps_done": 0}
        if self.per_step is not None and state["per_step"] is not None:
            self.per_step.load_state_dict(state["per_step"])
        if self.per_epoch is not None and state["per_epoch"] is not None:
            self.per_epoch.load_state_dict(state["per_epoch"])
        self.steps_done = int(state["steps_done"])


def make_schedule(optimizer: torch.optim.Optimizer, hp: Hyperparams, steps_per_epoch: int,
                  epochs: int) -> Schedule:
    """The schedule of a trial of `epochs` epochs of `steps_per_epoch` optimizer steps each."""
    sched = torch.optim.lr_scheduler
    total = max(1, steps_per_epoch * epochs)
    # Within the run, and at least one step short of it for the cosine that follows.
    warmup = min(round(hp.warmup_epochs * steps_per_epoch), total - 1)
    if hp.scheduler == "cosine":
        eta_min = min(g["lr"] for g in optimizer.param_groups) * hp.cosine_min_ratio
        cosine = sched.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=eta_min)
        if warmup == 0:
            return Schedule(cosine, None, total)
        ramp = sched.LinearLR(optimizer, start_factor=WARMUP_START, total_iters=warmup)
        return Schedule(sched.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup]), None, total)
    if hp.scheduler == "onecycle":
        # OneCycleLR's rise is the warmup; its phases need two steps of it at least (and one after it).
        rise = min(max(2, warmup), total - 1) / total
        cycle = sched.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
                                 pct_start=rise, anneal_strategy="linear", div_factor=hp.onecycle_div,
                                 cycle_momentum=False)
        return Schedule(cycle, None, total)
    ramp = sched.LinearLR(optimizer, start_factor=WARMUP_START, total_iters=warmup) if warmup else None
    return Schedule(ramp, make_scheduler(optimizer, hp), warmup)
