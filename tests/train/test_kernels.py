"""The fp32 math of training, stored outputs and predict: TF32 off and cuDNN autotuning on inside each of them
(hpsearch.kernels), the caller's own flags back afterwards. The flags are read while the real code runs (a
callback, a forward hook); on a GPU, tests/test_gpu.py compares the outputs themselves."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from hpsearch.config import DataSection, ModelSection, TrainSection
from hpsearch.data import load_pool, make_split, trial_data
from hpsearch.predict import Ensemble
from hpsearch.preprocess import Preprocess
from hpsearch.train import Hyperparams, predict_logits, train_trial

CPU = torch.device("cpu")
IEEE = (False, False, True)  # cudnn.allow_tf32, cuda.matmul.allow_tf32, cudnn.benchmark
USERS = (True, True, False)  # what a caller set before: TF32 on, no autotuning


def _flags() -> tuple[bool, bool, bool]:
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)


@pytest.fixture
def users_flags() -> Iterator[None]:
    before = _flags()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = USERS
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = before


class _Recorder(nn.Module):
    """Logits from a linear layer; records the flags in force at each forward."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 4)
        self.seen: list[tuple[bool, bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(_flags())
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.usefixtures("users_flags")
def test_training_and_its_stored_outputs_run_ieee_fp32_and_leave_the_callers_flags() -> None:
    cfg = DataSection(dataset="digits", image_size=16, subset=60, augment=[])
    pool = load_pool(cfg)
    data = trial_data(pool, make_split(pool, cfg, seed=0), cfg, pretrained=False, device=CPU)
    during: list[tuple[bool, bool, bool]] = []
    train_trial(ModelSection(arch="resnet18", weights="none"),
                TrainSection(epochs=1, batch_size=16, eval_batch_size=32, device="cpu", precision="fp32"),
                data, Hyperparams(lr=1e-3, optimizer="adam", scheduler="none"), seed=0, device=CPU,
                on_epoch=lambda _: during.append(_flags()))
    assert during == [IEEE]
    assert _flags() == USERS
    model = _Recorder()
    predict_logits(model, data.val, data.preprocess, 32)  # what a greedy soup re-runs
    assert model.seen and set(model.seen) == {IEEE}
    assert _flags() == USERS


@pytest.mark.usefixtures("users_flags")
def test_predict_runs_ieee_fp32_and_leaves_the_callers_flags() -> None:
    members = [_Recorder(), _Recorder()]
    ensemble = Ensemble(members, [0.5, 0.5], "soft", None, ["a", "b", "c", "d"], Preprocess(8, (0.0,) * 3, (1.0,) * 3),
                        {}).eval()
    with torch.inference_mode():
        ensemble(torch.rand(5, 3, 8, 8))
    assert all(m.seen and set(m.seen) == {IEEE} for m in members)
    assert _flags() == USERS
