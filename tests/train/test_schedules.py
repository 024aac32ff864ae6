"""The learning-rate schedules with warmup, step by step: the optimizer's lr follows the formula each promises."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hpsearch.train import Hyperparams
from hpsearch.train._optim import WARMUP_START, make_optimizer, make_schedule

STEPS, EPOCHS = 5, 4  # steps per epoch, epochs
TOTAL = STEPS * EPOCHS


def _lrs(hp: Hyperparams, val_losses: list[float] | None = None) -> list[float]:
    """The lr each optimizer step of the run trains with, stepping the schedule as the training loop does."""
    opt = make_optimizer([nn.Parameter(torch.zeros(1))], hp)
    schedule = make_schedule(opt, hp, STEPS, EPOCHS)
    lrs = []
    for epoch in range(EPOCHS):
        for _ in range(STEPS):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.after_step()
        schedule.after_epoch(val_losses[epoch] if val_losses else 1.0)
    return lrs


def _warmup(lr: float, t: int, w: int) -> float:
    """Linear from WARMUP_START * lr at step 0 to lr at step w."""
    return lr * (WARMUP_START + (1 - WARMUP_START) * t / w)


@pytest.mark.parametrize("warmup_epochs", [0.0, 1.0, 0.4])
def test_cosine_ramps_linearly_then_follows_the_cosine_to_its_floor(warmup_epochs: float) -> None:
    lr, ratio = 0.2, 0.01
    hp = Hyperparams(lr=lr, optimizer="adam", scheduler="cosine", warmup_epochs=warmup_epochs, cosine_min_ratio=ratio)
    w = round(warmup_epochs * STEPS)
    eta = lr * ratio
    expected = [_warmup(lr, t, w) if t < w else eta + (lr - eta) * (1 + math.cos(math.pi * (t - w) / (TOTAL - w))) / 2
                for t in range(TOTAL)]
    assert _lrs(hp) == pytest.approx(expected, rel=1e-6)


def test_one_cycle_rises_linearly_over_the_warmup_then_falls_linearly() -> None:
    lr, div = 0.5, 20.0
    hp = Hyperparams(lr=lr, optimizer="sgd", scheduler="onecycle", warmup_epochs=1.0, onecycle_div=div)
    lrs = _lrs(hp)
    peak = STEPS - 1  # the rise's last step trains at lr
    start, final = lr / div, lr / div / 1e4  # OneCycleLR's final_div_factor
    assert lrs[0] == pytest.approx(start)
    assert lrs[peak] == pytest.approx(lr)
    assert max(lrs) == pytest.approx(lr)
    rise = [start + (lr - start) * t / peak for t in range(peak + 1)]
    fall = [lr + (final - lr) * (t - peak) / (TOTAL - 1 - peak) for t in range(peak, TOTAL)]
    assert lrs[:peak + 1] == pytest.approx(rise, rel=1e-6)
    assert lrs[peak:] == pytest.approx(fall, rel=1e-6, abs=1e-12)


def test_one_cycle_leaves_the_optimizers_momentum_alone() -> None:
    hp = Hyperparams(lr=0.1, optimizer="rmsprop", scheduler="onecycle", warmup_epochs=1.0)
    opt = make_optimizer([nn.Parameter(torch.zeros(1))], hp)
    make_schedule(opt, hp, STEPS, EPOCHS)
    assert opt.param_groups[0]["momentum"] == 0  # RMSprop as searched, not a momentum RMSprop


@pytest.mark.parametrize(("hp", "factors"), [
    # The epoch schedulers' own factor per epoch (they step at each epoch's end, as without warmup).
    (Hyperparams(lr=1.0, optimizer="sgd", scheduler="step", step_size=2, step_gamma=0.5), [1, 1, 0.5, 0.5]),
    (Hyperparams(lr=1.0, optimizer="sgd", scheduler="exponential", exp_gamma=0.8), [1, 0.8, 0.64, 0.512]),
    (Hyperparams(lr=1.0, optimizer="sgd", scheduler="none"), [1, 1, 1, 1]),
])
def test_warmup_ahead_of_an_epoch_scheduler_multiplies_its_factor(hp: Hyperparams, factors: list[float]) -> None:
    warm = Hyperparams(**{**hp.__dict__, "warmup_epochs": 1.4})
    w = round(1.4 * STEPS)
    expected = [factors[t // STEPS] * (_warmup(1.0, t, w) if t < w else 1.0) for t in range(TOTAL)]
    assert _lrs(warm) == pytest.approx(expected, rel=1e-6)
    # Without warmup the lr is what it always was: the epoch's factor for every step of the epoch.
    assert _lrs(hp) == pytest.approx([factors[t // STEPS] for t in range(TOTAL)])


def test_warmup_ahead_of_plateau_still_halves_on_a_flat_loss() -> None:
    hp = Hyperparams(lr=1.0, optimizer="sgd", scheduler="plateau", plateau_factor=0.5, plateau_patience=0,
                     warmup_epochs=0.6)
    w = round(0.6 * STEPS)
    # Loss best at epoch 0, no better after: halved after epochs 1 and 2.
    expected = [[1, 1, 0.5, 0.25][t // STEPS] * (_warmup(1.0, t, w) if t < w else 1.0) for t in range(TOTAL)]
    assert _lrs(hp, [1.0, 1.0, 1.0, 1.0]) == pytest.approx(expected, rel=1e-6)


def test_two_param_groups_follow_the_same_schedule_at_their_own_scale() -> None:
    head, body = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    hp = Hyperparams(lr=0.1, optimizer="adamw", scheduler="onecycle", warmup_epochs=1.0)
    opt = make_optimizer([{"params": [body], "lr": 0.1}, {"params": [head], "lr": 1.0}], hp)
    schedule = make_schedule(opt, hp, STEPS, EPOCHS)
    for _ in range(TOTAL):
        assert opt.param_groups[1]["lr"] == pytest.approx(10 * opt.param_groups[0]["lr"])
        opt.step()
        schedule.after_step()
    assert opt.param_groups[1]["lr"] == pytest.approx(10 * opt.param_groups[0]["lr"])


def test_a_schedule_restored_from_its_state_continues_where_it_stopped() -> None:
    hp = Hyperparams(lr=0.3, optimizer="sgd", scheduler="cosine", warmup_epochs=1.0)
    whole = _lrs(hp)
    param = nn.Parameter(torch.zeros(1))
    opt = make_optimizer([param], hp)
    schedule = make_schedule(opt, hp, STEPS, EPOCHS)
    for _ in range(7):
        opt.step()
        schedule.after_step()
    state, opt_state = schedule.state_dict(), opt.state_dict()
    again = make_optimizer([nn.Parameter(torch.zeros(1))], hp)
    resumed = make_schedule(again, hp, STEPS, EPOCHS)
    again.load_state_dict(opt_state)
    resumed.load_state_dict(state)
    rest = []
    for _ in range(7, TOTAL):
        rest.append(again.param_groups[0]["lr"])
        again.step()
        resumed.after_step()
    assert rest == pytest.approx(whole[7:])
