"""One trial's training: optimizers, schedulers, and real training runs on a tiny digits subset (CPU)."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torchvision
from torch import nn

from hpsearch.config import DataSection, ModelSection, TrainSection
from hpsearch.data import TrialData, load_pool, make_split, trial_data
from hpsearch.train import (
    EpochMetrics,
    Hyperparams,
    NonFiniteLoss,
    TrainResult,
    predict_logits,
    resolve_device,
    train_trial,
)
from hpsearch.train._loop import evaluate
from hpsearch.train._optim import make_optimizer, make_scheduler, step_scheduler

CPU = torch.device("cpu")

# --------------------------------------------------------------------------------------- optimizers


def _net() -> nn.Module:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    net[0].weight.requires_grad_(False)
    return net


@pytest.mark.parametrize(("name", "cls"), [("adam", torch.optim.Adam), ("rmsprop", torch.optim.RMSprop),
                                           ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_make_optimizer(name: str, cls: type) -> None:
    net = _net()
    opt = make_optimizer(net.parameters(), Hyperparams(lr=0.0123, optimizer=name, scheduler="none",
                                                       weight_decay=0.001))
    assert type(opt) is cls
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["lr"] == 0.0123
    assert group["weight_decay"] == 0.001
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(group["params"]) == len(trainable) == 3
    assert all(p is q for p, q in zip(group["params"], trainable, strict=True))
    assert all(p is not net[0].weight for p in group["params"])


def test_make_optimizer_actually_steps_only_trainable_params() -> None:
    net = _net()
    frozen = net[0].weight.detach().clone()
    head = net[2].weight.detach().clone()
    opt = make_optimizer(net.parameters(), Hyperparams(lr=0.1, optimizer="sgd", scheduler="none"))
    net(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(net[0].weight, frozen)
    assert not torch.equal(net[2].weight, head)


def test_make_optimizer_unknown_name() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer(_net().parameters(), Hyperparams(lr=0.1, optimizer="lbfgs", scheduler="none"))


# --------------------------------------------------------------------------------------- schedulers


def _opt(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def _drive(hp: Hyperparams, val_losses: list[float]) -> list[float]:
    """The lr in force during each epoch, stepping the scheduler at each epoch's end."""
    opt = _opt(hp.lr)
    sched = make_scheduler(opt, hp)
    lrs = []
    for loss in val_losses:
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        step_scheduler(sched, loss)
    return lrs


def test_step_lr() -> None:
    hp = Hyperparams(lr=1.0, optimizer="sgd", scheduler="step", step_size=2, step_gamma=0.5)
    sched = make_scheduler(_opt(), hp)
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR)
    assert sched.step_size == 2 and sched.gamma == 0.5
    assert _drive(hp, [1.0] * 6) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])


def test_exponential_lr() -> None:
    hp = Hyperparams(lr=2.0, optimizer="sgd", scheduler="exponential", exp_gamma=0.8)
    sched = make_scheduler(_opt(), hp)
    assert isinstance(sched, torch.optim.lr_scheduler.ExponentialLR)
    assert sched.gamma == 0.8
    assert _drive(hp, [1.0] * 4) == pytest.approx([2.0, 1.6, 1.28, 1.024])


def test_plateau_lr_drops_after_patience_epochs_without_improvement() -> None:
    hp = Hyperparams(lr=1.0, optimizer="sgd", scheduler="plateau", plateau_factor=0.5, plateau_patience=1)
    sched = make_scheduler(_opt(), hp)
    assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert sched.factor == 0.5 and sched.patience == 1 and sched.mode == "min"
    # Improving losses never reduce the lr.
    assert _drive(hp, [5.0, 4.0, 3.0, 2.0, 1.0]) == pytest.approx([1.0] * 5)
    # Best at epoch 0; epochs 1 and 2 do not improve: more than `patience` bad epochs -> halved after epoch 2.
    assert _drive(hp, [1.0, 1.5, 1.2, 1.3, 1.1, 1.4]) == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.25])
    # It watches the loss (mode "min"): a rising loss is no improvement.
    patient0 = replace(hp, plateau_patience=0, plateau_factor=0.1)
    assert _drive(patient0, [1.0, 2.0, 3.0]) == pytest.approx([1.0, 1.0, 0.1])


def test_no_scheduler() -> None:
    hp = Hyperparams(lr=0.3, optimizer="sgd", scheduler="none")
    assert make_scheduler(_opt(), hp) is None
    step_scheduler(None, 1.0)  # a no-op
    assert _drive(hp, [1.0, 2.0, 3.0]) == pytest.approx([0.3, 0.3, 0.3])


def test_unknown_scheduler() -> None:
    with pytest.raises(ValueError, match="scheduler"):
        make_scheduler(_opt(), Hyperparams(lr=0.1, optimizer="sgd", scheduler="cyclic"))


# --------------------------------------------------------------------------------------- small parts


def test_hyperparams_from_params_ignores_other_keys() -> None:
    hp = Hyperparams.from_params({"lr": 0.01, "optimizer": "adam", "scheduler": "step", "step_size": 2,
                                  "not_a_field": 1})
    assert hp == Hyperparams(lr=0.01, optimizer="adam", scheduler="step", step_size=2)


def test_evaluate() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    loss, accuracy = evaluate(logits, labels)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    assert accuracy == pytest.approx(0.75)  # rows 0, 1 and 3 (a tie argmaxes to 0) are right


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            resolve_device("cuda")


# ------------------------------------------------------------------------------------- real training

MODEL = ModelSection(arch="resnet18", weights="none")
TRAIN2 = TrainSection(epochs=2, batch_size=16, eval_batch_size=64, device="cpu")
# ExponentialLR x30: a sane first epoch, then lr 3e-2 wrecks Adam's model (finite, ~chance accuracy),
# so the best epoch is the first, not the last, and the kept weights must be that epoch's.
HP = Hyperparams(lr=1e-3, optimizer="adam", scheduler="exponential", exp_gamma=30.0, dropout=0.2)


@pytest.fixture(scope="module")
def tiny() -> TrialData:
    cfg = DataSection(dataset="digits", image_size=32, subset=200, augment=["crop", "cutout"],
                      calibration_fraction=0)
    pool = load_pool(cfg)
    return trial_data(pool, make_split(pool, cfg, seed=0), cfg, pretrained=False, device=CPU)


@pytest.fixture(scope="module")
def run(tiny: TrialData) -> tuple[TrainResult, list[EpochMetrics]]:
    seen: list[EpochMetrics] = []
    result = train_trial(MODEL, TRAIN2, tiny, HP, seed=0, device=CPU, on_epoch=seen.append)
    return result, seen


def _numbers(history: list[EpochMetrics]) -> list[tuple[float, ...]]:
    # Everything but the wall-clock seconds.
    return [(m.epoch, m.train_loss, m.val_loss, m.val_accuracy, m.lr) for m in history]


def test_train_trial_calls_back_once_per_epoch(run: tuple[TrainResult, list[EpochMetrics]]) -> None:
    result, seen = run
    assert len(seen) == 2 and all(isinstance(m, EpochMetrics) for m in seen)
    assert [m.epoch for m in seen] == [0, 1]
    assert seen == result.history
    for m in seen:
        assert math.isfinite(m.train_loss) and math.isfinite(m.val_loss)
        assert 0.0 <= m.val_accuracy <= 1.0
        assert m.seconds > 0
    # The lr recorded is the one in force during that epoch; the scheduler steps after each epoch.
    assert [m.lr for m in seen] == pytest.approx([1e-3, 3e-2])
    # The first epoch learns (validation beats chance, 10 classes); the second is wrecked by its lr.
    assert seen[0].val_accuracy > 0.2
    assert seen[1].val_accuracy < seen[0].val_accuracy
    assert result.summary() == {"best_epoch": result.best.epoch, "val_accuracy": result.best.val_accuracy,
                                "val_loss": result.best.val_loss, "epochs_run": 2}


def test_train_trial_best_is_best_val_accuracy(run: tuple[TrainResult, list[EpochMetrics]]) -> None:
    result, _ = run
    best = max(result.history, key=lambda m: (m.val_accuracy, -m.val_loss))
    assert result.best == best
    assert result.best.epoch == 0 and len(result.history) == 2  # the best is not simply the last epoch


def test_train_trial_weights_are_plain_torchvision_and_match_the_logits(
    run: tuple[TrainResult, list[EpochMetrics]], tiny: TrialData
) -> None:
    result, _ = run
    assert all(t.device == CPU for t in result.state_dict.values())
    model = torchvision.models.get_model("resnet18", num_classes=10)
    assert set(result.state_dict) == set(model.state_dict())
    model.load_state_dict(result.state_dict, strict=True)
    assert result.val_logits.shape == (len(tiny.val), 10)
    assert result.test_logits.shape == (len(tiny.test), 10)
    assert result.val_logits.dtype == torch.float32 and result.test_logits.dtype == torch.float32
    # The saved weights are the best epoch's: a plain torchvision model reproduces its logits and metrics.
    val = predict_logits(model, tiny.val, tiny.preprocess, 64)
    test = predict_logits(model, tiny.test, tiny.preprocess, 64)
    assert torch.allclose(val, result.val_logits, atol=1e-4)
    assert torch.allclose(test, result.test_logits, atol=1e-4)
    loss, accuracy = evaluate(result.val_logits, tiny.val.labels)
    assert accuracy == pytest.approx(result.best.val_accuracy)
    assert loss == pytest.approx(result.best.val_loss, rel=1e-4)


def test_train_trial_same_seed_is_identical(run: tuple[TrainResult, list[EpochMetrics]], tiny: TrialData) -> None:
    first, _ = run
    again = train_trial(MODEL, TRAIN2, tiny, HP, seed=0, device=CPU)
    assert _numbers(again.history) == _numbers(first.history)
    assert torch.equal(again.val_logits, first.val_logits)
    assert torch.equal(again.test_logits, first.test_logits)
    assert all(torch.equal(again.state_dict[k], v) for k, v in first.state_dict.items())


def test_train_trial_other_seed_differs(run: tuple[TrainResult, list[EpochMetrics]], tiny: TrialData) -> None:
    first, _ = run
    other = train_trial(MODEL, TRAIN2.model_copy(update={"epochs": 1}), tiny, HP, seed=1, device=CPU)
    assert len(other.history) == 1
    assert other.history[0].train_loss != first.history[0].train_loss
    assert not torch.equal(other.val_logits, first.val_logits)


def test_train_trial_huge_lr_raises_non_finite_loss(tiny: TrialData) -> None:
    seen: list[EpochMetrics] = []
    hp = Hyperparams(lr=1e8, optimizer="sgd", scheduler="none")
    with pytest.raises(NonFiniteLoss) as info:
        train_trial(MODEL, TRAIN2, tiny, hp, seed=0, device=CPU, on_epoch=seen.append)
    assert info.value.epoch == 0
    assert "non-finite" in str(info.value) and "epoch 0" in str(info.value)
    assert seen == []  # raised before that epoch's callback


def test_train_trial_divergence_later_raises_at_that_epochs_end(tiny: TrialData) -> None:
    # A sane first epoch, then ExponentialLR multiplies the lr by 1e11: the second epoch diverges.
    seen: list[EpochMetrics] = []
    hp = Hyperparams(lr=1e-3, optimizer="sgd", scheduler="exponential", exp_gamma=1e11)
    with pytest.raises(NonFiniteLoss) as info:
        train_trial(MODEL, TRAIN2.model_copy(update={"epochs": 3}), tiny, hp, seed=0, device=CPU, on_epoch=seen.append)
    assert info.value.epoch == 1
    assert [m.epoch for m in seen] == [0]
    assert math.isfinite(seen[0].train_loss)


class _Stop(Exception):
    pass


def test_callback_exception_propagates(tiny: TrialData) -> None:
    calls: list[int] = []

    def prune(metrics: EpochMetrics) -> None:
        calls.append(metrics.epoch)
        raise _Stop(metrics.epoch)

    with pytest.raises(_Stop):
        train_trial(MODEL, TRAIN2, tiny, HP, seed=0, device=CPU, on_epoch=prune)
    assert calls == [0]  # the second epoch never ran


def test_import_train_does_not_import_optuna() -> None:
    code = "import sys, hpsearch.train; assert 'optuna' not in sys.modules, 'optuna imported'; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_fixed_shape_evaluation_feeds_one_batch_shape_and_gives_the_same_logits(tiny: TrialData) -> None:
    """What CUDA evaluation does by default: every batch padded to the eval batch size (one shape for cuDNN's
    autotuning and a compiled model), the padding's outputs dropped; the logits are those of plain batches."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    shapes: list[tuple[int, ...]] = []
    model.register_forward_hook(lambda _m, inputs, _out: shapes.append(tuple(inputs[0].shape)))
    assert len(tiny.val) % 16 and len(tiny.test) < 64  # a short last batch, and a split smaller than one batch
    plain = predict_logits(model, tiny.val, tiny.preprocess, 16, fixed_shape=False)
    assert len({s[0] for s in shapes}) == 2
    shapes.clear()
    fixed = predict_logits(model, tiny.val, tiny.preprocess, 16, fixed_shape=True)
    fixed_test = predict_logits(model, tiny.test, tiny.preprocess, 64, fixed_shape=True)
    assert {s[0] for s in shapes} == {16, 64}
    assert fixed.shape == plain.shape and fixed_test.shape[0] == len(tiny.test)
    torch.testing.assert_close(fixed, plain, rtol=1e-5, atol=1e-5)
