"""`hpsearch report STUDY.toml --out DIR`: a finished study as files a colleague opens without hpsearch.

In one atomic rename (hpsearch.export.staged_dir) the folder gets:

- `trials.csv`: one row per trial (Optuna's `trials_dataframe()`: number, state, value, duration, every
  parameter) plus this project's attrs: best_epoch (0-based, as stored), pruned_reason, fail_reason, and
  retry_of (the trial it retries, from Optuna's RetryHeartbeatStaleTrialCallback);
- one PNG per figure of hpsearch.plots that can be drawn for this study (the others are named, with why, in
  the report's notes), including the best trial's confusion matrix on the validation split;
- `per_class.csv`: that trial's per-class validation accuracy;
- `report.html`: one self-contained page (images as data URIs, inline CSS, nothing fetched) with the summary,
  the top-k table, the per-class table, every figure and the notes.

Only validation outputs are read: the test split stays for the ensemble's final comparison.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.distributions import IntDistribution
from optuna.trial import FrozenTrial

from hpsearch import keys, plots
from hpsearch.artifacts import ArtifactStore, TrialOutputs, load_trial_outputs, open_artifact_store, resolve_artifacts
from hpsearch.errors import ReportError
from hpsearch.export import staged_dir
from hpsearch.report import state_counts, trials_frame
from hpsearch.search import open_existing, ranked_trials
from hpsearch.storage import redact

REPORT_FILE = "report.html"
TRIALS_FILE = "trials.csv"
PER_CLASS_FILE = "per_class.csv"
CONFUSION_FILE = "confusion_matrix.png"


@dataclass(frozen=True)
class Written:
    """What `write_report` wrote: the folder, its files (names, in writing order), the notes (skipped figures
    and why) and the trial whose validation outputs gave the per-class results."""

    folder: Path
    files: tuple[str, ...]
    notes: tuple[str, ...]
    trial: int

    @property
    def figures(self) -> tuple[str, ...]:
        return tuple(f for f in self.files if f.endswith(".png"))


@dataclass(frozen=True)
class Drawn:
    """One figure as the page and the folder get it: rendered once, written once and embedded once."""

    name: str  # the PNG's file name
    caption: str
    png: bytes


# ---------------------------------------------------------------------------------------------- the data


def _column(name: str) -> str:
    """Optuna's frame column names, shorter: params_lr -> lr, value_val_accuracy -> value."""
    if name.startswith("params_"):
        return name.removeprefix("params_")
    return "value" if name.startswith("value") else name


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """trials.csv: Optuna's trials frame (number, state, value, duration in seconds, every parameter) with the
    attrs a reader asks about next: the best epoch, why a trial was pruned or failed, what it retries."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params"))
    frame = frame.rename(columns=_column)
    if "value" not in frame.columns:  # Optuna leaves it out while no trial has a value
        frame.insert(2, "value", math.nan)
    frame["duration"] = pd.to_timedelta(frame["duration"]).dt.total_seconds()
    frame = frame.rename(columns={"duration": "duration_s"})
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    trials = [by_number[int(n)] for n in frame["number"]]
    integers = {name for t in trials for name, d in t.distributions.items() if isinstance(d, IntDistribution)}
    for name in integers & set(frame.columns):  # a step_size absent from other trials' rows stays 3, not 3.0
        frame[name] = frame[name].astype("Int64")
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    # Int64: a missing value is blank, not NaN turning 3 into 3.0, in the CSV
    frame["best_epoch"] = pd.array([t.user_attrs.get(keys.BEST_EPOCH) for t in trials], dtype="Int64")
    frame["pruned_reason"] = [t.user_attrs.get(keys.PRUNED_REASON) for t in trials]
    frame["fail_reason"] = [t.user_attrs.get(keys.FAIL_REASON) for t in trials]
    frame["retry_of"] = pd.array([retried(t) for t in trials], dtype="Int64")
    return frame


def best_with_outputs(study: optuna.Study, store: ArtifactStore,
                      location: str) -> tuple[FrozenTrial, TrialOutputs, list[str]]:
    """The best COMPLETE trial whose validation outputs the store still holds, its outputs, and a note for
    each better trial that had none (deleted, or a store other than the one the study ran with)."""
    notes: list[str] = []
    for trial in ranked_trials(study):
        if keys.OUTPUTS not in trial.user_attrs:
            notes.append(f"trial {trial.number} records no stored outputs")
            continue
        try:
            return trial, load_trial_outputs(store, trial), notes
        except (ArtifactNotFound, FileNotFoundError):
            notes.append(f"trial {trial.number}'s outputs are not in {location}")
    raise ReportError(f"study {study.study_name!r} has no COMPLETE trial with stored validation outputs in "
                      f"{location}; pass the study's artifact store with --artifacts, or finish a trial with "
                      "`hpsearch run`")


def confusion(labels: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Counts [true, predicted] over the validation split, from its logits' argmax."""
    n = logits.shape[1]
    predicted = logits.argmax(axis=1)
    return np.bincount(labels.astype(np.int64) * n + predicted, minlength=n * n).reshape(n, n)


def per_class_table(matrix: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Per true class: images, correct, accuracy, and the class it is most often mistaken for."""
    support = matrix.sum(axis=1)
    correct = np.diag(matrix)
    off = matrix - np.diag(correct)
    worst = off.argmax(axis=1)
    return pd.DataFrame({
        "class": list(classes),
        "images": support,
        "correct": correct,
        "accuracy": np.where(support > 0, correct / np.maximum(support, 1), np.nan),
        "most_confused_with": [classes[j] if off[i, j] else "" for i, j in enumerate(worst)],
        "confused_images": off[np.arange(len(worst)), worst],
    })


# ------------------------------------------------------------------------------------------- the figures


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # Optuna cuts long tick labels off
    return buffer.getvalue()


def figure_builders(study: optuna.Study, frame: pd.DataFrame, matrix: np.ndarray, classes: Sequence[str],
                    trial: int) -> list[tuple[str, str, Callable[[], Figure]]]:
    """(file name, caption, builder) of every figure the report tries, in the page's order."""
    return [
        ("optimization_history.png", "Optimization history (COMPLETE trials, best so far)",
         lambda: plots.optimization_history(study)),
        ("learning_curves.png", "Learning curves: validation accuracy per epoch (PRUNED dashed grey)",
         lambda: plots.learning_curves(study)),
        ("param_importances.png", "Parameter importances", lambda: plots.param_importances(study)),
        ("parallel_coordinate.png", "Parallel coordinate", lambda: plots.parallel_coordinate(study)),
        ("lr_vs_accuracy.png", "Validation accuracy vs learning rate, by optimizer",
         lambda: plots.lr_vs_accuracy(frame)),
        ("optimizer_scheduler.png", "Optimizer × scheduler: mean and best validation accuracy",
         lambda: plots.optimizer_scheduler_grid(frame)),
        (CONFUSION_FILE, f"Confusion matrix of trial {trial} on the validation split",
         lambda: plots.confusion_matrix(matrix, classes, f"trial {trial}, validation split")),
    ]


def draw(builders: Sequence[tuple[str, str, Callable[[], Figure]]]) -> tuple[list[Drawn], list[str]]:
    """Each figure as PNG bytes; one note per figure this study cannot give."""
    drawn: list[Drawn] = []
    notes: list[str] = []
    for name, caption, build in builders:
        try:
            drawn.append(Drawn(name, caption, _png(build())))
        except plots.PlotSkipped as skipped:
            notes.append(f"{name.removesuffix('.png')}: skipped, {skipped}")
    return drawn, notes


# ---------------------------------------------------------------------------------------------- the page

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f0f0f0}td{text-align:right}figure{margin:2em 0}img{max-width:100%}
figcaption{font-weight:bold;margin-bottom:0.5em}.notes li{color:#8a5a00}"""


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, na_rep="", float_format=lambda v: f"{v:.4g}")


def _summary(study: optuna.Study, url: str, trial: FrozenTrial) -> str:
    counts = ", ".join(f"{state} {n}" for state, n in state_counts(study).items() if n)
    sizes = study.user_attrs.get(keys.SPLIT_SIZES, {})
    best = ranked_trials(study)[0]  # a trial with outputs exists, so a COMPLETE one does
    rows = [("study", study.study_name), ("storage", redact(url)), ("direction", study.direction.name.lower()),
            ("trials", counts), ("split", ", ".join(f"{k} {v}" for k, v in sizes.items())),
            ("classes", str(len(keys.classes(study)))),
            ("best trial", f"trial {best.number}: val_accuracy {best.value:.4f}"),
            ("its params", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in best.params.items())),
            ("per-class results of", f"trial {trial.number} (the best with stored outputs)")]
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
                               for k, v in rows) + "</table>"


def page(study: optuna.Study, url: str, trial: FrozenTrial, top: pd.DataFrame, per_class: pd.DataFrame,
         drawn: Sequence[Drawn], notes: Sequence[str]) -> str:
    """report.html: one file that opens anywhere, offline: PNGs inline as base64 data URIs, CSS inline."""
    name = html.escape(study.study_name)
    figures = "".join(f"<figure><figcaption>{html.escape(d.caption)}</figcaption><img alt='{html.escape(d.name)}' "
                      f"src='data:image/png;base64,{base64.b64encode(d.png).decode('ascii')}'></figure>"
                      for d in drawn)
    note_list = "".join(f"<li>{html.escape(n)}</li>" for n in notes) or "<li>none</li>"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Study {name}</title>"
            f"<style>{STYLE}</style></head><body><h1>Study {name}</h1>{_summary(study, url, trial)}"
            f"<h2>Notes</h2><ul class='notes'>{note_list}</ul>"
            f"<h2>Top {len(top)} trials (COMPLETE)</h2>{_table(top)}"
            f"<h2>Per class: trial {trial.number} on the validation split</h2>{_table(per_class)}"
            f"<h2>Figures</h2>{figures}</body></html>\n")


# ------------------------------------------------------------------------------------------- the command


def _target(out: str | Path) -> Path:
    """--out as an absolute path; refused (before any work) when it is something other than a report folder."""
    target = Path(out).expanduser().absolute()
    if target.exists() and not (target.is_dir() and ((target / REPORT_FILE).is_file() or not any(target.iterdir()))):
        raise ReportError(f"--out {target} exists and is not a report folder (no {REPORT_FILE}); pick another "
                          "folder or remove it")
    return target


def write_report(study_file: str, *, storage: str | None = None, artifacts: str | None = None,
                 out: str | Path = "report", on_file: Callable[[Path], None] | None = None) -> Written:
    """`hpsearch report`: read the study, draw what it allows, write the folder `out` in one rename; `on_file`
    hears of each file as it is written (named by its final path)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI toolkit imported for nothing
    cfg, study, url = open_existing(study_file, storage)
    if not study.get_trials(deepcopy=False):
        raise ReportError(f"study {study.study_name!r} in {redact(url)} has no trials yet; run it first with "
                          f"`hpsearch run {study_file}`")
    target = _target(out)
    location = resolve_artifacts(artifacts, study, cfg.study.artifacts)
    trial, outputs, notes = best_with_outputs(study, open_artifact_store(location, create=False), location)
    frame = trials_table(study)
    matrix = confusion(outputs.val_labels.numpy(), outputs.val_logits.float().numpy())
    classes = keys.classes(study) or [str(i) for i in range(matrix.shape[0])]
    per_class = per_class_table(matrix, classes)
    drawn, skipped = draw(figure_builders(study, frame, matrix, classes, trial.number))
    notes += skipped
    top = trials_frame(ranked_trials(study)[:cfg.ensemble.top_k]).drop(columns=["state"])  # all COMPLETE
    written: list[str] = []
    with staged_dir(target, marker=REPORT_FILE) as staged:
        def put(name: str, data: bytes) -> None:
            (staged / name).write_bytes(data)
            written.append(name)
            if on_file is not None:
                on_file(target / name)

        put(TRIALS_FILE, frame.to_csv(index=False).encode("utf-8"))
        put(PER_CLASS_FILE, per_class.to_csv(index=False).encode("utf-8"))
        for figure in drawn:
            put(figure.name, figure.png)
        put(REPORT_FILE, page(study, url, trial, top, per_class, drawn, notes).encode("utf-8"))
    return Written(target, tuple(written), tuple(notes), trial.number)
