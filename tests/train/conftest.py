"""The train tests' shared data: a tiny digits subset placed on the CPU."""

from __future__ import annotations

import pytest
import torch

from hpsearch.config import DataSection
from hpsearch.data import TrialData, load_pool, make_split, trial_data


@pytest.fixture(scope="module")
def tiny() -> TrialData:
    """200 digits at 32 px (about 120 to train on), cropped, on the CPU."""
    cfg = DataSection(dataset="digits", image_size=32, subset=200, augment=["crop"],
                      calibration_fraction=0)  # training is under test, not the split
    pool = load_pool(cfg)
    return trial_data(pool, make_split(pool, cfg, seed=0), cfg, pretrained=False, device=torch.device("cpu"))
