"""The calibration part of the split: cut from what would train, touched by no choice of the search, and what the
ensemble fits on (tests/ensemble/test_calibration_fit.py)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from hpsearch.config import DataSection, StudyConfig
from hpsearch.data import ImagePool, load_pool, make_split


@pytest.fixture(scope="module")
def digits() -> ImagePool:
    return load_pool(DataSection(dataset="digits"))


def test_calibration_is_cut_from_train_and_leaves_val_and_test_as_they_were(digits: ImagePool) -> None:
    with_part = make_split(digits, DataSection(dataset="digits"), seed=3)
    without = make_split(digits, DataSection(dataset="digits", calibration_fraction=0), seed=3)
    assert len(without.calibration) == 0 and "calibration" not in without.sizes()
    # Validation and test are the same images: a study's selection and its test figures do not move.
    assert np.array_equal(with_part.val, without.val) and np.array_equal(with_part.test, without.test)
    assert set(with_part.calibration) <= set(without.train)
    assert np.array_equal(np.sort(np.concatenate([with_part.train, with_part.calibration])), without.train)
    labels = digits.labels.numpy()
    assert abs(len(with_part.calibration) / len(labels) - 0.1) < 0.01
    for c in range(10):  # stratified: every class in its share
        share = (labels[with_part.calibration] == c).sum() / (labels == c).sum()
        assert abs(share - 0.1) < 0.02, (c, share)
    assert with_part.sizes()["calibration"] == len(with_part.calibration)
    assert with_part.sha256() != without.sha256()


def test_folds_cut_no_calibration_by_default(digits: ImagePool) -> None:
    cfg = DataSection(dataset="digits", folds=3)
    assert cfg.calibration_share == 0
    assert len(make_split(digits, cfg, seed=0).calibration) == 0
    assert DataSection(dataset="digits").calibration_share == 0.1


@pytest.mark.parametrize(("fields", "words"), [
    ({"folds": 3, "calibration_fraction": 0.1}, ("calibration_fraction", "out-of-fold", "folds = 0")),
    ({"val_fraction": 0.4, "test_fraction": 0.3, "calibration_fraction": 0.25},
     ("calibration_fraction", "10% for training")),
    ({"calibration_fraction": 1.0}, ("calibration_fraction", "less than 1")),
])
def test_bad_calibration_settings_are_refused_by_name(fields: dict[str, float], words: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        DataSection(dataset="digits", **fields)
    for word in words:
        assert word in str(caught.value)


def test_a_recorded_config_without_a_calibration_part_rebuilds_the_split_it_ran_with() -> None:
    recorded = {"study": {"name": "old"}, "data": {"dataset": "digits"}}
    before = StudyConfig.recorded(recorded, {"train": 1078, "val": 359, "test": 360})
    assert before.data.calibration_share == 0
    assert StudyConfig.recorded(recorded, {"train": 900, "val": 359, "test": 360, "calibration": 179}
                                ).data.calibration_share == 0.1
    assert StudyConfig.recorded(recorded, None).data.calibration_share == 0.1

