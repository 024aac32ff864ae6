"""A trial's regularizers: mixup and cutmix (soft targets, label smoothing on top), RandAugment of the uint8 batches,
and the weights' moving average that validation, the kept weights and a resumed trial use. Real ResNet-18s on a
tiny digits subset, on the CPU."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from hpsearch.config import ModelSection, TrainSection
from hpsearch.data import TrialData, mixer, rand_augment
from hpsearch.model import plain_state_dict
from hpsearch.train import Checkpoint, Hyperparams, predict_logits, train_trial
from hpsearch.train import _loop as loop
from hpsearch.train._loop import _start_run, _train_epoch

CPU = torch.device("cpu")
HP = Hyperparams(lr=1e-3, optimizer="adam", scheduler="none")
CLASSES = 10


def _train(**values: object) -> TrainSection:
    return TrainSection(**{"epochs": 1, "batch_size": 16, "eval_batch_size": 64, "device": "cpu", **values})


def _hp(**values: object) -> Hyperparams:
    return Hyperparams(**{**HP.__dict__, **values})


# ------------------------------------------------------------------------------------------ mixup, cutmix


def _mixed(mixing: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of 8 distinct images with distinct labels, and what `mixing` made of it (a seed whose ratio mixes)."""
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8)
    mix = mixer(mixing, 1.0, CLASSES)
    assert mix is not None
    for seed in range(20):
        torch.manual_seed(seed)
        out, soft = mix(images, labels)
        if 0 < soft[0, 0] < 1:
            return images, labels, out, soft
    raise AssertionError(f"{mixing} never mixed in 20 seeds")


@pytest.mark.parametrize("mixing", ["mixup", "cutmix"])
def test_mixing_gives_soft_labels_of_two_images_that_sum_to_one(mixing: str) -> None:
    images, labels, out, soft = _mixed(mixing)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert soft.shape == (8, CLASSES) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    # Each image is mixed with its neighbour in the batch (which the trial shuffles): its label and the
    # neighbour's share the mass, lam and 1 - lam, the same for the whole batch.
    partner = labels.roll(1)
    lam = soft[torch.arange(8), labels]
    torch.testing.assert_close(soft[torch.arange(8), partner], 1 - lam)
    assert ((soft > 0).sum(1) == 2).all() and torch.allclose(lam, lam[0].expand(8))
    if mixing == "mixup":  # every pixel blended in that ratio
        torch.testing.assert_close(out, lam[0] * images + (1 - lam[0]) * images.roll(1, 0))
    else:  # each pixel is one of the two images'; the neighbour's box covers 1 - lam of the area
        own, other = out == images, out == images.roll(1, 0)
        assert (own | other).all()
        pasted = (other & ~own).all(1).float().mean((1, 2))
        torch.testing.assert_close(pasted, 1 - lam)


def test_no_mixing_is_no_transform() -> None:
    assert mixer("none", 1.0, CLASSES) is None
    with pytest.raises(ValueError, match="mixup"):
        mixer("mixmax", 1.0, CLASSES)


def test_label_smoothing_applies_on_top_of_soft_targets() -> None:
    # What the step's loss computes with both on: cross-entropy against (1 - s) * mixed + s / classes.
    logits = torch.randn(8, CLASSES, generator=torch.Generator().manual_seed(1))
    _, _, _, soft = _mixed("mixup")
    smoothing = 0.1
    expected = -((soft * (1 - smoothing) + smoothing / CLASSES) * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(F.cross_entropy(logits, soft, label_smoothing=smoothing), expected)


@pytest.mark.parametrize("mixing", ["mixup", "cutmix"])
def test_an_epoch_trains_on_mixed_soft_targets(tiny: TrialData, mixing: str, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    losses: list[tuple[torch.Tensor, float]] = []
    cross_entropy = F.cross_entropy

    def loss_spy(logits: torch.Tensor, target: torch.Tensor, **kwargs: float) -> torch.Tensor:
        losses.append((target, kwargs.get("label_smoothing", 0.0)))
        return cross_entropy(logits, target, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(F, "cross_entropy", loss_spy)
    cfg = _train(label_smoothing=0.1)
    run = _start_run(ModelSection(), cfg, tiny, _hp(mixing=mixing, mix_alpha=0.4), 0, CPU)
    assert run.mix is not None
    seen: list[torch.Tensor] = []
    mix = run.mix

    def spy(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, soft = mix(x, labels)
        seen.append(soft)
        return out, soft

    run.mix = spy
    before = run.model.fc.weight.detach().clone()
    metrics = _train_epoch(run, tiny, cfg, 0, "accuracy")
    assert len(seen) == tiny.train.num_batches(16, drop_last=True)
    assert all(s.shape == (16, tiny.num_classes) and torch.allclose(s.sum(1), torch.ones(16)) for s in seen)
    assert any(((s > 0).sum(1) == 2).any() for s in seen)  # some batch did mix
    # The training loss took those soft targets, label smoothing on top.
    trained_on = [(target, smoothing) for target, smoothing in losses if target.ndim == 2]
    assert [id(t) for t, _ in trained_on] == [id(s) for s in seen] and all(s == 0.1 for _, s in trained_on)
    assert metrics.train_loss > 0 and metrics.val_loss > 0 and not torch.equal(run.model.fc.weight, before)
    # Off: no transform in the step.
    assert _start_run(ModelSection(), cfg, tiny, _hp(mixing="none"), 0, CPU).mix is None


# ------------------------------------------------------------------------------------------ RandAugment


def test_rand_augment_changes_a_uint8_batch_and_keeps_its_shape_and_dtype() -> None:
    images = torch.randint(0, 256, (16, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out = rand_augment(images, 0.8)
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.device == images.device
    assert not torch.equal(out, images)
    assert rand_augment(images, 0.01) is images  # below magnitude 1: none
    # One draw per group of 4 images (not one per batch): 16 copies of one image come out as 4 different ones.
    same = images[:1].expand(16, -1, -1, -1)
    torch.manual_seed(1)
    out = rand_augment(same, 1.0)
    groups = out.view(4, 4, 3, 24, 24)
    assert all(torch.equal(group[0], image) for group in groups for image in group)
    assert len({tuple(group[0].flatten().tolist()) for group in groups}) > 1


def test_a_trial_with_rand_augment_trains_and_strength_zero_draws_nothing(tiny: TrialData) -> None:
    cfg = _train()
    result = train_trial(ModelSection(), cfg, tiny, _hp(augment_strength=0.5), seed=0, device=CPU)
    assert result.best.train_loss > 0
    # Strength 0 is off: the trial is the one trained without the key, to the bit.
    plain = train_trial(ModelSection(), cfg, tiny, HP, seed=0, device=CPU)
    zero = train_trial(ModelSection(), cfg, tiny, _hp(augment_strength=0.0), seed=0, device=CPU)
    assert torch.equal(plain.val_logits, zero.val_logits)
    assert not torch.equal(plain.val_logits, result.val_logits)


# ------------------------------------------------------------------------------------------ EMA


def test_validation_sees_the_averaged_models_weights_after_each_step(tiny: TrialData) -> None:
    cfg = _train(ema_decay=0.8)
    run = _start_run(ModelSection(), cfg, tiny, _hp(ema=True), 0, CPU)
    assert run.ema is not None and run.evaluated is run.ema.module
    # torch's own AveragedModel, stepped beside the trial's after every optimizer step.
    reference = AveragedModel(copy.deepcopy(run.model), multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    update = run.ema.update_parameters
    steps = 0

    def both(model: torch.nn.Module) -> None:
        nonlocal steps
        update(model)
        reference.update_parameters(model)
        steps += 1
        ours, theirs = run.ema.state_dict(), reference.state_dict()  # type: ignore[union-attr]
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    run.ema.update_parameters = both  # type: ignore[method-assign]
    metrics = _train_epoch(run, tiny, cfg, 0, "accuracy")
    assert steps == tiny.train.num_batches(16, drop_last=True) and int(run.ema.n_averaged) == steps
    # The average is not the trained model, and the epoch's validation is the average's.
    assert not torch.equal(run.ema.module.fc.weight, run.model.fc.weight)
    logits = predict_logits(reference.module, tiny.val, tiny.preprocess, 64)
    assert metrics.val_loss == pytest.approx(F.cross_entropy(logits, tiny.val.labels).item(), rel=1e-5)


def test_the_kept_weights_and_stored_outputs_are_the_averages(tiny: TrialData, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    made: list[loop.WeightEMA] = []

    class Recorded(loop.WeightEMA):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(loop, "WeightEMA", Recorded)
    result = train_trial(ModelSection(), _train(ema_decay=0.8), tiny, _hp(ema=True), seed=0, device=CPU)
    (ema,) = made
    average = plain_state_dict(ema.module)
    assert result.state_dict.keys() == average.keys()
    assert all(torch.equal(result.state_dict[k], average[k]) for k in average)
    torch.testing.assert_close(result.val_logits, predict_logits(ema.module, tiny.val, tiny.preprocess, 64))
    # Off (the default): no average is kept.
    made.clear()
    train_trial(ModelSection(), _train(), tiny, HP, seed=0, device=CPU)
    assert not made


def test_a_resumed_trial_continues_its_moving_average_and_mixing(tiny: TrialData, tmp_path: Path) -> None:
    hp = _hp(ema=True, mixing="cutmix", mix_alpha=0.5, label_smoothing=0.1)
    cfg = _train(epochs=3, ema_decay=0.9)
    taken: list[Checkpoint] = []
    whole = train_trial(ModelSection(), cfg, tiny, hp, seed=3, device=CPU, on_checkpoint=taken.append)
    assert taken[0].ema is not None
    assert int(taken[0].ema["n_averaged"]) == tiny.train.num_batches(16, drop_last=True)
    path = tmp_path / "checkpoint.pt"
    taken[0].save(str(path))  # after epoch 1, through the file a retry reads (weights_only)
    resumed = train_trial(ModelSection(), cfg, tiny, hp, seed=3, device=CPU, resume=Checkpoint.load(str(path)))
    numbers = [[(m.epoch, m.train_loss, m.val_loss, m.score) for m in r.history] for r in (whole, resumed)]
    assert numbers[0] == numbers[1]
    assert all(torch.equal(whole.state_dict[k], resumed.state_dict[k]) for k in whole.state_dict)
    # A resume that lost the average (started it over from the resumed weights) would not repeat the trial.
    lost = Checkpoint.load(str(path))
    lost.ema = None
    restarted = train_trial(ModelSection(), cfg, tiny, hp, seed=3, device=CPU, resume=lost)
    assert [m.val_loss for m in restarted.history] != [m.val_loss for m in whole.history]
