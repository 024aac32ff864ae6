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

from hpsearch.ensemble import ECE_BINS, calibration_bins
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


def last_reported(trial: FrozenTrial) -> float | None:
    """A trial's value at its last reported step (a PRUNED trial's last epoch, or fold, before it was stopped)."""
    step = trial.last_step
    value = trial.intermediate_values.get(step) if step is not None else None
    return value if value is not None and math.isfinite(value) else None


def _pruned_points(study: optuna.Study) -> list[tuple[int, float]]:
    """(trial number, last reported value) of every PRUNED trial that reported a step."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    return [(t.number, v) for t in trials if (v := last_reported(t)) is not None]


def optimization_history(study: optuna.Study) -> Figure:
    """Each COMPLETE trial's validation accuracy and the best so far, and each PRUNED trial at its last reported
    value (grey x): did the search still improve, and what did the pruner stop?"""
    if not _complete(study):
        raise PlotSkipped("no COMPLETE trial")
    import matplotlib.pyplot as plt

    with plt.rc_context():  # Optuna switches pyplot's global style to ggplot; keep that inside this figure
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=objective_name(study))
    pruned = _pruned_points(study)
    if pruned:
        ax.scatter([n for n, _ in pruned], [v for _, v in pruned], marker="x", color=PRUNED_STYLE["color"],
                   label=f"PRUNED ({len(pruned)}), at its last reported value", zorder=3)
        ax.legend(loc="lower right")
    return _figure_of(ax)


def importances(study: optuna.Study) -> dict[str, float]:
    """Parameter importances as optuna-dashboard computes them for this study: PED-ANOVA over every parameter
    of the COMPLETE trials, on the objective turned to "lower is better" for a maximized study."""
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    with warnings.catch_warnings():
        # the evaluator warns that it favours low targets whenever a target is given: the sign above is the answer
        warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes the importances.*")
        return get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(),
                                     target=lambda t: sign * float(t.value))


def param_importances(study: optuna.Study) -> Figure:
    """How much each parameter explains of validation accuracy: the same evaluator and target as
    optuna-dashboard (so both show the same numbers), titled with the number of COMPLETE trials it rests on."""
    complete = _complete(study)
    n = len(complete)
    if n < 2:
        raise PlotSkipped("parameter importances need at least 2 COMPLETE trials")
    if all(len({repr(t.params.get(p)) for t in complete}) < 2 for p in {p for t in complete for p in t.params}):
        raise PlotSkipped("no parameter takes more than one value across the COMPLETE trials")
    try:
        values = importances(study)
    except (ValueError, RuntimeError, ZeroDivisionError) as err:  # the evaluator refuses too little data
        raise PlotSkipped(f"the importance evaluator could not run ({err})") from None
    if not values:
        raise PlotSkipped("the importance evaluator found no parameter to rank")
    names = list(values)[::-1]  # most important on top
    fig = Figure(figsize=(7, 0.45 * len(names) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.barh([literal(k) for k in names], [values[k] for k in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f")
    ax.set_xlabel("importance (PED-ANOVA, normalised to sum 1)")
    few = " — few trials: a rough ranking" if n < 20 else ""
    ax.set_title(f"Parameter importances from {n} COMPLETE trials (as optuna-dashboard){few}")
    return fig


def parallel_coordinate(study: optuna.Study) -> Figure:
    """One line per COMPLETE trial through its parameters to its accuracy: which combinations did well."""
    complete = _complete(study)
    if len(complete) < 2:
        raise PlotSkipped("a parallel coordinate needs at least 2 COMPLETE trials")
    drawn_study, originals = _sampled(study, complete, MAX_LINES)
    # A conditional parameter (a scheduler's own) is absent from the other trials, which Optuna would draw as a
    # "None" category on top of its values: only the parameters every COMPLETE trial has get an axis.
    shared = sorted(set.intersection(*(set(t.params) for t in complete)))
    left_out = sorted({p for t in complete for p in t.params} - set(shared))
    import matplotlib.pyplot as plt

    with plt.rc_context(), warnings.catch_warnings():
        # a parameter with one value among them is drawn on a degenerate axis: right, not worth a warning
        warnings.filterwarnings("ignore", message=".*identical low and high ylims.*")
        ax = optuna.visualization.matplotlib.plot_parallel_coordinate(drawn_study, params=shared,
                                                                      target_name=objective_name(study))
    title = "Parallel Coordinate Plot" + (f" (conditional, left out: {', '.join(left_out)})" if left_out else "")
    _title(ax, title, len(originals), len(complete))
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
    folds = read_study_record(study).folds_sha256 is not None  # cross-validated: a trial reports one step per fold
    best = best_trial(study)
    handles = [Line2D([], [], color="tab:blue", label="COMPLETE (or RUNNING)"),
               Line2D([], [], label="PRUNED", **PRUNED_STYLE)]
    for line in ax.get_lines():
        drawn = re.fullmatch(r"Trial(\d+)", str(line.get_label()))  # Optuna labels each curve "Trial<number>"
        original = originals.get(int(drawn.group(1))) if drawn else None
        if original is not None:
            line.set_label(f"Trial{original.number}")  # the study's number, not the sample copy's
            if not folds:  # steps are 0-based epochs; users read epochs 1-based, as every table prints them
                line.set_xdata(np.asarray(line.get_xdata(), dtype=float) + 1)
            if original.state == TrialState.PRUNED:
                line.set(**PRUNED_STYLE)
            if best is not None and original.number == best.number:
                line.set(color="tab:red", linewidth=2.5, zorder=5)
                handles.insert(0, Line2D([], [], color="tab:red", linewidth=2.5,
                                         label=f"best: trial {best.number} ({best.value:.4f})"))
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()  # one entry per trial: unreadable past a dozen; the best and the two kinds say what matters
    ax.relim()
    ax.autoscale_view()
    ax.legend(handles=handles, loc="lower right")
    name = objective_name(study)  # what each step reported
    ax.set_xlabel(f"fold (0-based): that fold's best-epoch {name}" if folds else "epoch")
    ax.set_ylabel(name)
    _title(ax, "Fold accuracies" if folds else "Learning curves", len(originals), len(curves))
    return _figure_of(ax)


# ------------------------------------------------------------------------------------------ our own plots


def _finished_rows(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The COMPLETE rows of a trials frame (hpsearch.report._study.trials_table) with their value, and the PRUNED
    ones with their last reported value, that have `columns`; `shown` holds the value drawn, `pruned` the state."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PlotSkipped(f"the study searches no {', '.join(missing)}")
    complete = frame["state"] == "COMPLETE"
    rows = frame.assign(shown=frame["value"].where(complete, frame["last_reported"]), pruned=frame["state"] == "PRUNED")
    rows = rows[(complete | rows["pruned"]) & rows["shown"].notna()].dropna(subset=list(columns))
    if not (~rows["pruned"]).any():
        raise PlotSkipped(f"no COMPLETE trial with {', '.join(columns)}")
    return rows


def lr_vs_accuracy(frame: pd.DataFrame) -> Figure:
    """Validation accuracy against learning rate (log axis), one colour per optimizer: the "Adam vs RMSprop"
    question, and each optimizer's good learning-rate range, in one figure. PRUNED trials are drawn at their last
    reported value, as an x of their optimizer's colour: a learning rate the pruner stopped is a finding too."""
    rows = _finished_rows(frame, ["lr", "optimizer"])
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    size = 24 if len(rows) < 500 else 6  # small points when thousands would overlap
    for optimizer, group in rows.groupby("optimizer", sort=True):
        done, pruned = group[~group["pruned"]], group[group["pruned"]]
        label = f"{literal(optimizer)} ({len(done)}" + (f" + {len(pruned)} pruned)" if len(pruned) else ")")
        points = ax.scatter(done["lr"], done["shown"], label=label, alpha=0.8, s=size)
        if len(pruned):
            ax.scatter(pruned["lr"], pruned["shown"], marker="x", alpha=0.8, s=size, color=points.get_facecolor()[0])
    ax.scatter([], [], marker="x", color=PRUNED_STYLE["color"], label="x: PRUNED, at its last reported value")
    ax.set_xscale("log")
    # Ticks at 1, 2 and 5 of each decade, labelled once each: matplotlib's own minor labels run into each
    # other when the range spans about a decade, the usual learning-rate range.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.0e}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("learning rate (log)")
    ax.set_ylabel("val_accuracy")
    ax.set_title("Validation accuracy vs learning rate, by optimizer")
    ax.grid(True, alpha=0.3)
    ax.legend(title="optimizer (trials)")
    return fig


def cell_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer × scheduler: mean, best and count of the COMPLETE trials' val_accuracy, and the count and
    best last reported value of the PRUNED ones."""
    rows = _finished_rows(frame, ["optimizer", "scheduler"])
    keys = ["optimizer", "scheduler"]
    done = rows[~rows["pruned"]].groupby(keys)["shown"].agg(mean="mean", best="max", n="count")
    pruned = rows[rows["pruned"]].groupby(keys)["shown"].agg(pruned="count", pruned_best="max")
    stats = done.join(pruned, how="outer")
    stats[["n", "pruned"]] = stats[["n", "pruned"]].fillna(0).astype(int)
    return stats


def optimizer_scheduler_grid(frame: pd.DataFrame) -> Figure:
    """A heatmap of mean val_accuracy per optimizer × scheduler, each cell annotated with its best, its trial
    count and its PRUNED trials (count, best last reported value): a mean over 1 trial is luck, over 20 a
    finding, and a pair that was only ever pruned is a finding too."""
    stats = cell_stats(frame)
    # Axes from every trial, not only finished ones: an optimizer whose trials all failed is a finding.
    optimizers = sorted(map(str, frame["optimizer"].dropna().unique()))
    schedulers = sorted(map(str, frame["scheduler"].dropna().unique()))
    mean = np.full((len(optimizers), len(schedulers)), np.nan)
    fig = Figure(figsize=(1.8 * len(schedulers) + 3, 1.1 * len(optimizers) + 2), layout="constrained")
    ax = fig.add_subplot()
    for i, opt in enumerate(optimizers):
        for j, sched in enumerate(schedulers):
            lines = []
            cell = stats.loc[(opt, sched)] if (opt, sched) in stats.index else None
            if cell is not None and cell["n"]:
                mean[i, j] = cell["mean"]
                lines += [f"mean {cell['mean']:.4f}", f"best {cell['best']:.4f}"]
            lines.append(f"n={int(cell['n']) if cell is not None else 0}")
            if cell is not None and cell["pruned"]:
                lines.append(f"+{int(cell['pruned'])} pruned (≤{cell['pruned_best']:.4f})")
            ax.text(j, i, "\n".join(lines), ha="center", va="center", fontsize=8, color="black",
                    bbox={"facecolor": "white", "alpha": 0.6, "linewidth": 0})
    image = ax.imshow(np.ma.masked_invalid(mean), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="mean val_accuracy (COMPLETE)")
    ax.set_xticks(range(len(schedulers)), [literal(s) for s in schedulers])
    ax.set_yticks(range(len(optimizers)), [literal(o) for o in optimizers])
    ax.set_xlabel("scheduler")
    ax.set_ylabel("optimizer")
    ax.set_title("Optimizer × scheduler (n: COMPLETE trials; PRUNED at their last reported value)")
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


def reliability_diagram(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], n_bins: int = ECE_BINS) -> Figure:
    """Accuracy vs confidence per bin, one column per (title, confidence, correct) panel, with each bin's image
    count beneath (axes labelled "counts: <title>"): before and after temperature scaling, side by side."""
    fig = Figure(figsize=(4.5 * len(panels), 5.5), layout="constrained")
    grid = fig.add_gridspec(2, len(panels), height_ratios=(3, 1))
    centres = (np.arange(n_bins) + 0.5) / n_bins
    for j, (title, confidence, correct) in enumerate(panels):
        counts, hits, mean = calibration_bins(confidence, correct, n_bins)
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
