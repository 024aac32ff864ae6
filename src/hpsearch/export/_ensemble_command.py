"""`hpsearch ensemble STUDY.toml --out DIR`: open the study and its store, combine its top-k trials
(hpsearch.ensemble), and write the folder (hpsearch.export._write), the members' weights pinned meanwhile so that
workers running beside it keep them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hpsearch._testhooks import hold_at
from hpsearch.ensemble import EnsembleResult, Method, Selection, study_ensemble, study_trial
from hpsearch.errors import UsageError
from hpsearch.export._write import write_ensemble_dir, write_export
from hpsearch.record import read_study_record
from hpsearch.store import open_artifact_store, open_existing, pin, resolve_artifacts, unpin
from hpsearch.train import resolve_device


@dataclass(frozen=True)
class Exported:
    study_name: str
    result: EnsembleResult
    selection: Selection
    folder: Path


def export_ensemble(study_file: str, *, storage: str | None = None, artifacts: str | None = None,
                    top_k: int | None = None, method: Method = "auto", out: str | Path = "best-ensemble",
                    export: bool = True, onnx: bool = False, device: str | None = None,
                    on_warning: Callable[[str], None] | None = None,
                    on_start: Callable[[str], None] | None = None, trial: int | None = None) -> Exported:
    """`hpsearch ensemble`: the study's top-k trials combined and compared, written to `out` (report.md and
    ensemble.json; with `export` the deployable ensemble; with `onnx` ensemble.onnx too). With `trial`
    (`hpsearch export --trial N`): that one trial, exported the same way."""
    if onnx:
        if not export:
            raise UsageError("--onnx exports the ensemble as a graph; it cannot go with --no-export")
        from hpsearch.export._onnx import require_onnx

        require_onnx()  # before any work: a missing optional package is bad input, not a late crash
    cfg, study, url = open_existing(study_file, storage)
    top_k = top_k or cfg.ensemble.top_k
    if top_k < 2 and trial is None:
        raise UsageError(f"top_k {top_k}: an ensemble needs at least 2 members; set --top-k or [ensemble] top_k")
    store = open_artifact_store(resolve_artifacts(artifacts, study, cfg.study.artifacts), create=False)
    pinned: list[str] = []  # workers running beside this export keep these weights until it is written

    def pin_weights(artifact_id: str) -> None:
        pinned.append(artifact_id)
        pin(study, artifact_id)

    try:
        if trial is not None:
            result, selection = study_trial(study, store, trial, cfg.model.arch, pin=pin_weights)
        else:
            result, selection = study_ensemble(study, store, top_k=top_k, method=method, arch=cfg.model.arch,
                                               device=lambda: resolve_device(device or cfg.train.device),
                                               on_warning=on_warning, on_start=on_start, pin=pin_weights)
        hold_at("ensemble")
        classes = read_study_record(study).class_names
        folder = write_ensemble_dir(Path(out), result, study.study_name, classes, selection.candidates,
                                    selection.skipped,
                                    export=None if not export else
                                    lambda d, payload: write_export(d, result, study, store, url,
                                                                    payload["metrics"], onnx=onnx))
    finally:
        unpin(study, pinned)
    return Exported(study.study_name, result, selection, folder)
