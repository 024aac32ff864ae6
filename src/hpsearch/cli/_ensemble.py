"""`ensemble`, `report`, `predict` and `select`: what a finished study gives: an exported ensemble, a report, and
predictions or uncertainty sampling with that export."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpsearch.cli._output import console, print_json_object, show
from hpsearch.errors import ExitCode

if TYPE_CHECKING:
    from hpsearch.export import Exported


def cmd_ensemble(args: argparse.Namespace) -> ExitCode:
    from hpsearch.export import export_ensemble

    exported = export_ensemble(
        args.study, storage=args.storage, artifacts=args.artifacts, top_k=args.top_k, method=args.method,
        out=args.out, export=not args.no_export, onnx=args.onnx, device=args.device,
        on_warning=lambda line: console.print(f"[yellow]warning[/]: {line}", highlight=False, soft_wrap=True),
        on_start=lambda line: console.print(line, highlight=False))
    return _print_exported(exported, args.no_export, args.onnx, args.json)


def cmd_export(args: argparse.Namespace) -> ExitCode:
    from hpsearch.export import export_ensemble

    exported = export_ensemble(args.study, storage=args.storage, artifacts=args.artifacts, method="single",
                               out=args.out or f"trial-{args.trial}", onnx=args.onnx, trial=args.trial)
    return _print_exported(exported, False, args.onnx, args.json)

# The table title's words for what fitted the weights and T (hpsearch.ensemble's fit_part).
FIT_PART_WORDS = {"calibration": "calibration images", "validation": "validation images",
                  "out-of-fold": "out-of-fold train+val images"}


def _print_exported(exported: Exported, no_export: bool, onnx: bool, as_json: bool) -> ExitCode:
    from hpsearch.export import result_table

    result, folder = exported.result, exported.folder
    if as_json:
        print_json_object(_ensemble_object(folder, exported=not no_export, onnx=onnx))
    else:
        show(result_table(result, f"top {len(exported.selection.candidates)} trials of {exported.study_name!r}: "
                                  f"held-out acc and NLL cross-fitted on the {result.sizes['fit']} "
                                  f"{FIT_PART_WORDS[result.fit_part]}, the rest on test; "
                                  "(T) at the shipped temperature"))
        for note in result.notes:  # plain text: a note may hold "[data] folds", which rich would take as markup
            show(f"- {note}", markup=False, highlight=False)
    files = sum(len(m.fold_artifacts) or 1 for m in result.members)
    written = "" if no_export else (f" and the exported ensemble ({folder / 'manifest.json'}, "
                                    f"{files} member file{'s' if files != 1 else ''}"
                                    + (", ensemble.onnx" if onnx else "") + ")")
    console.print(f"wrote {folder / 'report.md'}, {folder / 'ensemble.json'}{written}", markup=False, highlight=False)
    return ExitCode.OK


def _ensemble_object(folder: Path, *, exported: bool, onnx: bool) -> dict[str, Any]:
    """`ensemble --json`: the ensemble.json it wrote (members, weights, the comparison's metrics), and where the
    files are; the keys a script reads are listed in docs/cli.md."""
    from hpsearch.export import RESULT_FILE

    result: dict[str, Any] = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    return {**result, "folder": str(folder), "result_file": str(folder / RESULT_FILE),
            "report": str(folder / "report.md"), "manifest": str(folder / "manifest.json") if exported else None,
            "onnx": str(folder / "ensemble.onnx") if onnx else None}


def cmd_report(args: argparse.Namespace) -> ExitCode:
    from hpsearch.report import REPORT_FILE, write_report

    written = write_report(args.study, storage=args.storage, artifacts=args.artifacts, out=args.out,
                           on_file=lambda path: console.print(f"wrote {path}", markup=False, highlight=False,
                                                              soft_wrap=True),
                           ensemble=args.ensemble)
    for note in written.notes:
        console.print(f"- {note}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"report with {len(written.figures)} figures, per class from trial {written.trial}: "
                  f"{written.folder / REPORT_FILE}", markup=False, highlight=False, soft_wrap=True)
    return ExitCode.OK


def cmd_predict(args: argparse.Namespace) -> ExitCode:
    from hpsearch.predict import predict_csv

    return _scored_csv(args, lambda ensemble, paths, sink, device, warn: predict_csv(
        ensemble, paths, sink, args.batch_size, device, warn, tta=args.tta), "predicted")


def cmd_select(args: argparse.Namespace) -> ExitCode:
    from hpsearch.predict import select_csv

    return _scored_csv(args, lambda ensemble, paths, sink, device, warn: select_csv(
        ensemble, paths, sink, args.n, args.by, args.batch_size, device, warn, tta=args.tta),
        f"selected by {args.by}:")


def _scored_csv(args: argparse.Namespace, write: Callable[..., int], what: str) -> ExitCode:
    """predict and select alike: open the export, write the CSV, name every skipped input on stderr."""
    from hpsearch.predict import open_for_scoring
    from hpsearch.train import resolve_device

    device = resolve_device(args.device)
    ensemble, paths, skipped = open_for_scoring(args.dir, args.inputs, device, tta=args.tta)
    for line in skipped:
        _print_skipped(line)

    def skip(line: str) -> None:
        skipped.append(line)
        _print_skipped(line)

    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(args.out, "w", newline="", encoding="utf-8")) if args.out else sys.stdout
        n = write(ensemble, paths, sink, device, skip)
    console.print(f"{what} {n} image(s){f' into {args.out}' if args.out else ''}; {len(skipped)} skipped",
                  highlight=False)
    return ExitCode.INPUTS_SKIPPED if skipped else ExitCode.OK


def _print_skipped(line: str) -> None:
    from rich.markup import escape

    console.print(f"[yellow]skipped[/]: {escape(line)}", highlight=False, soft_wrap=True)
