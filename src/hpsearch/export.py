"""A deployable ensemble folder, and the code that loads it and predicts with it (no Optuna needed to load).

`hpsearch ensemble ... --out DIR` writes, next to report.md and ensemble.json, in the same atomic rename:

- `member-<trial>.safetensors`: each member's best-epoch weights, plain torchvision keys; each loads with
  `torchvision.models.get_model(arch, num_classes=len(classes), **builder_kwargs).load_state_dict(..., strict=True)`;
- `manifest.json`: format_version, classes, the full preprocessing, the members (arch, trial, hyperparameters,
  weight, file, sha256), how they combine (method, temperature), the metrics table, the study and its storage
  (password redacted);
- `SHA256SUMS`: the sha256 of manifest.json and of every member file, in `sha256sum -c` format;
- with `--onnx`, `ensemble.onnx` (and its external data file, if any): the whole ensemble as one ONNX graph,
  listed with its sha256 in the manifest (`onnx`) and in SHA256SUMS (see hpsearch.onnx_export).

`load_ensemble(DIR)` checks every checksum before reading anything (a flipped byte anywhere is refused), builds
the members with plain torchvision and returns a module from preprocessed images to class probabilities; its
members run one by one or, per architecture, as one vmapped forward (`strategy`, see hpsearch.infer).
Nothing here unpickles: safetensors and JSON only. The checksums detect corruption, not tampering: whoever
can rewrite the folder can rewrite SHA256SUMS too.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from hpsearch.data import IMAGE_SUFFIXES, DataError, Preprocess, decode_image
from hpsearch.infer import STRATEGIES, MemberRunner

if TYPE_CHECKING:
    import optuna

    from hpsearch.artifacts import ArtifactStore
    from hpsearch.ensemble import EnsembleResult

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
ATTR_PREPROCESS = "preprocess"
Uncertainty = Literal["entropy", "margin", "disagreement"]
BY: tuple[Uncertainty, ...] = ("entropy", "margin", "disagreement")


class ExportError(ValueError):
    """An ensemble folder that cannot be written or loaded; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------- preprocessing


def study_preprocess(study: optuna.Study) -> Preprocess:
    """The Preprocess the study's trials trained with: recorded at creation, else recomputed from its config."""
    recorded = study.user_attrs.get(ATTR_PREPROCESS)
    if recorded:
        return Preprocess(int(recorded["image_size"]), _triple(recorded["mean"]), _triple(recorded["std"]),
                          str(recorded.get("interpolation", "bilinear")))
    from hpsearch.config import StudyConfig
    from hpsearch.data import load_pool, make_split, preprocess_for

    cfg = StudyConfig.model_validate(study.user_attrs["config"])
    pool = load_pool(cfg.data, cfg.study.seed)
    split = make_split(pool, cfg.data, cfg.study.seed)
    if split.sha256() != study.user_attrs.get("split_sha256"):
        raise ExportError(f"study {study.study_name!r} records no preprocessing and its data no longer gives its "
                          "split; cannot tell the normalization its trials used")
    return preprocess_for(pool, split, cfg.data, cfg.model.pretrained)


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def preprocessing_json(pre: Preprocess, augment: Sequence[str] | None = None) -> dict[str, Any]:
    """The manifest's preprocessing; `augment`: the study's training augmentations (what `--tta` may use)."""
    return {
        "image_size": pre.image_size,
        "channels": "RGB",
        "resize": {"interpolation": pre.interpolation,
                   "policy": "image files: resize the shorter side to image_size (bilinear, PIL), then centre-crop "
                             "image_size x image_size"},
        "value_range": [0.0, 1.0],
        "scale": "uint8 / 255, before normalization",
        "mean": list(pre.mean),
        "std": list(pre.std),
        "normalize": "(x - mean) / std per channel",
        "layout": "NCHW float32",
        **({} if augment is None else {"augment": list(augment)}),
    }


def manifest_preprocess(manifest: Mapping[str, Any]) -> Preprocess:
    p = manifest["preprocessing"]
    return Preprocess(int(p["image_size"]), _triple(p["mean"]), _triple(p["std"]), p["resize"]["interpolation"])


# -------------------------------------------------------------------------------------------- writing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def builder_kwargs(arch: str, image_size: int) -> dict[str, Any]:
    """Extra get_model arguments: ViT builds its position embedding for one input size."""
    from hpsearch.config import family_of

    return {"image_size": image_size} if family_of(arch) == "vit" else {}


def _write_member(folder: Path, store: ArtifactStore, trial: optuna.trial.FrozenTrial, arch: str,
                  n_classes: int, kwargs: Mapping[str, Any]) -> str:
    from hpsearch.artifacts import load_trial_weights

    state = load_trial_weights(store, trial)
    try:
        plain_model(arch, n_classes, kwargs).load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExportError(f"trial {trial.number}'s weights do not load into torchvision {arch} "
                          f"({str(err).splitlines()[0]})") from None
    name = f"member-{trial.number}.safetensors"
    return _save_member(folder, name, state, {"arch": arch, "trial": str(trial.number), "num_classes": str(n_classes)})


def _save_member(folder: Path, name: str, state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    (folder / name).chmod(0o666 & ~umask)  # safetensors writes 0600; the folder's other files follow the umask
    return name


def write_export(folder: Path, result: EnsembleResult, study: optuna.Study, store: ArtifactStore,
                 storage_url: str, metrics: Sequence[Mapping[str, Any]], onnx: bool = False,
                 soup_state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write the member files, manifest.json and SHA256SUMS into `folder` (the staged ensemble folder);
    with `onnx`, ensemble.onnx too (the optional ONNX packages must be installed). A kept greedy soup
    (result.method == "soup") is one member, `soup_state`: the averaged weights of result.soup.ingredients."""
    from hpsearch import __version__
    from hpsearch.storage import redact

    classes = list(study.user_attrs.get("classes", []))
    pre = study_preprocess(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    members = []
    for m in result.members:
        kwargs = builder_kwargs(m.arch, pre.image_size)
        soup: dict[str, Any] = {}
        if result.method == "soup" and result.soup is not None and soup_state is not None:
            ingredients = list(result.soup.ingredients)
            name = _save_member(folder, "soup.safetensors", soup_state,
                                {"arch": m.arch, "soup_of": ",".join(map(str, ingredients)),
                                 "num_classes": str(len(classes))})
            soup = {"soup": {"ingredients": ingredients,
                             "rule": "uniform average of the ingredients' weights (greedy soup, Wortsman et al. "
                                     "2022); trial and hyperparameters are the best ingredient's"}}
        else:
            name = _write_member(folder, store, trials[m.trial], m.arch, len(classes), kwargs)
        members.append({"trial": m.trial, "arch": m.arch, "num_classes": len(classes), "builder_kwargs": kwargs,
                        "hyperparameters": dict(m.params), "weight": m.weight, "val_accuracy": m.val_accuracy,
                        "file": name, "sha256": sha256_file(folder / name), **soup})
    manifest = {
        "format_version": FORMAT_VERSION, "hpsearch_version": __version__,
        "study": study.study_name, "storage": redact(storage_url),
        "split_sha256": result.split_sha256, "classes": classes,
        "preprocessing": preprocessing_json(pre, study.user_attrs.get("config", {}).get("data", {}).get("augment")),
        "combine": {"method": result.method, "temperature": result.temperature,
                    "rule": COMBINE_RULES[result.method]},
        "temperature": result.temperature, "members": members, "metrics": list(metrics),
    }
    if onnx:
        from hpsearch.onnx_export import write_onnx

        manifest["onnx"] = write_onnx(folder, ensemble_from_manifest(folder, manifest, "loop"))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    files = [MANIFEST, *(m["file"] for m in members), *(name for name, _ in onnx_files(manifest))]
    (folder / SUMS).write_text("".join(f"{sha256_file(folder / f)}  {f}\n" for f in files), encoding="utf-8")


COMBINE_RULES = {
    "weighted": "p = softmax(log(sum_m w_m softmax(z_m)) / T): weighted average of member softmaxes, then T",
    "soft": "p = softmax(log(mean_m softmax(z_m)) / T): uniform average of member softmaxes, then T",
    "hard": "p = share of members whose argmax is each class (votes)",
    "soup": "p = softmax(z / T) of the one member, whose weights are the greedy soup's average",
}


# -------------------------------------------------------------------------------------------- loading


def plain_model(arch: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
    from torchvision import models

    return models.get_model(arch, num_classes=num_classes, **kwargs)


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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{folder / MANIFEST}: format_version {manifest.get('format_version')!r}, this hpsearch "
                          f"reads {FORMAT_VERSION}")
    for member in manifest["members"]:
        _check(folder / member["file"], member["sha256"])
    for name, digest in onnx_files(manifest):
        _check(folder / name, digest)
    return manifest


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
        if len(digest) != 64 or not name or "/" in name or name.startswith("."):
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


class Ensemble(nn.Module):
    """Preprocessed images [N, 3, S, S] -> class probabilities [N, C] of the exported ensemble."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], method: str,
                 temperature: float | None, classes: Sequence[str], preprocess: Preprocess,
                 manifest: Mapping[str, Any], strategy: str = "loop") -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float64))
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
        """[M, N, C] float64: each member's softmax (no temperature)."""
        return self._runner(x).double().softmax(dim=-1)

    def combine(self, member_probs: torch.Tensor) -> torch.Tensor:
        w = self.weights.to(member_probs.device)[:, None, None]
        if self.method == "hard":
            votes = nn.functional.one_hot(member_probs.argmax(dim=-1), member_probs.shape[-1]).double()
            return (votes * w).sum(dim=0)
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


def ensemble_from_manifest(folder: Path, manifest: Mapping[str, Any], strategy: str = "loop") -> Ensemble:
    """The ensemble module of a manifest and the member files next to it, on the CPU (checksums not checked:
    `load_ensemble` verifies first; `write_export` builds from the files it just wrote)."""
    from safetensors.torch import load_file

    classes = manifest["classes"]
    members = []
    for spec in manifest["members"]:
        model = plain_model(spec["arch"], len(classes), spec.get("builder_kwargs", {}))
        model.load_state_dict(load_file(str(folder / spec["file"])), strict=True)
        members.append(model)
    total = sum(m["weight"] for m in manifest["members"])
    return Ensemble(members, [m["weight"] / total for m in manifest["members"]], manifest["combine"]["method"],
                    manifest.get("temperature"), classes, manifest_preprocess(manifest), manifest, strategy).eval()


# ----------------------------------------------------------------------------------------- prediction


def find_images(inputs: Iterable[str | Path], warn: Callable[[str], None]) -> list[Path]:
    """Files as given (any suffix), folders recursively (image suffixes only), in order; missing ones warned."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            found.append(item)
        else:
            warn(f"{item}: no such file or folder")
    return found


def decode_batches(paths: Sequence[Path], size: int, batch_size: int, warn: Callable[[str], None]
                   ) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """uint8 [B, 3, size, size] batches of the readable images; an unreadable one is warned about and skipped."""
    batch: list[Path] = []
    images: list[torch.Tensor] = []
    for path in paths:
        try:
            images.append(decode_image(path, size))
        except DataError as err:
            warn(str(err))
            continue
        batch.append(path)
        if len(batch) == batch_size:
            yield batch, torch.stack(images)
            batch, images = [], []
    if batch:
        yield batch, torch.stack(images)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Natural-log entropy of each row of [..., C] probabilities (0 log 0 = 0)."""
    p = probs.double()
    return -(p * p.clamp_min(1e-300).log()).sum(dim=-1)


def uncertainty(ensemble: Ensemble, member_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """entropy of the ensemble output; margin between its top two; disagreement = mutual information
    = entropy of the weighted mean of the members' softmaxes - weighted mean of their entropies (no T)."""
    probs = ensemble.combine(member_probs)
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    margin = top2[:, 0] - (top2[:, 1] if top2.shape[-1] > 1 else 0.0)
    w = ensemble.weights.to(member_probs.device)
    mean = (member_probs * w[:, None, None]).sum(dim=0)
    disagreement = (entropy(mean) - (entropy(member_probs) * w[:, None]).sum(dim=0)).clamp_min(0.0)
    return {"probs": probs, "entropy": entropy(probs), "margin": margin, "disagreement": disagreement}


def score_images(ensemble: Ensemble, paths: Sequence[Path], batch_size: int, device: torch.device,
                 warn: Callable[[str], None], tta: bool = False) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """Per readable image: its probabilities and uncertainties, decoded and preprocessed as the manifest says;
    with `tta`, each member's softmax averaged over the views of the study's own augmentations (hpsearch.tta)."""
    from hpsearch.tta import manifest_augment, tta_member_probs

    pre = ensemble.preprocess
    augment = manifest_augment(ensemble.manifest) if tta else ()
    with torch.inference_mode():
        for batch, images in decode_batches(paths, pre.image_size, batch_size, warn):
            x = pre(images.to(device))
            member = tta_member_probs(ensemble.member_probs, x, augment) if tta else ensemble.member_probs(x)
            stats = uncertainty(ensemble, member)
            cpu = {k: v.cpu() for k, v in stats.items()}
            for i, path in enumerate(batch):
                yield path, {k: v[i] for k, v in cpu.items()}


def _row(path: Path, stats: Mapping[str, torch.Tensor], classes: Sequence[str]) -> list[str]:
    probs = stats["probs"]
    k = int(probs.argmax())
    return [str(path), classes[k], f"{float(probs[k]):.6f}", f"{float(stats['entropy']):.6f}",
            *(f"{float(p):.6f}" for p in probs)]


def predict_csv(ensemble: Ensemble, paths: Sequence[Path], sink: IO[str], batch_size: int, device: torch.device,
                warn: Callable[[str], None], tta: bool = False) -> int:
    """Write path, predicted, probability, entropy, p_<class>... per readable image; return the rows written."""
    writer = csv.writer(sink, lineterminator="\n")
    writer.writerow(["path", "predicted", "probability", "entropy", *(f"p_{c}" for c in ensemble.classes)])
    n = 0
    for path, stats in score_images(ensemble, paths, batch_size, device, warn, tta):
        writer.writerow(_row(path, stats, ensemble.classes))
        n += 1
    return n


def select_csv(ensemble: Ensemble, paths: Sequence[Path], sink: IO[str], n: int, by: Uncertainty,
               batch_size: int, device: torch.device, warn: Callable[[str], None], tta: bool = False) -> int:
    """Rank by uncertainty (high entropy / disagreement, low margin first; ties keep input order), write top n."""
    scored = list(score_images(ensemble, paths, batch_size, device, warn, tta))
    sign = 1.0 if by == "margin" else -1.0
    ranked = sorted(scored, key=lambda item: sign * float(item[1][by]))[:n]
    writer = csv.writer(sink, lineterminator="\n")
    writer.writerow(["rank", "path", "predicted", "probability", "entropy", "margin", "disagreement"])
    for rank, (path, s) in enumerate(ranked, 1):
        k = int(s["probs"].argmax())
        writer.writerow([rank, str(path), ensemble.classes[k], _f(s["probs"][k]), _f(s["entropy"]),
                         _f(s["margin"]), _f(s["disagreement"])])
    return len(ranked)


def _f(value: torch.Tensor) -> str:
    x = float(value)
    return f"{x:.6f}" if math.isfinite(x) else str(x)

