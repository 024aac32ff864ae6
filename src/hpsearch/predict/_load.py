"""Loading an exported ensemble folder: verify every checksum, build the members, combine them (no Optuna needed).

`load_ensemble(DIR)` checks every checksum before reading anything (a flipped byte anywhere is refused), builds
the members with plain torchvision (or timm) and returns a module from preprocessed images to class probabilities; its
members run one by one or, per architecture, as one vmapped forward (`strategy`, see hpsearch.infer).
Nothing here unpickles: safetensors and JSON only. The checksums detect corruption, not tampering: whoever
can rewrite the folder can rewrite SHA256SUMS too, so before building a member the loader also refuses what
hpsearch never writes (`check_members`): an architecture outside the supported families (or a `timm:NAME` that
the installed timm does not have), builder arguments other than ViT's image size (timm's `img_size` for its
models of a fixed input size), sizes past the study file's bounds; members are always built with `weights=None`
(timm's with `pretrained=False`), so a manifest cannot make torchvision or timm download anything. This module
imports neither Optuna nor the study config, so an export loads anywhere torch and torchvision do (and timm, for
timm members).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpsearch.archs import FAMILIES, family_of, timm_name
from hpsearch.errors import ExportError
from hpsearch.kernels import ieee_fp32
from hpsearch.predict._members import STRATEGIES, MemberRunner, plain_model
from hpsearch.preprocess import Preprocess
from hpsearch.timm_archs import TimmMissing, is_timm_model, timm_builder_kwargs

FORMAT_VERSION = 1
# A cross-validated export: a member is its fold models (`folds`: fold, file, sha256), p_m = mean_k softmax(z_mk).
FOLDS_FORMAT_VERSION = 2
READABLE_VERSIONS = (FORMAT_VERSION, FOLDS_FORMAT_VERSION)
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
MAX_CLASSES = 100_000
# The study file's bounds on data.image_size (config's DataSection): ViT's position embedding grows with it.
IMAGE_SIZES = (8, 1024)


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_preprocess(manifest: Mapping[str, Any]) -> Preprocess:
    p = manifest["preprocessing"]
    return Preprocess.of(p["image_size"], p["mean"], p["std"], p["resize"]["interpolation"])


def verify(folder: Path) -> dict[str, Any]:
    """Check SHA256SUMS against every file, then the manifest's own member checksums; return the manifest."""
    folder = Path(folder)
    sums_path = folder / SUMS
    if not folder.is_dir() or not sums_path.is_file() or not (folder / MANIFEST).is_file():
        raise ExportError(f"{folder} is no exported ensemble (needs {MANIFEST} and {SUMS}); write one with "
                          "`hpsearch ensemble STUDY.toml --out DIR`")
    sums = _read_sums(sums_path)
    if MANIFEST not in sums:
        raise ExportError(f"{sums_path} lists no checksum for {MANIFEST}; re-export the ensemble")
    for name, expected in sums.items():
        _check(folder / name, expected)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{folder / MANIFEST} is not valid JSON ({err})") from None
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ExportError(f"{folder / MANIFEST}: format_version {manifest.get('format_version')!r}, this hpsearch "
                          f"reads {' and '.join(map(str, READABLE_VERSIONS))}")
    check_members(folder, manifest)
    for member in manifest["members"]:
        for name, digest in member_files(member):
            _check(_inside(folder, name, "members[].file"), digest)
    for name, digest in onnx_files(manifest):
        _check(_inside(folder, name, "onnx"), digest)
    return manifest


def _plain_name(name: object) -> bool:
    """A file name inside the export folder: no folder part, no absolute path, no `..`, nothing hidden."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name \
        and not name.startswith(".") and not Path(name).is_absolute()


def _inside(folder: Path, name: object, field: str) -> Path:
    """folder/name for a file the manifest names; any other path is refused like a bad checksum."""
    if not _plain_name(name):
        raise ExportError(f"{folder / MANIFEST}: {field} {name!r} is not a plain file name inside the export "
                          "folder (absolute paths and .. are refused); re-export the ensemble")
    return folder / str(name)


def member_files(member: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(file, sha256) of a member's weights: its one file, or its fold models' files, fold 0 first."""
    if "folds" in member:
        return [(f["file"], f["sha256"]) for f in sorted(member["folds"], key=lambda f: int(f["fold"]))]
    return [(member["file"], member["sha256"])]


def onnx_files(manifest: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(file, sha256) of ensemble.onnx and its external data files, when the manifest has an `onnx` entry."""
    entry = manifest.get("onnx")
    if not entry:
        return []
    return [(entry["file"], entry["sha256"]), *((f["file"], f["sha256"]) for f in entry.get("external_data", []))]


def _read_sums(path: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not _plain_name(name):
            raise ExportError(f"{path}: malformed line {line[:80]!r}; re-export the ensemble")
        sums[name] = digest
    return sums


def _check(path: Path, expected: str) -> None:
    if not path.is_file():
        raise ExportError(f"{path} is missing; re-export the ensemble")
    actual = sha256_file(path)
    if actual != expected:
        raise ExportError(f"{path} is corrupt: sha256 {actual[:16]}… does not match the recorded "
                          f"{expected[:16]}…; re-export the ensemble")


# How much of the members' mean probability a hard vote adds to break ties: below one vote's share (1/M) for up
# to 1000 members, and above float32's rounding of the output (so predict and ONNX break ties alike).
HARD_TIE_SHARE = 1e-3


class Ensemble(nn.Module):
    """Preprocessed images [N, 3, S, S] -> class probabilities [N, C] of the exported ensemble.

    `members` are the models in manifest order; with `models_per_member` (a cross-validated export) member m is
    the next models_per_member[m] of them, its probabilities the uniform average of their softmaxes."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], method: str,
                 temperature: float | None, classes: Sequence[str], preprocess: Preprocess,
                 manifest: Mapping[str, Any], strategy: str = "loop",
                 models_per_member: Sequence[int] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float64))
        counts = list(models_per_member) if models_per_member is not None else [1] * len(members)
        if sum(counts) != len(members) or len(counts) != len(weights):
            raise ExportError(f"{len(members)} models do not make {len(weights)} members of {counts} models")
        self.folds = any(c != 1 for c in counts)
        # [M, models]: row m averages member m's models uniformly (the identity when no member has folds).
        average = torch.zeros(len(counts), len(members), dtype=torch.float64)
        start = 0
        for m, count in enumerate(counts):
            average[m, start:start + count] = 1.0 / count
            start += count
        self.register_buffer("average", average)
        self.method = method
        self.temperature = float(temperature) if temperature else 1.0
        self.classes = list(classes)
        self.preprocess = preprocess
        self.manifest = dict(manifest)
        self.strategy = strategy  # auto | loop | vmap: how the members run (hpsearch.infer)
        self._runner = MemberRunner(self.members, strategy)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Ensemble:
        super()._apply(fn, recurse)  # .to(), .cuda(), .float(), ...: members moved, so restack for that device
        self._runner = MemberRunner(self.members, self.strategy)
        return self

    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        """[M, N, C] float64: each member's softmax (no temperature); a cross-validated member's is the mean of
        its fold models' softmaxes."""
        with ieee_fp32():  # the fp32 math the stored outputs were computed with (hpsearch.kernels)
            probs = self._runner(x).double().softmax(dim=-1)
        if not self.folds:
            return probs
        return torch.einsum("mf,fnc->mnc", self.average.to(probs.device), probs)

    def combine(self, member_probs: torch.Tensor) -> torch.Tensor:
        w = self.weights.to(member_probs.device)[:, None, None]
        if self.method == "hard":
            votes = nn.functional.one_hot(member_probs.argmax(dim=-1), member_probs.shape[-1]).double()
            # Ties between the most-voted classes go to the highest summed probability (as the report counts
            # them): a share far below one vote (1/M) of the mean probability decides them, then the lowest class.
            mean = member_probs.mean(dim=0)
            return ((votes * w).sum(dim=0) + HARD_TIE_SHARE * mean) / (1 + HARD_TIE_SHARE)
        mix = (member_probs * w).sum(dim=0)
        return (mix.clamp_min(1e-300).log() / self.temperature).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.member_probs(x)).float()


def load_ensemble(folder: str | Path, device: str | torch.device = "cpu", strategy: str = "auto") -> Ensemble:
    """Verify every checksum, build each member with plain torchvision (strict load), return the ensemble
    in eval mode. Its input is what `ensemble.preprocess` makes of uint8 images; its output probabilities.

    `strategy`: `loop` runs the members one by one, `vmap` the members of each architecture as one batched
    forward, `auto` (default) whichever measured faster on the device: the loop on the CPU, vmap on CUDA.
    All three give the same probabilities (up to float rounding)."""
    if strategy not in STRATEGIES:
        raise ExportError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    folder = Path(folder)
    return ensemble_from_manifest(folder, verify(folder), strategy).to(device).eval()


def _refuse(folder: Path, field: str, value: object, why: str) -> ExportError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return ExportError(f"{folder / MANIFEST}: {field} {shown} {why}; re-export the ensemble")


def _image_size(folder: Path, field: str, value: object) -> int:
    low, high = IMAGE_SIZES
    if type(value) is not int or not low <= value <= high:
        raise _refuse(folder, field, value, f"is not an image size (an integer from {low} to {high})")
    return value


def check_members(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse (ExportError, one line naming the manifest's field) what hpsearch never writes, before any member
    is built: classes that are not 1 to MAX_CLASSES names, an image size out of IMAGE_SIZES, a member whose
    `arch` is not a torchvision architecture of a supported family (hpsearch.archs), whose `num_classes` is not
    the number of classes, or whose `builder_kwargs` are anything but what hpsearch.model.builder_kwargs writes
    (ViT's `image_size`, divisible by its patch size; nothing for the other families). A `timm:NAME` member
    needs timm installed and NAME one of its models; its builder_kwargs are timm's `img_size` for models of a
    fixed input size, nothing for the others."""
    from torchvision import models

    classes = manifest.get("classes")
    if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES \
            or not all(isinstance(c, str) for c in classes):
        raise _refuse(folder, "classes", classes if not isinstance(classes, list) else f"<{len(classes)} items>",
                      f"is not a list of 1 to {MAX_CLASSES} class names")
    preprocessing = manifest.get("preprocessing")
    _image_size(folder, "preprocessing.image_size",
                preprocessing.get("image_size") if isinstance(preprocessing, dict) else None)
    members = manifest.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise _refuse(folder, "members", type(members).__name__, "is not a list of member entries")
    _check_combine(folder, manifest, members)
    registry = set(models.list_models(module=models))
    for i, member in enumerate(members):
        arch = member.get("arch")
        family = family_of(arch) if isinstance(arch, str) else None
        is_timm = isinstance(arch, str) and timm_name(arch) is not None
        if is_timm:
            _check_timm_member(folder, i, member)
        elif family is None or arch not in registry:
            raise _refuse(folder, f"members[{i}].arch", arch, "is not a torchvision architecture of a supported "
                          f"family ({', '.join(FAMILIES)})")
        if "num_classes" in member and (type(member["num_classes"]) is not int
                                        or member["num_classes"] != len(classes)):
            raise _refuse(folder, f"members[{i}].num_classes", member["num_classes"],
                          f"is not the number of classes, {len(classes)}")
        if is_timm:
            continue
        kwargs = member.get("builder_kwargs", {})
        allowed = {"image_size"} if family == "vit" else set()
        if not isinstance(kwargs, dict) or not set(kwargs) <= allowed:
            unknown = sorted(set(kwargs) - allowed) if isinstance(kwargs, dict) else kwargs
            raise _refuse(folder, f"members[{i}].builder_kwargs", unknown, f"are not builder arguments hpsearch "
                          f"writes for {arch} ({', '.join(sorted(allowed)) or 'none'})")
        if "image_size" in kwargs:
            size = _image_size(folder, f"members[{i}].builder_kwargs.image_size", kwargs["image_size"])
            patch = int(arch.rsplit("_", 1)[1])
            if size % patch:
                raise _refuse(folder, f"members[{i}].builder_kwargs.image_size", size,
                              f"is not divisible by {arch}'s patch size {patch}")


def _check_timm_member(folder: Path, i: int, member: Mapping[str, Any]) -> None:
    """A `timm:NAME` member: timm installed, NAME one of its models, builder_kwargs what builder_kwargs writes."""
    arch = member["arch"]
    name = timm_name(arch) or ""
    try:
        known = is_timm_model(name)
    except TimmMissing as err:
        raise _refuse(folder, f"members[{i}].arch", arch, f"needs timm ({err})") from None
    if not known:
        raise _refuse(folder, f"members[{i}].arch", arch, "is not a model of the installed timm")
    kwargs = member.get("builder_kwargs", {})
    allowed = set(timm_builder_kwargs(name, IMAGE_SIZES[0]))
    if not isinstance(kwargs, dict) or set(kwargs) != allowed:
        given = sorted(kwargs) if isinstance(kwargs, dict) else kwargs
        raise _refuse(folder, f"members[{i}].builder_kwargs", given, f"are not builder arguments hpsearch writes "
                      f"for {arch} ({', '.join(sorted(allowed)) or 'none'})")
    if "img_size" in kwargs:
        _image_size(folder, f"members[{i}].builder_kwargs.img_size", kwargs["img_size"])


# How an export's members combine (hpsearch.export writes the rule of each beside it): `hard` votes, the others
# average the members' softmaxes with their weights (a soup or a single trial: one member of weight 1).
METHODS = ("weighted", "soft", "hard", "soup", "single")


def _check_combine(folder: Path, manifest: Mapping[str, Any], members: list[dict[str, Any]]) -> None:
    """Weights that are finite numbers >= 0 and sum above 0, a method the loader runs, a temperature that is
    none or a finite number > 0: what `Ensemble` divides and multiplies by."""
    for i, member in enumerate(members):
        weight = member.get("weight")
        if not _is_number(weight) or not weight >= 0:
            raise _refuse(folder, f"members[{i}].weight", weight, "is not a finite number >= 0")
    if sum(m["weight"] for m in members) <= 0:
        raise _refuse(folder, "members[].weight", [m["weight"] for m in members], "do not sum above 0")
    combine = manifest.get("combine")
    method = combine.get("method") if isinstance(combine, dict) else None
    if method not in METHODS:
        raise _refuse(folder, "combine.method", method, f"is not one of {', '.join(METHODS)}")
    temperature = manifest.get("temperature")
    if temperature is not None and (not _is_number(temperature) or not temperature > 0):
        raise _refuse(folder, "temperature", temperature, "is not a finite number > 0 (or null)")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def ensemble_from_manifest(folder: Path, manifest: Mapping[str, Any], strategy: str = "loop") -> Ensemble:
    """The ensemble module of a manifest and the member files next to it, on the CPU (neither checksums nor
    members checked: `load_ensemble` verifies first; `write_export` builds from the files it just wrote)."""
    from safetensors.torch import load_file

    classes = manifest["classes"]
    models, counts = [], []
    for spec in manifest["members"]:
        files = member_files(spec)
        for name, _ in files:
            model = plain_model(spec["arch"], len(classes), spec.get("builder_kwargs", {}))
            model.load_state_dict(load_file(str(folder / name)), strict=True)
            models.append(model)
        counts.append(len(files))
    total = sum(m["weight"] for m in manifest["members"])
    return Ensemble(models, [m["weight"] / total for m in manifest["members"]], manifest["combine"]["method"],
                    manifest.get("temperature"), classes, manifest_preprocess(manifest), manifest, strategy,
                    counts).eval()
