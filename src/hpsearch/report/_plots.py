"""The figures of `hpsearch report`: each function takes a study or plain data and returns a matplotlib Figure.

Optuna's matplotlib visualisations draw what they can (history, importances, parallel coordinate, learning
curves); two of our own answer the questions a fine-tuning search is run for: which learning rate for which
optimizer, and which optimizer × scheduler pair. Nothing here writes a file (hpsearch.study_report does).

A figure that cannot be drawn for this study raises `PlotSkipped` with the reason, so the report names it in
one line instead of crashing. A study of thousands of trials is sampled where one line per trial would choke
(learning curves, parallel coordinate); the figure's title says so. Text from user data (class names, an
ensemble's method) goes through `literal`: matplotlib reads `$...$` as mathtext, and a class named `$\\foo$`
would crash the report.
"""

from __future__ import annotations

import math
import random
import re
import warnings
from collections.abc import Sequence

import numpy as np
import optuna
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from optuna.trial import FrozenTrial, TrialState

from hpsearch.record import read_study_record
from hpsearch.store import best_trial

MAX_CURVES = 200  # learning curves drawn; beyond that the plot is a grey blur and Optuna's legend explodes
MAX_LINES = 1000  # parallel-coordinate lines
ANNOTATED_CLASSES = 20  # confusion cells get their count written in them up to this many classes
LABELLED_CLASSES = 40  # class names on the confusion matrix's axes up to this many
PRUNED_STYLE = {"color": "#888888", "linestyle": "--", "alpha": 0.6}


class PlotSkipped(Exception):
    """This figure cannot be drawn for this study; `str(err)` says why, in a few words."""


def literal(text: object) -> str:
    """`text` as matplotlib draws it literally: every `$` escaped, so no pair of them starts mathtext (an escaped
    `\\$` is drawn as `$`; a backslash outside mathtext is drawn as itself)."""
    return str(text).replace("$", r"\$")


# --------------------------------------------------------------------------------------- Optuna's plots


def _figure_of(ax: Axes) -> Figure:
    """The Figure Optuna drew on, detached from pyplot: a report of many figures must not keep them all alive
    (pyplot holds every figure it made until closed), and the Agg canvas still saves it."""
    import matplotlib.pyplot as plt

    fig = ax.get_figure()
    assert isinstance(fig, Figure)
    plt.close(fig)
    return fig


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]


def _sampled(study: optuna.Study, trials: Sequence[FrozenTrial],
             limit: int) -> tuple[optuna.Study, dict[int, FrozenTrial]]:
    """`study` itself when it holds at most `limit` of `trials`, else an in-memory copy of a seeded sample that
    keeps the best trial: Optuna's plots take a study, not a trial list. Returns the study drawn and, by trial
    number in it, the original trial (a copy numbers its trials from 0)."""
    if len(trials) <= limit:
        return study, {t.number: t for t in trials}
    rng = random.Random(0)  # the same report twice draws the same sample
    best = best_trial(study)
    rest = [t for t in trials if best is None or t.number != best.number]
    chosen = sorted(rng.sample(rest, limit - (best is not None)) + ([best] if best is not None else []),
                    key=lambda t: t.number)
    copy = optuna.create_study(direction=study.direction)
    if study.metric_names:
        copy.set_metric_names(study.metric_names)
    copy.add_trials(chosen)
    return copy, dict(enumerate(chosen))


def _title(ax: Axes, title: str, drawn: int, total: int) -> None:
    ax.set_title(title if drawn == total else f"{title} ({drawn} of {total} trials, sampled)")


def objective_name(study: optuna.Study) -> str:
    """What the study's values are: val_accuracy, or the metric it optimizes ([study] metric)."""
    return study.metric_names[0] if study.metric_names else "val_accuracy"


def optimization_history(study: optuna.Study) -> Figure:
    """Each COMPLETE trial's validation accuracy and the best so far: did the search still improve?"""
    if not _complete(study):
        raise PlotSkipped("no COMPLETE trial")
    import matplotlib.pyplot as plt

    with plt.rc_context():  # Optuna switches pyplot's global style to ggplot; keep that inside this figure
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=objective_name(study))
    return _figure_of(ax)


def varying_params(study: optuna.Study) -> list[str]:
    """Parameters every COMPLETE trial has and that take more than one value among them: importances of a
    constant (or of a scheduler's own parameter, absent from other trials) mean nothing."""
    complete = _complete(study)
    shared = set.intersection(*(set(t.params) for t in complete)) if complete else set()
    return sorted(p for p in shared if len({repr(t.params[p]) for t in complete}) > 1)


def param_importances(study: optuna.Study) -> Figure:
    """How much each parameter explains of validation accuracy (Optuna's default evaluator, PED-ANOVA)."""
    if len(_complete(study)) < 2:
        raise PlotSkipped("parameter importances need at least 2 COMPLETE trials")
    params = varying_params(study)
    if not params:
        raise PlotSkipped("no parameter takes more than one value across the COMPLETE trials")
    import matplotlib.pyplot as plt

    try:
        with plt.rc_context():
            ax = optuna.visualization.matplotlib.plot_param_importances(study, params=params,
                                                                        target_name=objective_name(study))
    except (ValueError, RuntimeError, ZeroDivisionError) as err:  # the evaluator refuses too little data
        raise PlotSkipped(f"the importance evaluator could not run ({err})") from None
    return _figure_of(ax)


def parallel_coordinate(study: optuna.Study) -> Figure:
    """One line per COMPLETE trial through its parameters to its accuracy: which combinations did well."""
    complete = _complete(study)
    if len(complete) < 2:
        raise PlotSkipped("a parallel coordinate needs at least 2 COMPLETE trials")
    drawn_study, originals = _sampled(study, complete, MAX_LINES)
    import matplotlib.pyplot as plt

    with plt.rc_context(), warnings.catch_warnings():
        # a parameter with one value among them is drawn on a degenerate axis: right, not worth a warning
        warnings.filterwarnings("ignore", message=".*identical low and high ylims.*")
        ax = optuna.visualization.matplotlib.plot_parallel_coordinate(drawn_study, target_name=objective_name(study))
    _title(ax, "Parallel Coordinate Plot", len(originals), len(complete))
    fig = _figure_of(ax)
    # Optuna keeps matplotlib's 6.4-inch default: with a scheduler's own parameters the axes' labels collide
    fig.set_size_inches(max(6.4, 1.3 * len(ax.get_xticks())), 5.5)
    return fig


def _with_curves(study: optuna.Study) -> list[FrozenTrial]:
    # Optuna's learning-curve plot draws these states; the count in the title must agree with it.
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return [t for t in study.get_trials(deepcopy=False, states=states) if t.intermediate_values]


def learning_curves(study: optuna.Study) -> Figure:
    """Validation accuracy per epoch of every trial (Optuna's intermediate values), PRUNED trials dashed grey:
    where the pruner stopped them, and whether it stopped good ones."""
    curves = _with_curves(study)
    if not curves:
        raise PlotSkipped("no trial reported an epoch")
    drawn_study, originals = _sampled(study, curves, MAX_CURVES)
    import matplotlib.pyplot as plt

    with plt.rc_context():
        ax = optuna.visualization.matplotlib.plot_intermediate_values(drawn_study)
    for line in ax.get_lines():
        drawn = re.fullmatch(r"Trial(\d+)", str(line.get_label()))  # Optuna labels each curve "Trial<number>"
        original = originals.get(int(drawn.group(1))) if drawn else None
        if original is not None:
            line.set_label(f"Trial{original.number}")  # the study's number, not the sample copy's
            if original.state == TrialState.PRUNED:
                line.set(**PRUNED_STYLE)
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()  # one entry per trial: unreadable past a dozen; two entries say what matters
    ax.legend(handles=[Line2D([], [], color="tab:blue", label="COMPLETE (or RUNNING)"),
                       Line2D([], [], label="PRUNED", **PRUNED_STYLE)], loc="lower right")
    folds = read_study_record(study).folds_sha256 is not None  # cross-validated: a trial reports one step per fold
    name = objective_name(study)  # what each step reported
    ax.set_xlabel(f"fold (0-based): that fold's best-epoch {name}" if folds else "epoch (0-based)")
    ax.set_ylabel(name)
    _title(ax, "Fold accuracies" if folds else "Learning curves", len(originals), len(curves))
    return _figure_of(ax)


# ------------------------------------------------------------------------------------------ our own plots


def _complete_rows(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The COMPLETE rows of a trials frame (hpsearch.study_report.trials_table) that have `columns`."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PlotSkipped(f"the study searches no {', '.join(missing)}")
    rows = frame[(frame["state"] == "COMPLETE") & frame["value"].notna()].dropna(subset=list(columns))
    if rows.empty:
        raise PlotSkipped(f"no COMPLETE trial with {', '.join(columns)}")
    return rows


def lr_vs_accuracy(frame: pd.DataFrame) -> Figure:
    """Validation accuracy against learning rate (log axis), one colour per optimizer: the "Adam vs RMSprop"
    question, and each optimizer's good learning-rate range, in one figure. PRUNED trials have no final
    accuracy and are left out."""
    rows = _complete_rows(frame, ["lr", "optimizer"])
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for optimizer, group in rows.groupby("optimizer", sort=True):
        ax.scatter(group["lr"], group["value"], label=f"{literal(optimizer)} ({len(group)})", alpha=0.8,
                   s=24 if len(rows) < 500 else 6)  # small points when thousands would overlap
    ax.set_xscale("log")
    # Ticks at 1, 2 and 5 of each decade, labelled once each: matplotlib's own minor labels run into each
    # other when the range spans about a decade, the usual learning-rate range.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.0e}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("learning rate (log)")
    ax.set_ylabel("val_accuracy")
    ax.set_title("Validation accuracy vs learning rate, by optimizer (COMPLETE trials)")
    ax.grid(True, alpha=0.3)
    ax.legend(title="optimizer (trials)")
    return fig


def cell_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer × scheduler: mean and best val_accuracy and the number of COMPLETE trials."""
    rows = _complete_rows(frame, ["optimizer", "scheduler"])
    return rows.groupby(["optimizer", "scheduler"])["value"].agg(mean="mean", best="max", n="count")


def optimizer_scheduler_grid(frame: pd.DataFrame) -> Figure:
    """A heatmap of mean val_accuracy per optimizer × scheduler, each cell annotated with its best and its
    trial count: a mean over 1 trial is luck, over 20 a finding."""
    stats = cell_stats(frame)
    # Axes from every trial, not only COMPLETE ones: an optimizer whose trials were all pruned is a finding.
    optimizers = sorted(map(str, frame["optimizer"].dropna().unique()))
    schedulers = sorted(map(str, frame["scheduler"].dropna().unique()))
    mean = np.full((len(optimizers), len(schedulers)), np.nan)
    fig = Figure(figsize=(1.8 * len(schedulers) + 3, 1.1 * len(optimizers) + 2), layout="constrained")
    ax = fig.add_subplot()
    for i, opt in enumerate(optimizers):
        for j, sched in enumerate(schedulers):
            if (opt, sched) in stats.index:
                cell = stats.loc[(opt, sched)]
                mean[i, j] = cell["mean"]
                text = f"mean {cell['mean']:.4f}\nbest {cell['best']:.4f}\nn={int(cell['n'])}"
            else:
                text = "n=0"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black",
                    bbox={"facecolor": "white", "alpha": 0.6, "linewidth": 0})
    image = ax.imshow(np.ma.masked_invalid(mean), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="mean val_accuracy")
    ax.set_xticks(range(len(schedulers)), [literal(s) for s in schedulers])
    ax.set_yticks(range(len(optimizers)), [literal(o) for o in optimizers])
    ax.set_xlabel("scheduler")
    ax.set_ylabel("optimizer")
    ax.set_title("Optimizer × scheduler (COMPLETE trials; empty cell: never completed)")
    return fig


def confusion_matrix(matrix: np.ndarray, classes: Sequence[str], title: str) -> Figure:
    """Rows are true classes, columns predicted ones; counts in the cells while they stay readable."""
    n = len(classes)
    if matrix.shape != (n, n) or n == 0:
        raise PlotSkipped(f"a {matrix.shape} matrix for {n} classes")
    side = min(4 + 0.45 * n, 24)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, label="images")
    if n <= ANNOTATED_CLASSES:
        high = matrix.max() / 2 if matrix.size else 0
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(int(count)), ha="center", va="center", fontsize=8,
                    color="white" if count > high else "black")
    if n <= LABELLED_CLASSES:
        ax.set_xticks(range(n), [literal(c) for c in classes], rotation=90)
        ax.set_yticks(range(n), [literal(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(literal(title))
    return fig


def _pixels(image: np.ndarray) -> np.ndarray:
    """One uint8 image as imshow wants it, [H, W, C]: the pool stores [C, H, W] (hpsearch.data.ImagePool)."""
    return np.moveaxis(image, 0, -1) if image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3) else image


def most_confident_mistakes(true: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, n: int) -> np.ndarray:
    """Indices of the (at most) n wrong predictions with the highest confidence, most confident first; a stable
    sort so that ties keep split order and the same report twice shows the same images."""
    wrong = np.flatnonzero(true != predicted)
    return wrong[np.argsort(-confidence[wrong], kind="stable")[:n]]


def confident_mistakes(images: np.ndarray, true: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
                       classes: Sequence[str], n: int = 16) -> Figure:
    """The n validation images the model got wrong most confidently (top softmax probability), each titled with
    its true and predicted class: label noise and look-alike classes show up here first."""
    chosen = most_confident_mistakes(true, predicted, confidence, n)
    if not len(chosen):
        raise PlotSkipped("no wrong validation prediction")
    cols = min(4, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(2.6 * cols, 2.8 * rows), layout="constrained")
    for k, i in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, k + 1)
        pixels = _pixels(images[i])
        ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", interpolation="nearest")
        ax.set_title(f"true {literal(classes[true[i]])} / pred {literal(classes[predicted[i]])} "
                     f"(p={confidence[i]:.2f})", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(f"Most confidently wrong validation images ({len(chosen)} of {int((true != predicted).sum())} wrong)")
    return fig


def member_weights(trials: Sequence[int], weights: Sequence[float], method: str) -> Figure:
    """One bar per ensemble member: how much of the combined probability each trial contributes."""
    if not trials:
        raise PlotSkipped("the ensemble lists no members")
    fig = Figure(figsize=(max(4.0, 0.8 * len(trials) + 2), 3.5), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar([f"trial {t}" for t in trials], weights, color="tab:blue")
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylabel("weight")
    ax.set_ylim(0, max(1.0, max(weights)))
    ax.set_title(f"Ensemble members' weights ({literal(method)})")
    return fig


def reliability_bins(confidence: np.ndarray, correct: np.ndarray,
                     n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin (i/B, (i+1)/B], as hpsearch.combine.ece_from bins: count, accuracy, mean confidence
    (NaN for an empty bin)."""
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        hits = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins) / counts
        mean = np.bincount(bins, weights=confidence, minlength=n_bins) / counts
    return counts, hits, mean


def reliability_diagram(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], n_bins: int = 10) -> Figure:
    """Accuracy vs confidence per bin, one column per (title, confidence, correct) panel, with each bin's image
    count beneath (axes labelled "counts: <title>"): before and after temperature scaling, side by side."""
    fig = Figure(figsize=(4.5 * len(panels), 5.5), layout="constrained")
    grid = fig.add_gridspec(2, len(panels), height_ratios=(3, 1))
    centres = (np.arange(n_bins) + 0.5) / n_bins
    for j, (title, confidence, correct) in enumerate(panels):
        counts, hits, mean = reliability_bins(confidence, correct, n_bins)
        top, bottom = fig.add_subplot(grid[0, j]), fig.add_subplot(grid[1, j])
        top.bar(centres, np.nan_to_num(hits), width=1 / n_bins, edgecolor="black", label="accuracy")
        # where in its bin the confidence sits: a bin's gap to the diagonal is from there, not the bin's centre
        top.plot(mean, hits, "o", color="tab:red", markersize=4, label="mean confidence")
        top.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=literal(title))
        top.legend(loc="upper left")
        bottom.bar(centres, counts, width=1 / n_bins, color="tab:grey", edgecolor="black")
        bottom.set(xlim=(0, 1), xlabel="confidence (top probability)", ylabel="images", label=f"counts: {title}")
    return fig
