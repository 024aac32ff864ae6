"""One trial's training, independent of Optuna.

`train_trial` fine-tunes one model with one set of hyperparameters, evaluates on validation every epoch,
hands the epoch's numbers to a callback (which may raise to stop the trial, e.g. a pruner), keeps the best
epoch's weights, and returns them with that epoch's validation and test logits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpsearch import keys
from hpsearch._testhooks import fault_at
from hpsearch.config import ModelSection, TrainSection
from hpsearch.data import DeviceData, TrialData, training_input
from hpsearch.errors import UsageError
from hpsearch.model import build_model, plain_state_dict, set_train_mode
from hpsearch.preprocess import Preprocess
from hpsearch.train._accelerator import Precision, choose_precision
from hpsearch.train._checkpoints import EVERY_EPOCH, CheckpointPolicy, host_copy
from hpsearch.train._compile import compiled_model


@dataclass(frozen=True)
class Hyperparams:
    """One point of the search space. Field names are the Optuna parameter names (unique per branch)."""

    lr: float
    optimizer: str
    scheduler: str
    dropout: float = 0.0
    weight_decay: float = 0.0
    step_size: int = 1  # StepLR: epochs between decays
    step_gamma: float = 0.1  # StepLR: decay factor
    exp_gamma: float = 0.9  # ExponentialLR: decay per epoch
    plateau_factor: float = 0.1  # ReduceLROnPlateau: decay factor
    plateau_patience: int = 0  # ReduceLROnPlateau: epochs without val-loss improvement before decaying

    @classmethod
    def from_params(cls, params: dict[str, object]) -> Hyperparams:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in params.items() if k in known})  # type: ignore[arg-type]


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 0-based
    train_loss: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    best: EpochMetrics
    history: list[EpochMetrics]
    state_dict: dict[str, torch.Tensor]  # best epoch, plain torchvision keys, CPU
    val_logits: torch.Tensor  # float32 [n_val, classes], split order, best epoch
    test_logits: torch.Tensor  # float32 [n_test, classes], split order, best epoch
    extra: dict[str, object] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {keys.BEST_EPOCH: self.best.epoch, "val_accuracy": self.best.val_accuracy,
                "val_loss": self.best.val_loss, "epochs_run": len(self.history)}


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch: int, what: str) -> None:
        self.epoch = epoch
        super().__init__(f"non-finite {what} at epoch {epoch}")


# ------------------------------------------------------------------------------------------ factories


def make_optimizer(params: Iterable[nn.Parameter], hp: Hyperparams) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    # Fused kernels (one launch for all parameters) where torch has them: Adam and AdamW on a GPU.
    fused = {"fused": True} if params and params[0].is_cuda else {}
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay, **fused)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, **fused)
    if hp.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=hp.lr, weight_decay=hp.weight_decay, alpha=0.9, eps=1e-6)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.lr, weight_decay=hp.weight_decay, momentum=0.9, nesterov=True)
    raise ValueError(f"optimizer: {hp.optimizer!r} is not one of adam, rmsprop, sgd, adamw")


Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


def make_scheduler(optimizer: torch.optim.Optimizer, hp: Hyperparams) -> Scheduler | None:
    """Epoch-level schedulers; ReduceLROnPlateau watches the validation loss."""
    sched = torch.optim.lr_scheduler
    if hp.scheduler == "step":
        return sched.StepLR(optimizer, step_size=hp.step_size, gamma=hp.step_gamma)
    if hp.scheduler == "exponential":
        return sched.ExponentialLR(optimizer, gamma=hp.exp_gamma)
    if hp.scheduler == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode="min", factor=hp.plateau_factor,
                                       patience=hp.plateau_patience)
    if hp.scheduler == "none":
        return None
    raise ValueError(f"scheduler: {hp.scheduler!r} is not one of step, exponential, plateau, none")


def step_scheduler(scheduler: Scheduler | None, val_loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif scheduler is not None:
        scheduler.step()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device: cuda was asked for but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------------ the loop


FP32 = Precision(None, False)


@torch.inference_mode()
def predict_logits(model: nn.Module, data: DeviceData, preprocess: Preprocess, batch_size: int,
                   precision: Precision = FP32) -> torch.Tensor:
    """Logits of a split in its order; in fp32 unless told (the per-epoch validation may use autocast: stored
    outputs never do, so the ensemble's fit matches `predict` and ONNX)."""
    model.eval()
    device = data.device
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    outs = []
    for images, _ in data.batches(batch_size):
        with precision.autocast(device):
            outs.append(model(preprocess(images).contiguous(memory_format=fmt)).float())
    return torch.cat(outs)


def evaluate(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy) of logits against labels."""
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy


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

    FIELDS = ("epoch", "model", "optimizer", "scheduler", "generator", "rng", "best_state", "augment_generator",
              "cuda_rng", "scaler")

    def save(self, path: str) -> None:
        data = {**{k: getattr(self, k) for k in self.FIELDS}, "history": [asdict(m) for m in self.history]}
        torch.save(data, path)

    @classmethod
    def load(cls, path: str) -> Checkpoint:
        # weights_only: tensors, numbers, strings, lists and dicts only; never an arbitrary pickle.
        data = torch.load(path, map_location="cpu", weights_only=True)
        data["history"] = [EpochMetrics(**m) for m in data["history"]]
        return cls(**data)


def _best(history: list[EpochMetrics]) -> EpochMetrics | None:
    return max(history, key=lambda m: (m.val_accuracy, -m.val_loss, -m.epoch), default=None)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                data: TrialData, train_cfg: TrainSection, precision: Precision, gen: torch.Generator,
                aug: torch.Generator) -> torch.Tensor:
    """One epoch of optimizer steps; returns the summed loss, on the device: nothing in here waits for the
    device (the GPU test runs it under torch.cuda.set_sync_debug_mode("error")), except fp16's scaler, which
    reads its inf check."""
    device = data.train.device
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    loss_sum = torch.zeros((), device=device)
    for images, labels in data.train.batches(train_cfg.batch_size, shuffle=True, generator=gen, drop_last=True):
        x = training_input(images, data.preprocess, data.augment, aug)
        with precision.autocast(device):
            logits = model(x.contiguous(memory_format=fmt))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=train_cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach()
        fault_at("step")
    return loss_sum


def train_trial(
    model_cfg: ModelSection,
    train_cfg: TrainSection,
    data: TrialData,
    hp: Hyperparams,
    *,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    resume: Checkpoint | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    checkpoint: CheckpointPolicy = EVERY_EPOCH,
) -> TrainResult:
    """Train one trial; with `resume`, continue after the checkpoint's epoch instead of starting over.

    `on_checkpoint` gets a host copy of the state at each epoch end `checkpoint` says is due (never after the
    last epoch): it may write it on another thread while the next epoch trains."""
    precision = choose_precision(train_cfg.precision, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each convolution once
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # the batch order, drawn on the CPU on every device
    # Augmentation draws on the device itself on a GPU (no host round trip per step); on the CPU the same
    # generator as the order, as before.
    aug = torch.Generator(device=device).manual_seed(seed) if cuda else gen
    fmt = torch.channels_last if cuda else torch.contiguous_format
    with device:  # built on its device: no host copy of the weights first
        model = build_model(model_cfg, data.num_classes, data.preprocess.image_size, hp.dropout,
                            tensor_dropout=train_cfg.compile)
    model = model.to(device, memory_format=fmt)
    forward = model  # what the steps and evaluation call: the compiled module when [train] compile is on
    if train_cfg.compile:
        key = (model_cfg.arch, model_cfg.freeze, data.num_classes, data.preprocess.image_size,
               train_cfg.batch_size, str(device))
        model, forward = compiled_model(key, model, hp.dropout)
    optimizer = make_optimizer(model.parameters(), hp)
    scheduler = make_scheduler(optimizer, hp)
    scaler = precision.scaler(device)
    steps = data.train.num_batches(train_cfg.batch_size, drop_last=True)

    history: list[EpochMetrics] = []
    best_state: dict[str, torch.Tensor] = {}
    if resume is not None:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        if scheduler is not None and resume.scheduler is not None:
            scheduler.load_state_dict(resume.scheduler)
        gen.set_state(resume.generator)
        torch.set_rng_state(resume.rng)
        if cuda and resume.augment_generator is not None:
            aug.set_state(resume.augment_generator)
        if cuda and resume.cuda_rng is not None:
            torch.cuda.set_rng_state(resume.cuda_rng, device)
        if resume.scaler:
            scaler.load_state_dict(resume.scaler)
        history, best_state = list(resume.history), resume.best_state
    best = _best(history)
    last_checkpoint, epochs_since = time.monotonic(), 0
    for epoch in range(len(history), train_cfg.epochs):
        start = time.perf_counter()
        set_train_mode(model)
        loss_sum = train_steps(forward, optimizer, scaler, data, train_cfg, precision, gen, aug)
        train_loss = loss_sum.item() / max(1, steps)  # the epoch's one host synchronization
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(epoch, "training loss")
        val_logits = predict_logits(forward, data.val, data.preprocess, train_cfg.eval_batch_size, precision)
        val_loss, val_accuracy = evaluate(val_logits, data.val.labels)
        if not math.isfinite(val_loss):
            raise NonFiniteLoss(epoch, "validation loss")
        lr = optimizer.param_groups[0]["lr"]
        step_scheduler(scheduler, val_loss)
        metrics = EpochMetrics(epoch, train_loss, val_loss, val_accuracy, lr, time.perf_counter() - start)
        history.append(metrics)
        if best is None or (val_accuracy, -val_loss) > (best.val_accuracy, -best.val_loss):
            best, best_state = metrics, plain_state_dict(model)
        if on_epoch is not None:
            on_epoch(metrics)
        epochs_since += 1
        last = epoch + 1 == train_cfg.epochs
        if (on_checkpoint is not None and not last
                and checkpoint.due(epochs_since, time.monotonic() - last_checkpoint)):
            on_checkpoint(Checkpoint(
                epoch, plain_state_dict(model), host_copy(optimizer.state_dict()),
                host_copy(scheduler.state_dict()) if scheduler is not None else None, gen.get_state(),
                torch.get_rng_state(), list(history), best_state,
                augment_generator=aug.get_state() if cuda else None,
                cuda_rng=torch.cuda.get_rng_state(device) if cuda else None,
                scaler=scaler.state_dict() if precision.scaled else None))
            last_checkpoint, epochs_since = time.monotonic(), 0

    assert best is not None
    model.load_state_dict(best_state)
    # The stored outputs: fp32 whatever the training precision (they are what the ensemble is fit on).
    val_logits = predict_logits(forward, data.val, data.preprocess, train_cfg.eval_batch_size).cpu()
    test_logits = predict_logits(forward, data.test, data.preprocess, train_cfg.eval_batch_size).cpu()
    return TrainResult(best, history, best_state, val_logits, test_logits)
