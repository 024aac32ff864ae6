"""timm models by name (`[model] arch = "timm:NAME"`): whether the installed timm has one, its builder arguments,
and the model built with a fresh head and never with pretrained weights.

timm is an optional extra (`pip install 'hpsearch[timm]'`): nothing imports it until a timm model is asked for,
and without it each caller says so in one line (`TimmMissing`). Both the model builder (`model`) and the
export loader (`predict`) build timm models through here, so a study's trial and an export's member are the same
module with the same state-dict keys. `pretrained=False` always: neither a study file nor a crafted manifest can
make timm download anything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from torch import nn

from hpsearch.archs import TIMM_NAME

INSTALL = "pip install 'hpsearch[timm]'"


class TimmMissing(ImportError):
    """timm is not installed; the message says how to install it."""


def timm_module() -> ModuleType:
    """The timm package, or TimmMissing."""
    try:
        import timm
    except ImportError:
        raise TimmMissing(f"timm models need the timm package: {INSTALL}") from None
    return timm


def is_timm_model(name: str) -> bool:
    """Whether NAME is a model of the installed timm (a plain name: pretrained tags such as `.in1k` are not)."""
    return re.fullmatch(TIMM_NAME, name) is not None and bool(timm_module().is_model(name))


def timm_builder_kwargs(name: str, image_size: int) -> dict[str, Any]:
    """Extra `timm.create_model` arguments: models of a fixed input size (ViTs: their position embedding) are
    built for the study's image size; every other model takes any size and gets none."""
    cfg = timm_module().models.get_pretrained_cfg(name)
    return {"img_size": image_size} if cfg is not None and getattr(cfg, "fixed_input_size", False) else {}


def create_timm(name: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
    """timm's model of that name with a fresh `num_classes` head (timm's own), pretrained=False, drop_rate 0 (the
    trial's dropout is put in front of the head by the model builder, as for torchvision)."""
    return timm_module().create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def classifier_path(model: nn.Module) -> str | None:
    """Dotted name of a timm model's classifier (`get_classifier()`), when it is one nn.Linear; else None (and
    None for a model that is not timm's)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        return None
    return next((name for name, module in model.named_modules() if module is head), None)
