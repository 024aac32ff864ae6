"""Writing an ensemble folder (what `hpsearch ensemble STUDY.toml --out DIR` writes, see
hpsearch.export._ensemble_command).

In one atomic rename (`staged_dir`) the folder gets report.md (hpsearch.report) and ensemble.json, and, unless
`--no-export`, the deployable ensemble:

- `member-<trial>.safetensors`: each member's best-epoch weights, plain torchvision keys; each loads with
  `torchvision.models.get_model(arch, num_classes=len(classes), **builder_kwargs).load_state_dict(..., strict=True)`
  (a `timm:NAME` member: `timm.create_model(NAME, pretrained=False, num_classes=..., **builder_kwargs)`);
  a kept greedy soup is one `soup.safetensors` (the averaged weights); a cross-validated member (`[data] folds`)
  is one `member-<trial>-fold-<k>.safetensors` per fold, listed under the member's `folds`;
- `manifest.json`: format_version, classes, the full preprocessing, the members (arch, trial, hyperparameters,
  weight, file, sha256), how they combine (method, temperature), the metrics table, the study and its storage
  (password redacted);
- `README.md`: a model card written from the manifest (hpsearch.export._card): what it is, classes,
  preprocessing, held-out metrics and their data, members, and how to load it without hpsearch;
- `SHA256SUMS`: the sha256 of manifest.json, README.md and every member file, in `sha256sum -c` format;
- with `--onnx`, `ensemble.onnx` (and its external data file, if any): the whole ensemble as one ONNX graph,
  listed with its sha256 in the manifest (`onnx`) and in SHA256SUMS (see hpsearch.onnx_export).

hpsearch.loading reads it back; this module is the only writer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from optuna.artifacts.exceptions import ArtifactNotFound

from hpsearch import __version__
from hpsearch.ensemble import HARD_TIE_RULE, Candidate, EnsembleResult, Member
from hpsearch.errors import EnsembleError, ExportError, first_line
from hpsearch.export._card import CARD_FILE, model_card
from hpsearch.export._comparison import COMPARISON_HEADERS, report_markdown, table_cells
from hpsearch.model import builder_kwargs
from hpsearch.predict import (
    FOLDS_FORMAT_VERSION,
    FORMAT_VERSION,
    MANIFEST,
    SUMS,
    ensemble_from_manifest,
    member_files,
    onnx_files,
    plain_model,
    sha256_file,
)
from hpsearch.preprocess import Preprocess
from hpsearch.record import read_study_record
from hpsearch.search import study_preprocess
from hpsearch.store import (
    load_trial_weights,
    load_weights,
    redact,
)

if TYPE_CHECKING:
    import optuna

    from hpsearch.store import ArtifactStore

REPORT_FILE = "report.md"
RESULT_FILE = "ensemble.json"
COMBINE_RULES = {
    "weighted": "p = softmax(log(sum_m w_m softmax(z_m)) / T): weighted average of member softmaxes, then T",
    "soft": "p = softmax(log(mean_m softmax(z_m)) / T): uniform average of member softmaxes, then T",
    "hard": "p = (v + 1e-3 mean_m softmax(z_m)) / (1 + 1e-3), v = share of members whose argmax is each class "
            "(votes; the small term breaks ties by the highest summed probability)",
    "soup": "p = softmax(z / T) of the one member, whose weights are the greedy soup's average",
    "single": "p = softmax(z / T) of the one member, the best single trial",
}
# A cross-validated member m is its fold models k: p_m = mean_k softmax(z_mk), uniformly; members combine as above.
FOLD_RULES = {
    "weighted": "p = softmax(log(sum_m w_m p_m) / T), p_m = mean_k softmax(z_mk) over member m's fold models: "
                "weighted average of members' fold-averaged softmaxes, then T",
    "soft": "p = softmax(log(mean_m p_m) / T), p_m = mean_k softmax(z_mk) over member m's fold models: uniform "
            "average of members' fold-averaged softmaxes, then T",
    "single": "p = softmax(log(p_m) / T) of the one member m, the best trial, p_m = mean_k softmax(z_mk) over its "
              "fold models",
    "hard": "p = (v + 1e-3 mean_m p_m) / (1 + 1e-3), v = share of members whose argmax of p_m = mean_k "
            "softmax(z_mk) is each class (votes; the small term breaks ties by the highest summed probability)",
}
FOLD_MEMBER_RULE = "p_m = mean_k softmax(z_mk): the uniform average of the fold models' softmaxes (no temperature)"


# ------------------------------------------------------------------------------------------ the folder


def _umask_mode(mode: int) -> int:
    """`mode` as the process umask lets a new file or folder have it (what open() would have given)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def staged_dir(target: Path, marker: str = RESULT_FILE) -> Iterator[Path]:
    """Yield a fresh folder next to `target`; on success it replaces `target` in one rename.

    An existing `target` must be a folder this tool wrote (it holds `marker`) or empty; it is moved aside,
    the new folder renamed in, and the old one deleted. On error the staged folder is removed and `target`
    is left untouched.
    """
    target = Path(target).expanduser().absolute()
    if target.exists() and not (target.is_dir() and ((target / marker).is_file() or not any(target.iterdir()))):
        raise EnsembleError(f"--out {target} exists and is not an ensemble folder (no {marker}); pick another "
                            "folder or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staged
        staged.chmod(_umask_mode(0o777))
        if target.exists():
            old = target.parent / f".{target.name}-old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(staged, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def write_ensemble_dir(target: Path, result: EnsembleResult, study_name: str, classes: Sequence[str],
                       candidates: Sequence[Candidate], skipped: Sequence[str] = (),
                       export: Callable[[Path, Mapping[str, Any]], None] | None = None) -> Path:
    """Write report.md and ensemble.json into `target`, atomically (see `staged_dir`).

    `export(folder, payload)` adds more files (`write_export`: member weights, manifest) in the same rename.
    """
    with staged_dir(target) as folder:
        (folder / REPORT_FILE).write_text(report_markdown(result, study_name, candidates, skipped), encoding="utf-8")
        payload = result_json(result, study_name, classes, skipped)
        (folder / RESULT_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        if export is not None:
            export(folder, payload)
    return Path(target).expanduser().absolute()


def _number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def result_json(result: EnsembleResult, study_name: str, classes: Sequence[str],
                skipped: Sequence[str] = ()) -> dict[str, Any]:
    """ensemble.json: what an exporter needs (members, weights, method, T) and the metrics."""
    return {
        "hpsearch_version": __version__,
        "study": study_name,
        "split_sha256": result.split_sha256,
        "classes": list(classes),
        "method": result.method,
        "combine": {"weighted": "weighted average of member softmax probabilities",
                    "soft": "uniform average of member softmax probabilities",
                    "hard": f"majority vote of member argmax; {HARD_TIE_RULE}",
                    "soup": "one model: the uniform average of the greedy soup's ingredients' weights",
                    "single": "the best single trial alone"}[result.method],
        "asked": result.asked,
        "fitting": result.fitting(),
        "temperature": _number(result.temperature),
        "weight_fit": result.weight_fit.name,
        "candidates": list(result.candidates),
        "fits": [{"name": f.name, "fit_nll": _number(f.fit_nll), "weights": list(f.weights)}  # one per candidate
                 for f in result.fits],
        "collapsed": result.collapsed,
        "members": [{"trial": m.trial, "arch": m.arch, "weight": m.weight, "weights_artifact": m.weights_artifact,
                     "val_accuracy": m.val_accuracy, "params": dict(m.params),
                     **({"fold_artifacts": list(m.fold_artifacts)} if m.fold_artifacts else {})}
                    for m in result.members],
        "metrics": [{"method": r.key, "name": r.name, "trials": list(r.trials), "weights": list(r.weights),
                     "fit_nll": _number(r.fit_nll), "test_accuracy": _number(r.accuracy),
                     "test_nll": _number(r.nll), "test_ece": _number(r.ece), "temperature": _number(r.temperature),
                     "test_nll_scaled": _number(r.nll_scaled), "test_ece_scaled": _number(r.ece_scaled),
                     "fit_accuracy": _number(r.fit_accuracy), "temperature_at_bound": r.temperature_at_bound,
                     "fitted_temperature": _number(r.fitted_temperature),
                     "heldout_accuracy": None if r.heldout is None else _number(r.heldout.accuracy),
                     "heldout_nll": _number(r.shipped_heldout_nll)}
                    for r in result.rows],
        # The comparison as the terminal and report.md print it (markers included): what `hpsearch report` shows.
        "table": {"headers": list(COMPARISON_HEADERS), "rows": table_cells(result)},
        "notes": list(result.notes),
        "skipped": list(skipped),
        "soup": None if result.soup is None else {
            "ingredients": list(result.soup.ingredients), "kept": result.soup.kept, "reason": result.soup.reason,
            "steps": [{"trial": s.trial, "val_accuracy": s.val_accuracy, "val_nll": _number(s.val_nll),
                       "added": s.added} for s in result.soup.steps]},
    }


# ------------------------------------------------------------------------------------------ the export


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


def _write_member(folder: Path, store: ArtifactStore, trial: optuna.trial.FrozenTrial, arch: str,
                  n_classes: int, kwargs: Mapping[str, Any], fold: tuple[int, str] | None = None) -> str:
    """Write one member's weights (with `fold`, (k, artifact id): fold k's model of a cross-validated member)."""
    try:
        state = load_trial_weights(store, trial) if fold is None else load_weights(store, fold[1])
    except ArtifactNotFound:
        # Only a worker that checked the pins just before this export pinned them can have deleted these.
        raise ExportError(f"trial {trial.number}'s weights were deleted (keep_weights of a running worker) while "
                          "this ensemble was exported; run `hpsearch ensemble` again") from None
    try:
        plain_model(arch, n_classes, kwargs).load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExportError(f"trial {trial.number}'s weights do not load into {arch} "
                          f"({first_line(err)})") from None
    name = f"member-{trial.number}.safetensors" if fold is None else f"member-{trial.number}-fold-{fold[0]}.safetensors"
    metadata = {"arch": arch, "trial": str(trial.number), "num_classes": str(n_classes),
                **({"fold": str(fold[0])} if fold is not None else {})}
    return _save_member(folder, name, state, metadata)


def _save_member(folder: Path, name: str, state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name), metadata=metadata)
    (folder / name).chmod(_umask_mode(0o666))  # safetensors writes 0600; the folder's other files follow the umask
    return name


def _member_file(folder: Path, member: Member, store: ArtifactStore, trials: Mapping[int, optuna.trial.FrozenTrial],
                 n_classes: int, kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Write one member's weights; (file name, extra manifest entries)."""
    if member.fold_artifacts:
        trial = trials[member.trial]
        folds = []
        for k, artifact in enumerate(member.fold_artifacts):
            name = _write_member(folder, store, trial, member.arch, n_classes, kwargs, (k, artifact))
            folds.append({"fold": k, "file": name, "sha256": sha256_file(folder / name)})
        return "", {"folds": folds, "fold_rule": FOLD_MEMBER_RULE}
    if member.state is None:
        return _write_member(folder, store, trials[member.trial], member.arch, n_classes, kwargs), {}
    ingredients = list(member.soup_of)
    metadata = {"arch": member.arch, "soup_of": ",".join(map(str, ingredients)), "num_classes": str(n_classes)}
    name = _save_member(folder, "soup.safetensors", member.state, metadata)
    return name, {"soup": {"ingredients": ingredients,
                           "rule": "uniform average of the ingredients' weights (greedy soup, Wortsman et al. "
                                   "2022); trial and hyperparameters are the best ingredient's"}}


def write_export(folder: Path, result: EnsembleResult, study: optuna.Study, store: ArtifactStore,
                 storage_url: str, metrics: Sequence[Mapping[str, Any]], onnx: bool = False) -> None:
    """Write the member files, manifest.json and SHA256SUMS into `folder` (the staged ensemble folder);
    with `onnx`, ensemble.onnx too (the optional ONNX packages must be installed). A kept greedy soup is one
    member whose averaged weights the result carries."""
    record = read_study_record(study)
    classes = record.class_names
    pre = study_preprocess(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    members = []
    for m in result.members:
        kwargs = builder_kwargs(m.arch, pre.image_size)
        name, extra = _member_file(folder, m, store, trials, len(classes), kwargs)
        files = {"file": name, "sha256": sha256_file(folder / name)} if name else {}
        members.append({"trial": m.trial, "arch": m.arch, "num_classes": len(classes), "builder_kwargs": kwargs,
                        "hyperparameters": dict(m.params), "weight": m.weight, "val_accuracy": m.val_accuracy,
                        **files, **extra})
    folds = any(m.fold_artifacts for m in result.members)
    manifest = {
        # Cross-validated members are a newer layout: an older loader refuses it by its version, not a KeyError.
        "format_version": FOLDS_FORMAT_VERSION if folds else FORMAT_VERSION, "hpsearch_version": __version__,
        "study": study.study_name, "storage": redact(storage_url),
        "split_sha256": result.split_sha256, "classes": classes,
        "preprocessing": preprocessing_json(pre, record.config_value("data", "augment")),
        "combine": {"method": result.method, "temperature": result.temperature,
                    "rule": (FOLD_RULES if folds else COMBINE_RULES)[result.method]},
        "temperature": result.temperature, "members": members, "metrics": list(metrics),
        "fitting": result.fitting(),
    }
    if onnx:
        from hpsearch.export._onnx import write_onnx

        manifest["onnx"] = write_onnx(folder, ensemble_from_manifest(folder, manifest, "loop"))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (folder / CARD_FILE).write_text(model_card(manifest), encoding="utf-8")
    files = [MANIFEST, CARD_FILE, *(name for m in members for name, _ in member_files(m)),
             *(name for name, _ in onnx_files(manifest))]
    (folder / SUMS).write_text("".join(f"{sha256_file(folder / f)}  {f}\n" for f in files), encoding="utf-8")
