"""Tables of a study's trials (pandas frames, rendered with rich)."""

from __future__ import annotations

import math
from collections import Counter

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

PARAM_ORDER = ("lr", "optimizer", "scheduler", "dropout", "weight_decay", "step_size", "step_gamma",
               "exp_gamma", "plateau_factor", "plateau_patience")


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    return {state.name: counts.get(state.name, 0) for state in TrialState}


def ranked_trials(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE trials with a finite value, best first (ties: lower trial number first)."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None and math.isfinite(t.value)]
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    return sorted(complete, key=lambda t: (sign * t.value, t.number))


def trials_frame(trials: list[FrozenTrial]) -> pd.DataFrame:
    rows = []
    for t in trials:
        row: dict[str, object] = {"trial": t.number, "state": t.state.name,
                                  "val_accuracy": t.value if t.values else None,
                                  "best_epoch": _epoch(t.user_attrs.get("best_epoch"))}
        row.update({k: t.params[k] for k in PARAM_ORDER if k in t.params})
        seconds = t.duration.total_seconds() if t.duration is not None else None
        row["seconds"] = round(seconds, 1) if seconds is not None else None
        rows.append(row)
    return pd.DataFrame(rows)


def _epoch(value: object) -> int | None:
    return int(value) + 1 if isinstance(value, int) else None  # shown 1-based, like the progress line


def _format(column: str, value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column in ("lr", "weight_decay") and isinstance(value, float):
        return f"{value:.2e}"
    if column == "val_accuracy" and isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def frame_table(frame: pd.DataFrame, title: str) -> Table:
    table = Table(title=title, header_style="bold")
    for column in frame.columns:
        table.add_column(str(column), justify="right" if column != "state" else "left")
    for record in frame.to_dict("records"):
        table.add_row(*(_format(str(c), record[c]) for c in frame.columns))
    return table


def top_trials_table(study: optuna.Study, k: int) -> Table:
    top = ranked_trials(study)[:k]
    return frame_table(trials_frame(top), f"top {len(top)} trials of {study.study_name!r}")


def describe_trial(trial: FrozenTrial) -> str:
    """One line per finished trial, for the run's log."""
    p = trial.params
    what = f"{p.get('optimizer', '?')} lr={p.get('lr', float('nan')):.2e} {p.get('scheduler', '?')} " \
           f"dropout={p.get('dropout', float('nan')):.2f}"
    if trial.state == TrialState.COMPLETE:
        return f"trial {trial.number} [green]COMPLETE[/] val_accuracy={trial.value:.4f}  ({what})"
    if trial.state == TrialState.PRUNED:
        return f"trial {trial.number} [yellow]PRUNED[/] {trial.user_attrs.get('pruned_reason', '')}  ({what})"
    return f"trial {trial.number} [red]{trial.state.name}[/] {trial.user_attrs.get('fail_reason', '')}  ({what})"
