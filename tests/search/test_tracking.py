"""`[tracking] tensorboard = true`: each trial's scalars and hyperparameters, read back with TensorBoard's reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from hpsearch.cli._main import main
from hpsearch.config import ConfigError, TrackingSection, read_study_file
from hpsearch.search._tracking import HPARAM_METRIC, NoTracking, TrialLog, TrialLogs
from hpsearch.train import EpochMetrics
from tests.support import tiny_tables, write_study


def _events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def _hparams(events: EventAccumulator) -> dict[str, Any]:
    """The hyperparameters a trial's folder records (the HParams plugin's session start), by name."""
    content = events.PluginTagToContent("hparams")
    assert content, "no hparams written"
    starts = [HParamsPluginData.FromString(c).session_start_info for c in content.values()]
    values = {name: value for start in starts for name, value in start.hparams.items()}
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in values.items()}


@pytest.mark.slow
@pytest.mark.inprocess
def test_a_cross_validated_trial_writes_each_folds_epochs(tmp_path):
    runs = tmp_path / "runs"
    path = write_study(tmp_path / "cv.toml", tiny_tables("cv", study={"n_trials": 1}, data={"folds": 2},
                                                         train={"epochs": 2},
                                                         tracking={"tensorboard": True, "log_dir": str(runs)}))
    storage = f"sqlite:///{tmp_path / 's.db'}"

    assert main(["run", str(path), "--storage", storage, "--artifacts", str(tmp_path / "store")]) == 0

    (trial,) = optuna.load_study(study_name="cv", storage=storage).trials
    events = _events(runs / "cv" / "trial-0")
    for record in trial.user_attrs["folds"]:
        accuracy = events.Scalars(f"fold-{record['fold']}/val/accuracy")
        assert [e.step for e in accuracy] == [0, 1]  # each fold's epochs, as its record's curve holds them
        # The record's curve is rounded to 6 decimals; TensorBoard holds float32.
        np.testing.assert_allclose([e.value for e in accuracy], [m["val_accuracy"] for m in record["history"]],
                                   atol=1e-6)
        for tag in ("train/loss", "val/loss", "lr"):
            assert [e.step for e in events.Scalars(f"fold-{record['fold']}/{tag}")] == [0, 1], tag
    assert set(_hparams(events)) == set(trial.params)


@pytest.mark.slow
@pytest.mark.inprocess
def test_each_trial_writes_its_epochs_and_hparams(tmp_path):
    runs = tmp_path / "runs"
    path = write_study(tmp_path / "tb.toml", tiny_tables("tb", study={"n_trials": 2}, train={"epochs": 2},
                                                         tracking={"tensorboard": True, "log_dir": str(runs)}))
    storage = f"sqlite:///{tmp_path / 's.db'}"

    assert main(["run", str(path), "--storage", storage, "--artifacts", str(tmp_path / "store")]) == 0

    trials = optuna.load_study(study_name="tb", storage=storage).trials
    assert sorted(p.name for p in (runs / "tb").iterdir()) == ["trial-0", "trial-1"]
    for trial in trials:
        events = _events(runs / "tb" / f"trial-{trial.number}")
        accuracy = events.Scalars("val/accuracy")
        assert [e.step for e in accuracy] == [0, 1]
        # TensorBoard stores float32: the values Optuna holds, to that precision.
        expected = [trial.intermediate_values[step] for step in (0, 1)]
        np.testing.assert_array_equal([e.value for e in accuracy], np.float32(expected))
        for tag in ("train/loss", "val/loss", "lr"):
            assert [e.step for e in events.Scalars(tag)] == [0, 1], tag
        hparams = _hparams(events)
        assert set(hparams) == set(trial.params)
        assert hparams["optimizer"] == trial.params["optimizer"]
        assert hparams["lr"] == pytest.approx(trial.params["lr"])
        assert events.Scalars(HPARAM_METRIC)[-1].value == pytest.approx(trial.value, abs=1e-6)


def _metrics(epoch: int, accuracy: float) -> EpochMetrics:
    return EpochMetrics(epoch, train_loss=1.0, val_loss=0.5, val_accuracy=accuracy, lr=1e-3, seconds=0.1)


def test_a_trial_stopped_early_records_its_last_accuracy(tmp_path):
    # What a PRUNED or interrupted trial leaves: no value, so its last epoch's accuracy goes with its params.
    log = TrialLog(tmp_path / "trial-3")
    log.epoch(_metrics(0, 0.25))
    log.epoch(_metrics(1, 0.375))
    log.finish({"lr": 1e-3, "optimizer": "adam"})

    events = _events(tmp_path / "trial-3")
    assert [e.value for e in events.Scalars(HPARAM_METRIC)] == [0.375]
    assert _hparams(events) == {"lr": pytest.approx(1e-3), "optimizer": "adam"}


def test_tracking_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = TrialLogs(TrackingSection(), "tb").open(0)
    log.epoch(_metrics(0, 0.5))
    log.finish({"lr": 1e-3}, 0.5)

    assert isinstance(log, NoTracking)
    assert list(tmp_path.iterdir()) == []


def test_a_relative_log_dir_is_the_folder_the_run_started_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logs = TrialLogs(TrackingSection(tensorboard=True, log_dir="runs"), "tb")
    monkeypatch.chdir("/")

    assert logs.root == tmp_path.resolve() / "runs" / "tb"


def test_tensorboard_must_be_a_bool(tmp_path):
    path = write_study(tmp_path / "tb.toml", tiny_tables("tb", tracking={"tensorboard": "yes"}))

    with pytest.raises(ConfigError) as err:
        read_study_file(path)

    assert err.value.field == "tracking.tensorboard"
    assert "\n" not in str(err.value)


def test_tensorboard_without_the_package_is_one_line_naming_the_fix(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path / "tb.toml", tiny_tables("tb", tracking={"tensorboard": True}))
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))

    assert main(["check", str(path)]) == 2

    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "[tracking] tensorboard" in err and "pip install -e '.[tensorboard]'" in err
