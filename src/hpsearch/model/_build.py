"""Models by torchvision or timm name: weights (torchvision enum or local file), a new head, optional freezing.

The head is the architecture's own final `nn.Linear` (a timm model's `get_classifier()`), resized for the
dataset's classes. The trial's dropout sits in front of it without adding a module to the state dict, so saved
weights keep plain torchvision (or timm) keys and load into `torchvision.models.get_model(arch, num_classes=n)`
(`timm.create_model(NAME, num_classes=n)`) with `strict=True`. timm models are built with drop_rate 0: the
trial's dropout on the classifier's input is where timm's drop_rate acts in most of its models.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from hpsearch.archs import family_of, resolve_path, timm_name
from hpsearch.errors import ConfigError, first_line
from hpsearch.model._settings import ModelSettings, StudyModelSettings
from hpsearch.timm_archs import TimmMissing, classifier_path, create_timm, is_timm_model, timm_builder_kwargs


class DropoutLinear(nn.Linear):
    """`nn.Linear` with dropout on its input: same parameters and keys as the Linear it replaces."""

    def __init__(self, in_features: int, out_features: int, p: float, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(dropout(x, self.p, self.training))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={float(self.p)}"


class TensorDropout(nn.Module):
    """`nn.Dropout` whose probability is a 0-d buffer: under torch.compile a new probability is an input of the
    graph, not a constant baked into it (a new trial's dropout must not recompile)."""

    p: torch.Tensor

    def __init__(self, p: float) -> None:
        super().__init__()
        self.register_buffer("p", torch.tensor(float(p)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def dropout(x: torch.Tensor, p: float | torch.Tensor, training: bool) -> torch.Tensor:
    """F.dropout; with `p` a 0-d tensor (compiled models) the same inverted-dropout masking, written out."""
    if not isinstance(p, torch.Tensor):
        return F.dropout(x, p, training)
    if not training:
        return x
    keep = 1 - p
    # The uniform draws in fp32 whatever x's dtype: drawn in bf16 (under autocast) they sit on a grid 2^-8 apart
    # near 1 and the dropout rate comes out off by up to 0.4 %.
    draws = torch.rand(x.shape, device=x.device, dtype=torch.float32)
    return x * (draws < keep).to(x.dtype) / keep


def set_dropout(model: nn.Module, p: float) -> None:
    """A new trial's dropout in a model built with tensor_dropout: its head's probability, filled in place."""
    for module in model.modules():
        if isinstance(module, DropoutLinear | TensorDropout) and isinstance(module.p, torch.Tensor):
            module.p.fill_(p)


def head_path(model: nn.Module) -> str:
    """Dotted name of the classifier head: a timm model's `get_classifier()`, else the last `nn.Linear` in
    registration order."""
    name = classifier_path(model)
    if name is not None:
        return name
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    if name is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return name


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, leaf = path.split(".")
    owner = model
    for part in parents:
        owner = getattr(owner, part)
    return owner, leaf


def _weights_enum(arch: str, name: str) -> models.WeightsEnum:
    try:
        enum = models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ConfigError("model.weights", f"{arch} has no torchvision weights; use none or a local file") from None
    if name == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[name.removeprefix(f"{enum.__name__}.")]
    except KeyError:
        allowed = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))  # DEFAULT is also a member alias
        raise ConfigError("model.weights", f"{name!r} is not a weights name of {arch}; use one of {allowed}, "
                          "none, or a local .safetensors/.pt file") from None


def builder_kwargs(arch: str, image_size: int) -> dict[str, Any]:
    """Extra `torchvision.models.get_model` arguments: ViT builds its position embedding for one input size (for
    timm, `timm.create_model`'s: `img_size` for its models of a fixed input size)."""
    name = timm_name(arch)
    if name is not None:
        return timm_builder_kwargs(name, image_size)
    return {"image_size": image_size} if family_of(arch) == "vit" else {}


def _create(arch: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    name = timm_name(arch)
    if name is not None:
        return create_timm(name, num_classes, kwargs)
    return models.get_model(arch, num_classes=num_classes, **kwargs)


def _check_timm(arch: str, name: str) -> None:
    try:
        known = is_timm_model(name)
    except TimmMissing as err:
        raise ConfigError("model.arch", f"{arch}: {err}") from None
    if not known:
        import difflib

        import timm

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = ", ".join(f"timm:{c}" for c in close) or "timm:convnext_nano or timm:efficientnet_b0"
        raise ConfigError("model.arch", f"{name!r} is not a model of this timm ({timm.__version__}); pick one of "
                          f"timm.list_models(), e.g. {hint}")


def _arch_kwargs(cfg: ModelSettings, image_size: int) -> dict[str, Any]:
    # Pretrained ViT weights fix the size they were trained at (check_model_config holds image_size to it).
    if family_of(cfg.arch) == "vit" and cfg.weights_kind == "torchvision":
        image_size = _weights_enum(cfg.arch, cfg.weights).meta["min_size"][0]
    return builder_kwargs(cfg.arch, image_size)


def check_model_config(cfg: ModelSettings, image_size: int) -> None:
    """Refuse, before any trial, weights names and image sizes this architecture cannot take (and timm models
    that this timm lacks, or timm itself missing)."""
    name = timm_name(cfg.arch)
    if name is not None:
        _check_timm(cfg.arch, name)
    elif cfg.arch not in models.list_models(module=models):
        raise ConfigError("model.arch", f"{cfg.arch!r} is not in this torchvision's model registry")
    family = family_of(cfg.arch)
    if family == "vit":
        patch = int(cfg.arch.rsplit("_", 1)[1])
        if cfg.weights_kind == "torchvision":
            size = _weights_enum(cfg.arch, cfg.weights).meta["min_size"][0]
            if image_size != size:
                raise ConfigError("data.image_size", f"{cfg.arch} with {cfg.weights} weights takes exactly "
                                  f"{size}x{size} images; set image_size = {size}")
        elif image_size % patch:
            raise ConfigError("data.image_size", f"{cfg.arch} needs an image size divisible by its patch "
                              f"size {patch}; use e.g. {max(patch, image_size // patch * patch)}")
    elif cfg.weights_kind == "torchvision":
        _weights_enum(cfg.arch, cfg.weights)
    # Run the real forward on the meta device: shape errors surface here, at no compute cost.
    with torch.device("meta"):
        try:
            model = _create(cfg.arch, 10, _arch_kwargs(cfg, image_size))
        except NotImplementedError:
            # RegNet's builder computes its widths with tensors, which meta cannot read back: build on CPU.
            with torch.device("cpu"):
                model = _create(cfg.arch, 10, _arch_kwargs(cfg, image_size))
            model = model.to("meta")
        if name is not None and classifier_path(model) is None:
            raise ConfigError("model.arch", f"{cfg.arch}'s classifier is not one nn.Linear (get_classifier() is "
                              f"{type(model.get_classifier()).__name__}); pick a timm model with a Linear head")
        try:
            model.eval()(torch.empty(2, 3, image_size, image_size))
        except (RuntimeError, ValueError, AssertionError) as err:
            reason = first_line(err)[:160]
            raise ConfigError("data.image_size", f"{cfg.arch} cannot take {image_size}x{image_size} images "
                              f"({reason}); use a larger size such as 224") from None


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A local state dict: safetensors, or a torch file loaded with weights_only=True (never unsafe pickle)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise ConfigError("model.weights", f"{path} is not a valid safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        # torch's first line advises weights_only=False; the line naming the refused global says why.
        first = next((line for line in lines if "GLOBAL" in line), lines[0])[:200]
        raise ConfigError("model.weights", f"{path} was refused: only plain tensor state dicts load "
                          f"(weights_only=True), never arbitrary pickles ({first}); re-save it with "
                          "torch.save(model.state_dict()) or as .safetensors") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError("model.weights", f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


@functools.lru_cache(maxsize=2)
def _pretrained_state(cfg: ModelSettings) -> dict[str, torch.Tensor] | None:
    """The starting weights, read (and hash-checked) once per process, not once per trial.

    Callers only read the tensors: load_state_dict copies them into each trial's model.
    """
    if cfg.weights_kind == "none":
        return None
    if cfg.weights_kind == "file":
        return load_weights_file(resolve_path(cfg.weights, None))
    weights = _weights_enum(cfg.arch, cfg.weights)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise ConfigError("model.weights", f"could not fetch {weights} ({type(err).__name__}); without network "
                          f"place {Path(weights.url).name} at {cache}, or give a local file") from None


def init_weights_tag(cfg: ModelSettings) -> str:
    """What a trial's weights start from, recorded per trial: "none" (its own random init), the resolved
    torchvision weights (DEFAULT becomes the enum it means), or "file sha256:<hex>" of a local file."""
    if cfg.weights_kind == "none":
        return "none"
    if cfg.weights_kind == "file":
        with resolve_path(cfg.weights, None).open("rb") as f:
            return f"file sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"
    weights = _weights_enum(cfg.arch, cfg.weights)
    return f"{type(weights).__name__}.{weights.name}"


def build_model(cfg: ModelSettings, num_classes: int, image_size: int, dropout: float = 0.0, *,
                tensor_dropout: bool = False) -> nn.Module:
    """The architecture with its weights loaded, a fresh head for `num_classes`, dropout before the head (with
    `tensor_dropout`, its probability a 0-d buffer that set_dropout changes in place: for torch.compile)."""
    model = _create(cfg.arch, num_classes, _arch_kwargs(cfg, image_size))
    head = head_path(model)
    state = _pretrained_state(cfg)
    if state is not None:
        _load_backbone(model, state, head, cfg)
    owner, leaf = _parent(model, head)
    old: nn.Linear = getattr(owner, leaf)
    # Where the family already puts a Dropout right before the head, tune that one instead of stacking.
    if (isinstance(owner, nn.Sequential) and leaf.isdigit() and int(leaf) > 0
            and isinstance(owner[int(leaf) - 1], nn.Dropout)):
        owner[int(leaf) - 1].p = dropout
        if tensor_dropout:
            owner[int(leaf) - 1] = TensorDropout(dropout)
        new_head: nn.Linear = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    else:
        new_head = DropoutLinear(old.in_features, old.out_features, dropout, bias=old.bias is not None)
        if tensor_dropout:
            del new_head.p
            new_head.register_buffer("p", torch.tensor(float(dropout)), persistent=False)
    new_head.load_state_dict(old.state_dict())
    setattr(owner, leaf, new_head)
    if cfg.freeze == "backbone":
        freeze_backbone(model, head)
    return model


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], head: str, cfg: ModelSettings) -> None:
    own = model.state_dict()
    head_keys = {k for k in own if k.startswith(head + ".")}
    # A checkpoint of the same head shape (e.g. a trial's own weights) loads whole; otherwise the head is new.
    same_head = all(k in state and state[k].shape == own[k].shape for k in head_keys)
    body = state if same_head else {k: v for k, v in state.items() if not k.startswith(head + ".")}
    mismatched = [k for k, v in body.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ConfigError("model.weights", f"{cfg.weights} does not fit {cfg.arch}: {len(mismatched)} tensors "
                          f"have the wrong shape (e.g. {k} is {list(body[k].shape)}, {cfg.arch} needs "
                          f"{list(own[k].shape)})")
    missing, unexpected = model.load_state_dict(body, strict=False)
    missing = [k for k in missing if same_head or k not in head_keys]
    if missing or unexpected:
        sample = (missing or unexpected)[:3]
        raise ConfigError("model.weights", f"{cfg.weights} does not fit {cfg.arch}: "
                          f"{len(missing)} missing and {len(unexpected)} unexpected keys (e.g. {sample})")


def freeze_backbone(model: nn.Module, head: str | None = None) -> None:
    """Train only the head: everything else stops taking gradients and keeps its BatchNorm statistics."""
    head = head or head_path(model)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(head + ".")
    model.frozen_head = head  # type: ignore[assignment]


def unfreeze_backbone(model: nn.Module) -> None:
    """Train everything again (`[train] unfreeze_epoch`): the backbone takes gradients and, in train mode, updates
    its BatchNorm statistics."""
    for param in model.parameters():
        param.requires_grad = True
    model.frozen_head = None  # type: ignore[assignment]


def set_train_mode(model: nn.Module) -> None:
    """train(), except that a frozen backbone's normalization layers keep their running statistics."""
    model.train()
    head = getattr(model, "frozen_head", None)
    if head:
        for name, module in model.named_modules():
            if not name.startswith(head) and isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The torchvision- (timm-) keyed state dict, detached, contiguous, on the CPU (what safetensors wants)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def check_study_model(cfg: StudyModelSettings) -> None:
    """`check_model_config` of a study file, its errors naming the file like the parse errors do; with `[space]
    arch`, of every listed architecture (not `[model] arch`), an error naming space.arch and the architecture."""
    archs = cfg.searched_archs
    for arch in archs if archs is not None else (None,):
        model = cfg.model if arch is None else cfg.trial_model({"arch": arch})
        try:
            check_model_config(model, cfg.data.image_size)
        except ConfigError as err:
            if arch is None and (err.source is not None or cfg.source is None):
                raise
            field, message = err.field, err.message
            if arch is not None:
                named = message.startswith((arch, repr(arch)))
                field, message = "space.arch", message if named else f"{arch!r}: {message}"
            raise ConfigError(field, message, err.source or cfg.source) from None
