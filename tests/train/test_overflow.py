"""An fp16 overflow is a step the gradient scaler skips, not a divergence: one step whose loss is inf leaves the
epoch's loss finite (the mean of the steps that count) and the trial alive; without a scaler (fp32, bf16) the same
step is a divergence, and so is an fp16 epoch where no step is finite. A real step loop on the CPU, with a real
GradScaler, over a model whose output overflows at chosen steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hpsearch.config import DataSection, TrainSection
from hpsearch.data import TrialData, load_pool, make_split, trial_data
from hpsearch.train import Hyperparams, NonFiniteLoss
from hpsearch.train._accelerator import Precision
from hpsearch.train._loop import train_steps
from hpsearch.train._optim import make_schedule

CPU = torch.device("cpu")
TRAIN = TrainSection(batch_size=8, device="cpu")


class _Overflowing(nn.Module):
    """A small convolutional classifier whose logits are inf at the forward calls in `at` (as fp16 logits are
    once they pass 65,504)."""

    def __init__(self, at: set[int]) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        self.at, self.calls = at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        self.calls += 1
        return logits * math.inf if self.calls - 1 in self.at else logits


@pytest.fixture(scope="module")
def data() -> TrialData:
    cfg = DataSection(dataset="digits", image_size=16, subset=80, augment=[], calibration_fraction=0)
    pool = load_pool(cfg)
    return trial_data(pool, make_split(pool, cfg, seed=0), cfg, pretrained=False, device=CPU)


def _epoch(data: TrialData, scaled: bool, at: set[int]) -> tuple[float, int, torch.amp.GradScaler]:
    torch.manual_seed(0)
    model = _Overflowing(at)
    precision = Precision(None, scaled)
    scaler = precision.scaler(CPU)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    schedule = make_schedule(optimizer, Hyperparams(lr=0.01, optimizer="sgd", scheduler="none"), 1, 1)
    totals = train_steps(model, optimizer, scaler, data, TRAIN.batch_size, 0.0, schedule, precision, gen, gen)
    return totals.epoch_loss(0), model.calls, scaler


def test_one_overflow_under_the_scaler_is_a_skipped_step_not_a_divergence(data: TrialData) -> None:
    clean, steps, _ = _epoch(data, scaled=True, at=set())
    assert steps >= 4 and math.isfinite(clean)
    loss, _, scaler = _epoch(data, scaled=True, at={1})
    assert math.isfinite(loss) and loss > 0
    assert scaler.get_scale() < 2.0**16, "the scaler saw the overflow and skipped that step (its scale halved)"


def test_a_non_finite_loss_without_a_scaler_or_in_every_step_is_a_divergence(data: TrialData) -> None:
    with pytest.raises(NonFiniteLoss, match="epoch 0"):
        _epoch(data, scaled=False, at={1})
    steps = data.train.num_batches(TRAIN.batch_size, drop_last=True)
    with pytest.raises(NonFiniteLoss, match="epoch 0"):
        _epoch(data, scaled=True, at=set(range(steps)))
