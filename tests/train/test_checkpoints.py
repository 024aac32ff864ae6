"""Resumable checkpoints: when one is taken, that it is a snapshot, that a resumed trial repeats the
uninterrupted one (best epoch included), and that the writes run off the step loop."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from hpsearch.config import ConfigError, DataSection, ModelSection, StudyConfig, TrainSection, read_study_file
from hpsearch.data import TrialData, load_pool, make_split, trial_data
from hpsearch.train import Checkpoint, Hyperparams, train_trial
from hpsearch.train._checkpoints import EVERY_EPOCH, NEVER, CheckpointPolicy, CheckpointWriter, checkpoint_policy

CPU = torch.device("cpu")
MODEL = ModelSection(arch="resnet18", weights="none")
TRAIN3 = TrainSection(epochs=3, batch_size=16, eval_batch_size=64, device="cpu")
# A sane first epoch, then ExponentialLR x30 wrecks the model: the best epoch is the first, before any resume.
HP = Hyperparams(lr=1e-3, optimizer="adam", scheduler="exponential", exp_gamma=30.0, dropout=0.2)


# ------------------------------------------------------------------------------------------- policy


def test_by_minutes_by_default_every_n_epochs_or_never_when_told() -> None:
    by_time = checkpoint_policy(TrainSection())
    assert by_time == CheckpointPolicy(None, 5.0)
    assert not by_time.due(epochs_since=50, seconds_since=299.0)
    assert by_time.due(epochs_since=1, seconds_since=300.0)
    assert CheckpointPolicy(minutes=0).due(1, 0.0)  # 0 minutes: every epoch end
    assert EVERY_EPOCH.due(1, 0.0)
    every_3 = checkpoint_policy(TrainSection(checkpoint_every=3))
    assert [every_3.due(n, 1e9) for n in (1, 2, 3)] == [False, False, True]  # epochs, whatever the clock
    assert not NEVER.due(100, 1e9) and checkpoint_policy(TrainSection(checkpoint_every=0)) == NEVER


def test_existing_study_files_keep_checkpoint_every_and_both_settings_are_one_line_error(tmp_path: Path) -> None:
    base = '[study]\nname = "c"\n[data]\ndataset = "digits"\n[model]\narch = "resnet18"\n[train]\n'
    old = tmp_path / "old.toml"
    old.write_text(base + "checkpoint_every = 1\n")
    assert checkpoint_policy(read_study_file(old).train) == EVERY_EPOCH
    both = tmp_path / "both.toml"
    both.write_text(base + "checkpoint_every = 1\ncheckpoint_minutes = 2\n")
    with pytest.raises(ConfigError) as err:
        read_study_file(both)
    line = str(err.value)
    assert "train.checkpoint_minutes" in line and "not both" in line and "\n" not in line


# ------------------------------------------------------------------------------------------ resume


@pytest.fixture(scope="module")
def tiny() -> TrialData:
    cfg = DataSection(dataset="digits", image_size=32, subset=200, augment=["crop", "cutout"])
    pool = load_pool(cfg)
    return trial_data(pool, make_split(pool, cfg, seed=0), cfg, pretrained=False, device=CPU)


def test_a_resumed_trial_repeats_the_uninterrupted_one_and_returns_its_best_epoch(tiny: TrialData,
                                                                                  tmp_path: Path) -> None:
    taken: list[Checkpoint] = []
    whole = train_trial(MODEL, TRAIN3, tiny, HP, seed=0, device=CPU, on_checkpoint=taken.append)
    assert [c.epoch for c in taken] == [0, 1]  # every epoch end but the last
    assert whole.best.epoch == 0, "the setup must make an epoch before the resume point the best"
    # Used only now, after training went on for two more epochs: each checkpoint is a snapshot (the optimizer's
    # live state was copied, not referenced), saved and loaded as a retry does (weights_only).
    path = tmp_path / "checkpoint.pt"
    taken[1].save(str(path))
    resumed = train_trial(MODEL, TRAIN3, tiny, HP, seed=0, device=CPU, resume=Checkpoint.load(str(path)))
    assert [(m.epoch, m.train_loss, m.val_loss, m.val_accuracy) for m in resumed.history] == [
        (m.epoch, m.train_loss, m.val_loss, m.val_accuracy) for m in whole.history]
    assert resumed.best.epoch == 0
    for key, tensor in whole.state_dict.items():
        assert torch.equal(resumed.state_dict[key], tensor), key
    assert torch.equal(resumed.val_logits, whole.val_logits) and torch.equal(resumed.test_logits, whole.test_logits)


def test_no_checkpoint_before_the_minutes_have_passed(tiny: TrialData) -> None:
    taken: list[Checkpoint] = []
    train = TrainSection(epochs=2, batch_size=16, eval_batch_size=64, device="cpu")  # default: 5 minutes
    train_trial(MODEL, train, tiny, HP, seed=0, device=CPU, on_checkpoint=taken.append,
                checkpoint=checkpoint_policy(train))
    assert taken == []


# ------------------------------------------------------------------------------------------ writer


def test_a_write_runs_beside_the_training_thread_and_the_trial_end_waits_for_it() -> None:
    started, release, written = threading.Event(), threading.Event(), []

    def slow_write() -> None:
        started.set()
        release.wait(10)
        written.append(threading.current_thread().name)

    with CheckpointWriter() as writer:
        begun = time.monotonic()
        writer.submit(slow_write)
        assert time.monotonic() - begun < 1 and started.wait(5), "submit must not wait for the write"
        assert written == []  # the training thread goes on while the write is pending
        threading.Timer(0.2, release.set).start()
    assert written and written[0] != threading.current_thread().name  # leaving the block finished it


def test_a_failed_write_fails_the_trial_at_the_next_checkpoint_or_its_end() -> None:
    def full() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"), CheckpointWriter() as writer:
        writer.submit(full)
    writer = CheckpointWriter()
    writer.submit(full)
    with pytest.raises(OSError, match="No space"):
        writer.submit(lambda: None)  # raised once, at the next submit
    writer.wait()
    writer.__exit__(None, None, None)


def test_when_the_trial_already_failed_its_own_error_is_the_one_raised(caplog: pytest.LogCaptureFixture) -> None:
    def full() -> None:
        raise OSError(28, "No space left on device")

    caplog.set_level(logging.WARNING)
    with pytest.raises(KeyboardInterrupt), CheckpointWriter() as writer:
        writer.submit(full)
        raise KeyboardInterrupt
    assert "could not be written" in caplog.text



def test_a_recorded_config_with_both_settings_still_validates(tmp_path: Path) -> None:
    path = tmp_path / "every2.toml"
    path.write_text('[study]\nname = "c"\n[data]\ndataset = "digits"\n[model]\narch = "resnet18"\n'
                    '[train]\ncheckpoint_every = 2\n')
    # What a study records (and the report and resume checks read back) holds every field, both of these.
    again = StudyConfig.model_validate(read_study_file(path).model_dump())
    assert checkpoint_policy(again.train) == CheckpointPolicy(every_epochs=2)
