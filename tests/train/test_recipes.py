"""A trial's fine-tuning recipe reaching the optimizer and the model: the head's lr multiplier, unfreezing the
backbone at its epoch, a searched batch size with its lr scaling, searched label smoothing, the metric that picks
the best epoch. Real ResNet-18s on a tiny digits subset, on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score

from hpsearch.config import ModelSection, TrainSection
from hpsearch.data import TrialData
from hpsearch.train import Checkpoint, Hyperparams, train_trial
from hpsearch.train._loop import _start_run, _train_epoch

CPU = torch.device("cpu")
HP = Hyperparams(lr=1e-3, optimizer="adam", scheduler="none")


def _train(**values: object) -> TrainSection:
    return TrainSection(**{"epochs": 2, "batch_size": 16, "eval_batch_size": 64, "device": "cpu", **values})


def test_the_head_lr_multiplier_reaches_the_optimizers_param_groups(tiny: TrialData) -> None:
    run = _start_run(ModelSection(), _train(), tiny, Hyperparams(**{**HP.__dict__, "head_lr_mult": 8.0}), 0, CPU)
    body, head = run.optimizer.param_groups
    assert body["lr"] == pytest.approx(1e-3) and head["lr"] == pytest.approx(8e-3)
    # The head is the replaced classifier (resnet's fc), the backbone everything else.
    assert [id(p) for p in head["params"]] == [id(run.model.fc.weight), id(run.model.fc.bias)]
    assert len(body["params"]) + 2 == len(list(run.model.parameters()))
    # Without a multiplier: one group at lr, as before.
    (only,) = _start_run(ModelSection(), _train(), tiny, HP, 0, CPU).optimizer.param_groups
    assert only["lr"] == pytest.approx(1e-3) and len(only["params"]) == len(list(run.model.parameters()))


def test_a_searched_batch_size_scales_lr_linearly_from_the_base(tiny: TrialData) -> None:
    hp = Hyperparams(**{**HP.__dict__, "batch_size": 32, "label_smoothing": 0.15})
    linear = _start_run(ModelSection(), _train(lr_scaling="linear", base_batch_size=8), tiny, hp, 0, CPU)
    assert linear.batch_size == 32 and linear.label_smoothing == 0.15
    assert linear.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 32 / 8)
    # The base defaults to [train] batch_size; lr_scaling none leaves the searched lr as it is.
    default_base = _start_run(ModelSection(), _train(lr_scaling="linear"), tiny, hp, 0, CPU)
    assert default_base.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 32 / 16)
    unscaled = _start_run(ModelSection(), _train(), tiny, hp, 0, CPU)
    assert unscaled.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    # Unsearched: [train]'s batch size and label smoothing.
    fixed = _start_run(ModelSection(), _train(label_smoothing=0.05), tiny, HP, 0, CPU)
    assert fixed.batch_size == 16 and fixed.label_smoothing == 0.05


def test_the_searched_batch_size_is_what_an_epoch_steps_with(tiny: TrialData) -> None:
    hp = Hyperparams(**{**HP.__dict__, "batch_size": 40, "scheduler": "cosine"})
    run = _start_run(ModelSection(), _train(epochs=1), tiny, hp, 0, CPU)
    steps = tiny.train.num_batches(40, drop_last=True)
    assert run.scheduler.step_limit == steps  # the cosine spans the run's steps at this batch size
    _train_epoch(run, tiny, _train(epochs=1), 0, "accuracy")
    assert run.scheduler.steps_done == steps


def test_unfreezing_makes_the_backbone_trainable_at_its_epoch(tiny: TrialData) -> None:
    model = ModelSection(freeze="backbone")
    cfg = _train(epochs=3, unfreeze_epoch=2)
    run = _start_run(model, cfg, tiny, Hyperparams(**{**HP.__dict__, "head_lr_mult": 10.0}), 0, CPU)
    conv = run.model.conv1.weight
    before = conv.detach().clone()
    _train_epoch(run, tiny, cfg, 0, "accuracy")
    # Epoch 1: head only; the backbone's weights and BatchNorm statistics stay as loaded.
    assert not conv.requires_grad and torch.equal(conv, before)
    assert run.model.fc.weight.requires_grad
    running = run.model.bn1.running_mean.clone()
    _train_epoch(run, tiny, cfg, 1, "accuracy")
    # Epoch 2 (unfreeze_epoch): everything trains, the backbone at lr, the head at 10 lr.
    assert all(p.requires_grad for p in run.model.parameters())
    assert not torch.equal(conv, before)
    assert not torch.equal(run.model.bn1.running_mean, running)
    assert [g["lr"] for g in run.optimizer.param_groups] == pytest.approx([1e-3, 1e-2])
    # Without unfreeze_epoch a frozen backbone never joins the optimizer.
    frozen = _start_run(model, _train(), tiny, HP, 0, CPU)
    assert sum(len(g["params"]) for g in frozen.optimizer.param_groups) == 2


@pytest.mark.parametrize("metric", ["balanced_accuracy", "macro_f1", "loss"])
def test_each_epoch_is_scored_and_the_best_chosen_by_the_studys_metric(tiny: TrialData, metric: str) -> None:
    # ExponentialLR x30 wrecks the second epoch: the best is the first by every metric.
    hp = Hyperparams(lr=1e-3, optimizer="adam", scheduler="exponential", exp_gamma=30.0)
    result = train_trial(ModelSection(), _train(), tiny, hp, seed=0, device=CPU, metric=metric)
    labels = tiny.val.labels.numpy()
    predicted = result.val_logits.argmax(1).numpy()  # the best epoch's stored validation outputs
    expected = {"balanced_accuracy": balanced_accuracy_score(labels, predicted),
                "macro_f1": f1_score(labels, predicted, average="macro", zero_division=0),
                "loss": result.best.val_loss}[metric]
    assert result.best.score == pytest.approx(expected, abs=1e-6)
    better = min if metric == "loss" else max
    assert result.best.score == better(m.score for m in result.history)
    assert result.best.epoch == 0


def test_a_resumed_trial_continues_its_per_step_schedule_exactly(tiny: TrialData, tmp_path: Path) -> None:
    hp = Hyperparams(lr=2e-3, optimizer="adamw", scheduler="onecycle", warmup_epochs=0.5, head_lr_mult=4.0,
                     batch_size=24, label_smoothing=0.1)
    cfg = _train(epochs=3)
    taken: list[Checkpoint] = []
    whole = train_trial(ModelSection(), cfg, tiny, hp, seed=3, device=CPU, on_checkpoint=taken.append)
    path = tmp_path / "checkpoint.pt"
    taken[0].save(str(path))  # after epoch 1, through the file a retry reads (weights_only)
    resumed = train_trial(ModelSection(), cfg, tiny, hp, seed=3, device=CPU, resume=Checkpoint.load(str(path)))
    numbers = [[(m.epoch, m.lr, m.train_loss, m.val_loss, m.score) for m in r.history] for r in (whole, resumed)]
    assert numbers[0] == numbers[1]
    # The lr at each epoch's end followed the cycle: up over the warmup, then down to its end.
    lrs = [m.lr for m in whole.history]
    assert lrs[0] > lrs[1] > lrs[2]
