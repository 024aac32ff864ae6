"""`hpsearch report STUDY.toml --out DIR`: a finished study as files a colleague opens without hpsearch.

In one atomic rename (hpsearch.export.staged_dir) the folder gets:

- `trials.csv`: one row per trial (Optuna's `trials_dataframe()`: number, state, value, duration, every
  parameter) plus this project's attrs: best_epoch (1-based, as every table shows epochs), last_reported (the
  value at the last reported step: where a PRUNED trial was stopped), pruned_reason, fail_reason, and retry_of
  (the trial it retries, from Optuna's RetryHeartbeatStaleTrialCallback);
- one PNG per figure of hpsearch.plots that can be drawn for this study (the others are named, with why, in
  the report's notes), including the best trial's confusion matrix on the validation split;
- `per_class.csv`: that trial's per-class validation accuracy;
- `confident_mistakes.png`: that trial's most confidently wrong validation images, rebuilt from the study's
  recorded data config and split (skipped, with a note, where the data is absent here or gives another split);
- with `--ensemble DIR` (hpsearch.report_ensemble): the members' weights, the test-split comparison and a
  reliability diagram before and after temperature scaling;
- `report.html` (hpsearch.report_html): one self-contained page with the summary, the tables, every figure and
  the notes.

Both CSVs write a text cell that a spreadsheet would run as a formula (a class named `=cmd|x`, a reason quoting a
file `@x.png`) with a leading `'` (hpsearch.predict.csv_text); numbers are written as numbers.

Only validation outputs are read for the study itself: test outputs only for an ensemble, whose own comparison
already reports on the test split.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import torch
from matplotlib.figure import Figure
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.distributions import IntDistribution
from optuna.trial import FrozenTrial

from hpsearch.config import StudyConfig
from hpsearch.data import RecordMismatch, rebuild_study_data
from hpsearch.ensemble import fold_outputs, member_log_probs
from hpsearch.errors import ReportError, first_line
from hpsearch.export import staged_dir
from hpsearch.monitor import trials_frame
from hpsearch.predict import csv_text
from hpsearch.record import read_study_record, read_trial_record
from hpsearch.report import _plots as plots
from hpsearch.report._ensemble import comparison_table, ensemble_builders, read_ensemble
from hpsearch.report._html import Drawn, page
from hpsearch.store import (
    ArtifactStore,
    TrialOutputs,
    load_trial_outputs,
    open_artifact_store,
    open_existing,
    ranked_trials,
    redact,
    resolve_artifacts,
)

REPORT_FILE = "report.html"
TRIALS_FILE = "trials.csv"
PER_CLASS_FILE = "per_class.csv"
CONFUSION_FILE = "confusion_matrix.png"
MISTAKES_FILE = "confident_mistakes.png"


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
    records = [read_trial_record(t) for t in trials]
    # 1-based, as every table and the learning curves show epochs (stored 0-based)
    frame["best_epoch"] = pd.array([None if r.best_epoch is None else r.best_epoch + 1 for r in records],
                                   dtype="Int64")
    frame["last_reported"] = [plots.last_reported(t) for t in trials]  # a PRUNED trial's value when stopped
    frame["pruned_reason"] = [r.pruned_reason for r in records]
    frame["fail_reason"] = [r.fail_reason for r in records]
    frame["retry_of"] = pd.array([retried(t) for t in trials], dtype="Int64")
    return frame


def best_with_outputs(study: optuna.Study, store: ArtifactStore,
                      location: str) -> tuple[FrozenTrial, TrialOutputs, list[str]]:
    """The best COMPLETE trial whose validation outputs the store still holds, its outputs, and a note for
    each better trial that had none (deleted, or a store other than the one the study ran with)."""
    notes: list[str] = []
    record = read_study_record(study)
    for trial in ranked_trials(study):
        if record.folds_sha256 is not None:  # cross-validated: the trial's out-of-fold outputs over train+val
            problem, outputs = fold_outputs(store, trial, record.folds_sha256, record.n_folds)
            if outputs is not None:
                return trial, outputs, notes
            notes.append(f"trial {trial.number}'s out-of-fold outputs are unusable: {problem}")
            continue
        if read_trial_record(trial).outputs is None:
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
    """Counts [true, predicted] over the validation split, from its logits' argmax (scikit-learn's)."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, logits.argmax(axis=1), labels=np.arange(logits.shape[1]))


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


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """`frame` as UTF-8 CSV without its index, each text cell through csv_text (numeric columns untouched)."""
    safe = frame.copy()
    for column in safe.columns:
        if not pd.api.types.is_numeric_dtype(safe[column]):
            safe[column] = safe[column].map(lambda v: csv_text(v) if isinstance(v, str) else v)
    return safe.to_csv(index=False).encode("utf-8")


# ------------------------------------------------------------------------------------------- the figures


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # Optuna cuts long tick labels off
    return buffer.getvalue()


def validation_images(study: optuna.Study, outputs: TrialOutputs | None = None) -> np.ndarray:
    """The study's validation images, uint8 [n_val, C, H, W] in split order (the order of the stored val_logits),
    rebuilt from the config it was created with: the data as it is on this machine must give the recorded split.
    A cross-validated study's out-of-fold `outputs` name their images (train+val, pool order); its folds are
    rebuilt and checked too. PlotSkipped where it cannot (data absent here, no recorded config, another split)."""
    record = read_study_record(study)
    try:
        cfg = StudyConfig.recorded(record.config, record.split_sizes)
        data = rebuild_study_data(record, cfg.data, cfg.study.seed)
    except RecordMismatch as err:
        raise plots.PlotSkipped(f"the data here no longer gives the study's recorded {err.part}") from None
    except (ValueError, OSError) as err:  # ConfigError, DataError and pydantic's ValidationError are ValueErrors
        reason = first_line(err)
        raise plots.PlotSkipped(f"the study's images cannot be loaded here ({reason})") from None
    if outputs is not None and outputs.val_index is not None:
        if data.folds is None:  # out-of-fold outputs of a study that records no folds
            raise plots.PlotSkipped("the data here no longer gives the study's recorded folds")
        return data.pool.images[outputs.val_index].numpy()
    return data.pool.images[torch.from_numpy(data.split.val)].numpy()


def confident_mistakes(study: optuna.Study, outputs: TrialOutputs | None, classes: Sequence[str]) -> Figure:
    """The figure of hpsearch.plots.confident_mistakes for a trial's stored validation outputs."""
    if outputs is None:
        raise plots.PlotSkipped("no validation outputs")
    if outputs.split_sha256 != read_study_record(study).split_sha256:
        raise plots.PlotSkipped("the trial's outputs are of another split than the study's")
    probs = np.exp(member_log_probs([outputs.val_logits.numpy()])[0])
    images = validation_images(study, outputs)
    return plots.confident_mistakes(images, outputs.val_labels.numpy(), probs.argmax(axis=1), probs.max(axis=1),
                                    classes)


def figure_builders(study: optuna.Study, frame: pd.DataFrame, matrix: np.ndarray, classes: Sequence[str],
                    trial: int, outputs: TrialOutputs | None = None) -> list[tuple[str, str, Callable[[], Figure]]]:
    """(file name, caption, builder) of every figure the report tries, in the page's order."""
    return [
        ("optimization_history.png", "Optimization history (COMPLETE trials, best so far; PRUNED at their last "
         "reported value)",
         lambda: plots.optimization_history(study)),
        ("learning_curves.png", "Fold accuracies: each fold's best-epoch validation accuracy, the steps the pruner "
         "compares (PRUNED dashed grey)" if read_study_record(study).folds_sha256 else
         "Learning curves: validation accuracy per epoch (best trial red, PRUNED dashed grey)",
         lambda: plots.learning_curves(study)),
        ("param_importances.png", "Parameter importances", lambda: plots.param_importances(study)),
        ("parallel_coordinate.png", "Parallel coordinate", lambda: plots.parallel_coordinate(study)),
        ("lr_vs_accuracy.png", "Validation accuracy vs learning rate, by optimizer",
         lambda: plots.lr_vs_accuracy(frame)),
        ("optimizer_scheduler.png", "Optimizer × scheduler: mean and best validation accuracy, PRUNED trials "
         "counted",
         lambda: plots.optimizer_scheduler_grid(frame)),
        (CONFUSION_FILE, f"Confusion matrix of trial {trial} on the validation split",
         lambda: plots.confusion_matrix(matrix, classes, f"trial {trial}, validation split")),
        (MISTAKES_FILE, f"Most confidently wrong validation images of trial {trial} (true / predicted class)",
         lambda: confident_mistakes(study, outputs, classes)),
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


# ------------------------------------------------------------------------------------------- the command


def _target(out: str | Path) -> Path:
    """--out as an absolute path; refused (before any work) when it is something other than a report folder."""
    target = Path(out).expanduser().absolute()
    if target.exists() and not (target.is_dir() and ((target / REPORT_FILE).is_file() or not any(target.iterdir()))):
        raise ReportError(f"--out {target} exists and is not a report folder (no {REPORT_FILE}); pick another "
                          "folder or remove it")
    return target


def write_report(study_file: str, *, storage: str | None = None, artifacts: str | None = None,
                 out: str | Path = "report", on_file: Callable[[Path], None] | None = None,
                 ensemble: str | Path | None = None) -> Written:
    """`hpsearch report`: read the study, draw what it allows, write the folder `out` in one rename; `on_file`
    hears of each file as it is written (named by its final path); `ensemble`: a folder `hpsearch ensemble`
    wrote, whose weights, comparison and calibration join the report."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI toolkit imported for nothing
    cfg, study, url = open_existing(study_file, storage)
    if not study.get_trials(deepcopy=False):
        raise ReportError(f"study {study.study_name!r} in {redact(url)} has no trials yet; run it first with "
                          f"`hpsearch run {study_file}`")
    target = _target(out)
    result = None if ensemble is None else read_ensemble(ensemble)  # a wrong --ensemble fails before any drawing
    location = resolve_artifacts(artifacts, study, cfg.study.artifacts)
    store = open_artifact_store(location, create=False)
    trial, outputs, notes = best_with_outputs(study, store, location)
    frame = trials_table(study)
    matrix = confusion(outputs.val_labels.numpy(), outputs.val_logits.float().numpy())
    classes = read_study_record(study).class_names or [str(i) for i in range(matrix.shape[0])]
    per_class = per_class_table(matrix, classes)
    builders = figure_builders(study, frame, matrix, classes, trial.number, outputs)
    drawn, skipped = draw(builders + ([] if result is None else ensemble_builders(result, study, store)))
    notes += skipped
    top = trials_frame(ranked_trials(study)[:cfg.ensemble.top_k]).drop(columns=["state"])  # all COMPLETE
    written: list[str] = []
    with staged_dir(target, marker=REPORT_FILE) as staged:
        def put(name: str, data: bytes) -> None:
            (staged / name).write_bytes(data)
            written.append(name)
            if on_file is not None:
                on_file(target / name)

        put(TRIALS_FILE, csv_bytes(frame))
        put(PER_CLASS_FILE, csv_bytes(per_class))
        for figure in drawn:
            put(figure.name, figure.png)
        comparison = None if result is None else comparison_table(result)
        put(REPORT_FILE, page(study, url, trial, top, per_class, drawn, notes, comparison).encode("utf-8"))
    return Written(target, tuple(written), tuple(notes), trial.number)
