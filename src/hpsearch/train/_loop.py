"""One trial's training, independent of Optuna.

`train_trial` fine-tunes one model with one set of hyperparameters, evaluates on validation every epoch,
hands the epoch's numbers to a callback (which may raise to stop the trial, e.g. a pruner), keeps the best
epoch's weights, and returns them with that epoch's validation and test logits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpsearch import keys
from hpsearch._testhooks import fault_at
from hpsearch.data import DeviceData, Mixer, TrialData, mixer, training_input
from hpsearch.kernels import ieee_fp32
from hpsearch.model import (
    ModelSettings,
    build_model,
    freeze_backbone,
    head_path,
    plain_state_dict,
    set_train_mode,
    unfreeze_backbone,
)
from hpsearch.preprocess import Preprocess
from hpsearch.train._accelerator import Precision, choose_precision
from hpsearch.train._checkpoints import EVERY_EPOCH, CheckpointPolicy, host_copy
from hpsearch.train._compile import compiled_model
from hpsearch.train._ema import WeightEMA
from hpsearch.train._hyperparams import Hyperparams
from hpsearch.train._metrics import evaluate, rank_key, score
from hpsearch.train._optim import Schedule, make_optimizer, make_schedule, param_groups
from hpsearch.train._settings import TrainSettings


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 0-based
    train_loss: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float
    score: float = math.nan  # the study's metric (accuracy, balanced_accuracy, macro_f1 or loss) on validation


@dataclass
class TrainResult:
    best: EpochMetrics
    history: list[EpochMetrics]
    state_dict: dict[str, torch.Tensor]  # best epoch, plain torchvision keys, CPU
    val_logits: torch.Tensor  # float32 [n_val, classes], split order, best epoch
    test_logits: torch.Tensor  # float32 [n_test, classes], split order, best epoch
    extra: dict[str, object] = field(default_factory=dict)
    calibration_logits: torch.Tensor | None = None  # float32 [n_calibration, classes], best epoch; None: no part

    def summary(self) -> dict[str, object]:
        return {keys.BEST_EPOCH: self.best.epoch, "val_accuracy": self.best.val_accuracy,
                "val_loss": self.best.val_loss, "epochs_run": len(self.history)}


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch: int, what: str) -> None:
        self.epoch = epoch
        super().__init__(f"non-finite {what} at epoch {epoch}")


FP32 = Precision(None, False)


@torch.inference_mode()
def predict_logits(model: nn.Module, data: DeviceData, preprocess: Preprocess, batch_size: int,
                   precision: Precision = FP32, *, fixed_shape: bool | None = None) -> torch.Tensor:
    """Logits of a split in its order; in fp32 unless told (the per-epoch validation may use autocast: stored
    outputs never do, so the ensemble's fit matches `predict` and ONNX).

    With `fixed_shape` (the default on CUDA) every batch the model sees has `batch_size` rows: a short one (the
    split's last, or a split smaller than a batch) is padded with copies of its last image, whose outputs are
    dropped. Each new input shape costs cuDNN's autotuning a search and a compiled model a recompilation (then
    a dynamic-shape graph); val, test and every fold's validation part would each bring their own."""
    model.eval()
    device = data.device
    fixed = device.type == "cuda" if fixed_shape is None else fixed_shape
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    outs = []
    with ieee_fp32():  # a greedy soup's re-run too: the fp32 math of the stored outputs and of predict
        for images, _ in data.batches(batch_size):
            rows = len(images)
            if fixed and rows < batch_size:
                images = torch.cat([images, images[-1:].expand(batch_size - rows, *images.shape[1:])])
            with precision.autocast(device):
                outs.append(model(preprocess(images).contiguous(memory_format=fmt)).float()[:rows])
    return torch.cat(outs)


@dataclass
class Checkpoint:
    """Everything needed to continue a trial after its last completed epoch: weights, optimizer and scheduler
    state, and every random number generator the trial draws from (the batch order's, the augmentation's on
    its device, torch's global CPU one for dropout, CUDA's). On the CPU a resumed trial repeats the
    uninterrupted one exactly; on a GPU, kernels that are not deterministic (cuDNN's autotuned ones) may make
    it differ in the last bits."""

    epoch: int  # the last completed epoch (0-based)
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    generator: torch.Tensor  # the batch-order generator's state (CPU)
    rng: torch.Tensor  # torch's global CPU RNG (dropout on the CPU)
    history: list[EpochMetrics]
    best_state: dict[str, torch.Tensor]
    augment_generator: torch.Tensor | None = None  # the device generator of the augmentation, on a GPU
    cuda_rng: torch.Tensor | None = None  # CUDA's RNG of the trial's device (dropout on the GPU)
    scaler: dict[str, Any] | None = None  # fp16's gradient scaler
    ema: dict[str, torch.Tensor] | None = None  # the weights' moving average (AveragedModel's state), when on

    FIELDS = ("epoch", "model", "optimizer", "scheduler", "generator", "rng", "best_state", "augment_generator",
              "cuda_rng", "scaler", "ema")

    def save(self, path: str) -> None:
        data = {**{k: getattr(self, k) for k in self.FIELDS}, "history": [asdict(m) for m in self.history]}
        torch.save(data, path)

    @classmethod
    def load(cls, path: str) -> Checkpoint:
        # weights_only: tensors, numbers, strings, lists and dicts only; never an arbitrary pickle.
        data = torch.load(path, map_location="cpu", weights_only=True)
        # An older hpsearch's history has no score: its studies all optimized validation accuracy.
        data["history"] = [EpochMetrics(**{"score": m["val_accuracy"], **m}) for m in data["history"]]
        return cls(**data)


@dataclass(frozen=True)
class StepTotals:
    """An epoch's steps, summed on the device: the losses that count and how many steps they are."""

    loss_sum: torch.Tensor
    steps: torch.Tensor

    def epoch_loss(self, epoch: int) -> float:
        """The mean loss of the steps that count (the epoch's one host synchronization); NonFiniteLoss when none
        does or the sum is not finite: a divergence, which ends the trial."""
        loss_sum, steps = torch.stack([self.loss_sum, self.steps.to(self.loss_sum.dtype)]).tolist()
        if steps < 1 or not math.isfinite(loss_sum):
            raise NonFiniteLoss(epoch, "training loss")
        return loss_sum / steps


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                data: TrialData, batch_size: int, label_smoothing: float, schedule: Schedule, precision: Precision,
                gen: torch.Generator, aug: torch.Generator, *, mix: Mixer | None = None, augment_strength: float = 0.0,
                ema: WeightEMA | None = None) -> StepTotals:
    """One epoch of optimizer steps; returns their summed loss, on the device: nothing in here waits for the
    device (the GPU test runs it under torch.cuda.set_sync_debug_mode("error")), except fp16's scaler, which
    reads its inf check.

    A trial's recipe adds to each step: RandAugment of the uint8 batch at `augment_strength` (0: none), `mix`
    (mixup or cutmix: the loss then takes soft targets, label smoothing applied on top of them), and the weights'
    moving average `ema`, updated after each optimizer step.

    With fp16's scaler a step whose loss is inf or NaN (an overflow) is one the scaler skips, lowering its
    scale: it is left out of the sum and the count, so one overflow no longer makes the epoch's loss infinite
    and prunes a healthy trial; an epoch with no finite step is a divergence. In fp32 and bf16 nothing skips a
    step: any non-finite loss makes the sum non-finite, a divergence."""
    device = data.train.device
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    loss_sum = torch.zeros((), device=device)
    counted = torch.zeros((), dtype=torch.int64, device=device)
    for images, labels in data.train.batches(batch_size, shuffle=True, generator=gen, drop_last=True):
        x = training_input(images, data.preprocess, data.augment, aug, augment_strength)
        targets = labels
        if mix is not None:
            x, targets = mix(x, labels)  # class probabilities [N, classes]
        with precision.autocast(device):
            logits = model(x.contiguous(memory_format=fmt))
        # With probabilities as targets, torch smooths them the same way: targets * (1 - s) + s / classes.
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update_parameters(model)
        schedule.after_step()  # a float per param group: no device work
        if precision.scaled:  # on the device, no sync: a skipped step adds nothing
            finite = torch.isfinite(loss.detach())
            loss_sum += torch.where(finite, loss.detach(), 0.0)
            counted += finite
        else:
            loss_sum += loss.detach()
            counted += 1
        fault_at("step")
    return StepTotals(loss_sum, counted)


@dataclass
class _Run:
    """What one trial's epochs work on: the model and what the steps call (the compiled module when
    `[train] compile` is on), its optimizer, scheduler and gradient scaler, the precision, and the two
    generators: the batch order's (on the CPU on every device) and the augmentation's."""

    model: nn.Module
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    scaler: torch.amp.GradScaler
    precision: Precision
    gen: torch.Generator
    aug: torch.Generator
    device: torch.device
    batch_size: int  # the trial's (searched or [train]'s)
    label_smoothing: float  # the trial's (searched or [train]'s)
    unfreeze_epoch: int = 0  # 1-based epoch from which a frozen backbone trains too; 0 = never
    mix: Mixer | None = None  # the trial's mixup or cutmix
    augment_strength: float = 0.0  # the trial's RandAugment strength (0: none)
    ema: WeightEMA | None = None  # the weights' moving average, when the trial keeps one

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def evaluated(self) -> nn.Module:
        """What validation, the best epoch's weights and so the stored outputs come from: the moving average
        when the trial keeps one (evaluated eagerly, also under `[train] compile`), else the trained model."""
        return self.ema.module if self.ema is not None else self.forward

    def steps(self, data: TrialData) -> StepTotals:
        """One epoch of this trial's optimizer steps."""
        return train_steps(self.forward, self.optimizer, self.scaler, data, self.batch_size, self.label_smoothing,
                           self.scheduler, self.precision, self.gen, self.aug, mix=self.mix,
                           augment_strength=self.augment_strength, ema=self.ema)

    def restore(self, resume: Checkpoint) -> None:
        """Continue from a checkpoint: weights, optimizer, scheduler, scaler and every generator."""
        self.model.load_state_dict(resume.model)
        self.optimizer.load_state_dict(resume.optimizer)
        if resume.scheduler is not None:
            self.scheduler.load_state_dict(resume.scheduler)
        self.gen.set_state(resume.generator)
        torch.set_rng_state(resume.rng)
        if self.cuda and resume.augment_generator is not None:
            self.aug.set_state(resume.augment_generator)
        if self.cuda and resume.cuda_rng is not None:
            torch.cuda.set_rng_state(resume.cuda_rng, self.device)
        if resume.scaler:
            self.scaler.load_state_dict(resume.scaler)
        if self.ema is not None and resume.ema is not None:
            self.ema.load_state_dict(resume.ema)

    def checkpoint(self, epoch: int, history: list[EpochMetrics], best_state: dict[str, torch.Tensor]
                   ) -> Checkpoint:
        """A host copy of the state after `epoch`: the caller may write it while the next epoch trains."""
        return Checkpoint(
            epoch, plain_state_dict(self.model), host_copy(self.optimizer.state_dict()),
            host_copy(self.scheduler.state_dict()), self.gen.get_state(),
            torch.get_rng_state(), list(history), best_state,
            augment_generator=self.aug.get_state() if self.cuda else None,
            cuda_rng=torch.cuda.get_rng_state(self.device) if self.cuda else None,
            scaler=self.scaler.state_dict() if self.precision.scaled else None,
            ema=host_copy(self.ema.state_dict()) if self.ema is not None else None)


def _start_run(model_cfg: ModelSettings, train_cfg: TrainSettings, data: TrialData, hp: Hyperparams, seed: int,
               device: torch.device) -> _Run:
    """Seed, build (and compile) the model on its device, and make its optimizer, scheduler and scaler; in
    this order, which the seeded initial weights depend on."""
    precision = choose_precision(train_cfg.precision, device)
    cuda = device.type == "cuda"
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # the batch order, drawn on the CPU on every device
    # Augmentation draws on the device itself on a GPU (no host round trip per step); on the CPU the same
    # generator as the order: one random stream, so a CPU trial gives what existing studies recorded.
    aug = torch.Generator(device=device).manual_seed(seed) if cuda else gen
    fmt = torch.channels_last if cuda else torch.contiguous_format
    with device:  # built on its device: no host copy of the weights first
        model = build_model(model_cfg, data.num_classes, data.preprocess.image_size, hp.dropout,
                            tensor_dropout=train_cfg.compile)
    model = model.to(device, memory_format=fmt)
    forward = model
    batch_size = hp.batch_size or train_cfg.batch_size
    if train_cfg.compile:
        key = (model_cfg.arch, model_cfg.freeze, data.num_classes, data.preprocess.image_size, batch_size,
               str(device))
        model, forward = compiled_model(key, model, hp.dropout)
        if model_cfg.freeze == "backbone":
            freeze_backbone(model)  # the worker's one module: an earlier trial may have unfrozen it
    unfreeze = train_cfg.unfreeze_epoch if model_cfg.freeze == "backbone" else 0
    groups = param_groups(model, head_path(model), hp.lr * lr_scale(train_cfg, batch_size), hp.head_lr_mult,
                          keep_frozen=unfreeze > 0)
    optimizer = make_optimizer(groups, hp)
    steps = data.train.num_batches(batch_size, drop_last=True)
    schedule = make_schedule(optimizer, hp, steps, train_cfg.epochs)
    smoothing = train_cfg.label_smoothing if hp.label_smoothing is None else hp.label_smoothing
    # A copy of the built weights (after the seeded draws above: the same initial weights with or without it).
    ema = WeightEMA(model, train_cfg.ema_decay) if hp.ema else None
    return _Run(model, forward, optimizer, schedule, precision.scaler(device), precision, gen, aug, device,
                batch_size, smoothing, unfreeze, mixer(hp.mixing, hp.mix_alpha, data.num_classes),
                hp.augment_strength, ema)


def lr_scale(train_cfg: TrainSettings, batch_size: int) -> float:
    """`[train] lr_scaling`: linear multiplies the searched lr by batch size / base batch size."""
    if train_cfg.lr_scaling == "linear":
        return batch_size / (train_cfg.base_batch_size or train_cfg.batch_size)
    return 1.0


def _train_epoch(run: _Run, data: TrialData, train_cfg: TrainSettings, epoch: int, metric: str) -> EpochMetrics:
    """One epoch's steps, then its validation and the scheduler's step; non-finite losses stop the trial."""
    start = time.perf_counter()
    if run.unfreeze_epoch and epoch + 1 >= run.unfreeze_epoch:
        unfreeze_backbone(run.model)  # in the optimizer since the start, without gradients until now
    set_train_mode(run.model)
    train_loss = run.steps(data).epoch_loss(epoch)
    val_logits = predict_logits(run.evaluated, data.val, data.preprocess, train_cfg.eval_batch_size, run.precision)
    val_loss, val_accuracy = evaluate(val_logits, data.val.labels)
    if not math.isfinite(val_loss):
        raise NonFiniteLoss(epoch, "validation loss")
    value = score(metric, val_logits, data.val.labels, val_loss, val_accuracy)
    lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.after_epoch(val_loss)
    return EpochMetrics(epoch, train_loss, val_loss, val_accuracy, lr, time.perf_counter() - start, value)


def _key(metric: str, m: EpochMetrics) -> tuple[float, float]:
    return rank_key(metric, m.score, m.val_loss, m.val_accuracy)


def _best(history: list[EpochMetrics], metric: str) -> EpochMetrics | None:
    return max(history, key=lambda m: (*_key(metric, m), -m.epoch), default=None)


def _is_better(metrics: EpochMetrics, best: EpochMetrics | None, metric: str) -> bool:
    return best is None or _key(metric, metrics) > _key(metric, best)


def train_trial(
    model_cfg: ModelSettings,
    train_cfg: TrainSettings,
    data: TrialData,
    hp: Hyperparams,
    *,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    resume: Checkpoint | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    checkpoint: CheckpointPolicy = EVERY_EPOCH,
    metric: str = "accuracy",
) -> TrainResult:
    """Train one trial; with `resume`, continue after the checkpoint's epoch instead of starting over. Its best
    epoch is the best by `metric` (accuracy, balanced_accuracy, macro_f1 or loss), each epoch's `score`.

    `on_checkpoint` gets a host copy of the state at each epoch end `checkpoint` says is due (never after the
    last epoch): it may write it on another thread while the next epoch trains. The trial runs inside
    `ieee_fp32()`: fp32 math is IEEE fp32 (TF32 off), and cuDNN autotunes each convolution's fixed shapes once."""
    with ieee_fp32():
        return _train(model_cfg, train_cfg, data, hp, seed, device, on_epoch, resume, on_checkpoint, checkpoint,
                      metric)


def _train(model_cfg: ModelSettings, train_cfg: TrainSettings, data: TrialData, hp: Hyperparams, seed: int,
           device: torch.device, on_epoch: Callable[[EpochMetrics], None] | None, resume: Checkpoint | None,
           on_checkpoint: Callable[[Checkpoint], None] | None, checkpoint: CheckpointPolicy,
           metric: str) -> TrainResult:
    run = _start_run(model_cfg, train_cfg, data, hp, seed, device)
    history: list[EpochMetrics] = []
    best_state: dict[str, torch.Tensor] = {}
    if resume is not None:
        run.restore(resume)
        history, best_state = list(resume.history), resume.best_state
    best = _best(history, metric)
    last_checkpoint, epochs_since = time.monotonic(), 0
    for epoch in range(len(history), train_cfg.epochs):
        metrics = _train_epoch(run, data, train_cfg, epoch, metric)
        history.append(metrics)
        if _is_better(metrics, best, metric):
            best, best_state = metrics, plain_state_dict(run.model if run.ema is None else run.ema.module)
        if on_epoch is not None:
            on_epoch(metrics)
        epochs_since += 1
        last = epoch + 1 == train_cfg.epochs
        if (on_checkpoint is not None and not last
                and checkpoint.due(epochs_since, time.monotonic() - last_checkpoint)):
            on_checkpoint(run.checkpoint(epoch, history, best_state))
            last_checkpoint, epochs_since = time.monotonic(), 0
    assert best is not None
    run.model.load_state_dict(best_state)  # the moving average's weights, when the trial keeps one
    # The stored outputs: fp32 whatever the training precision (they are what the ensemble is fit on).
    val_logits = predict_logits(run.forward, data.val, data.preprocess, train_cfg.eval_batch_size).cpu()
    test_logits = predict_logits(run.forward, data.test, data.preprocess, train_cfg.eval_batch_size).cpu()
    calibration_logits = None if data.calibration is None else predict_logits(
        run.forward, data.calibration, data.preprocess, train_cfg.eval_batch_size).cpu()
    return TrainResult(best, history, best_state, val_logits, test_logits, calibration_logits=calibration_logits)
