"""The architectures hpsearch supports (torchvision families, timm names), where a weights file is; torch-free.

Both the study file's schema (`config`, which validates `[model] arch` and the weights file) and the model
builder (`model`, which builds and loads them) read these, so they live below both. A timm model is named
`timm:NAME` (the prefix keeps torchvision's names unambiguous); whether the installed timm has NAME is asked of
timm itself, lazily, by `hpsearch.timm_archs` (this module, like config, imports neither torch nor timm).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Supported torchvision classification families: name pattern and the smallest input side they take.
# ViT and Swin carry extra constraints (patch size, pretrained input size) checked in model/_build.py.
FAMILIES: dict[str, tuple[str, int]] = {
    "resnet": (r"resnet\d+|resnext\d+_\w+|wide_resnet\d+_2", 32),
    "regnet": (r"regnet_[xy]_\w+", 32),
    "mobilenet": (r"mobilenet_v2|mobilenet_v3_(small|large)", 32),
    "efficientnet": (r"efficientnet_(b[0-7]|v2_[sml])", 32),
    "convnext": (r"convnext_(tiny|small|base|large)", 32),
    "densenet": (r"densenet(121|161|169|201)", 32),
    "vgg": (r"vgg(11|13|16|19)(_bn)?", 32),
    "vit": (r"vit_[bhl]_(14|16|32)", 32),
    "swin": (r"swin_(v2_)?[tsb]", 32),
}


def family_of(arch: str) -> str | None:
    """The supported family an architecture name belongs to, or None."""
    for family, (pattern, _) in FAMILIES.items():
        if re.fullmatch(pattern, arch):
            return family
    return None


TIMM_PREFIX = "timm:"
# A timm model name as timm.list_models() spells them, without a pretrained tag (`.in1k`): those name weights,
# which hpsearch never asks timm for.
TIMM_NAME = r"[a-z][a-z0-9_]*"


def timm_name(arch: str) -> str | None:
    """NAME of an architecture written `timm:NAME`, or None for a torchvision name."""
    return arch.removeprefix(TIMM_PREFIX) if arch.startswith(TIMM_PREFIX) else None


def trial_arch(arch: str, params: Mapping[str, Any]) -> str:
    """A trial's architecture: the `arch` it drew from `[space] arch` (its Optuna parameter), else `arch`, the
    study's `[model] arch`. Every per-trial use of the architecture (training, stored metadata, ensemble and
    export members, soups) asks this."""
    drawn = params.get("arch")
    return arch if drawn is None else str(drawn)


def resolve_path(value: str, source: str | Path | None) -> Path:
    """Relative paths in a study file are taken from the current directory, like every CLI path."""
    return Path(value).expanduser().resolve()
