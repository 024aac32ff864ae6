"""The optimizer and the learning-rate scheduler a trial's hyperparameters name, and stepping the scheduler."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hpsearch.train._hyperparams import Hyperparams


def make_optimizer(params: Iterable[nn.Parameter], hp: Hyperparams) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    # Fused kernels (one launch for all parameters) where torch has them: Adam and AdamW on a GPU.
    fused = {"fused": True} if params and params[0].is_cuda else {}
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay, **fused)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, **fused)
    if hp.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=hp.lr, weight_decay=hp.weight_decay, alpha=0.9, eps=1e-6)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.lr, weight_decay=hp.weight_decay, momentum=0.9, nesterov=True)
    raise ValueError(f"optimizer: {hp.optimizer!r} is not one of adam, rmsprop, sgd, adamw")


Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


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
    raise ValueError(f"scheduler: {hp.scheduler!r} is not one of step, exponential, plateau, none")


def step_scheduler(scheduler: Scheduler | None, val_loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif scheduler is not None:
        scheduler.step()
