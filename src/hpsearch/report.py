"""Tables of a study's trials (pandas frames, rendered with rich)."""

from __future__ import annotations

import math
from collections import Counter

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from rich.markup import escape
from rich.table import Table

HEADERS = {"val_accuracy": "val_acc", "optimizer": "optim", "seconds": "sec"}


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
        p = t.params
        seconds = t.duration.total_seconds() if t.duration is not None else None
        rows.append({
            "trial": t.number,
            "state": t.state.name,
            "val_accuracy": t.value if t.values else None,
            "epoch": _epoch(t.user_attrs.get("best_epoch")),
            "lr": p.get("lr"),
            "optimizer": p.get("optimizer"),
            "scheduler": scheduler_label(p),
            "dropout": p.get("dropout"),
            "seconds": round(seconds, 1) if seconds is not None else None,
        })
    return pd.DataFrame(rows)


def scheduler_label(params: dict[str, object]) -> str:
    """The scheduler with its own parameters, e.g. step(2, 0.31)."""
    name = str(params.get("scheduler", ""))
    args = {
        "step": ("step_size", "step_gamma"),
        "exponential": ("exp_gamma",),
        "plateau": ("plateau_factor", "plateau_patience"),
    }.get(name, ())
    values = [_format("", params[a]) for a in args if a in params]
    short = {"exponential": "exp"}.get(name, name)
    return f"{short}({', '.join(values)})" if values else name


def _epoch(value: object) -> int | None:
    return int(value) + 1 if isinstance(value, int) else None  # shown 1-based, like the progress line


def _format(column: str, value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column in ("lr", "weight_decay") and isinstance(value, float):
        return f"{value:.2e}"
    if column == "val_accuracy" and isinstance(value, float):
        return f"{value:.4f}"
    if column == "dropout" and isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def frame_table(frame: pd.DataFrame, title: str) -> Table:
    table = Table(title=title, header_style="bold")
    for column in frame.columns:
        text = column in ("state", "optimizer", "scheduler")
        table.add_column(HEADERS.get(str(column), str(column)), justify="left" if text else "right",
                         no_wrap=column == "scheduler")
    for record in frame.to_dict("records"):
        table.add_row(*(_format(str(c), record[c]) for c in frame.columns))
    return table


def top_trials_table(study: optuna.Study, k: int) -> Table:
    top = ranked_trials(study)[:k]
    frame = trials_frame(top).drop(columns=["state"], errors="ignore")
    return frame_table(frame, f"top {len(top)} trials of {study.study_name!r} (COMPLETE)")


def describe_trial(trial: FrozenTrial) -> str:
    """One line per finished trial, for the run's log."""
    p = trial.params
    what = f"{p.get('optimizer', '?')} lr={p.get('lr', float('nan')):.2e} {p.get('scheduler', '?')} " \
           f"dropout={p.get('dropout', float('nan')):.2f}"
    if trial.state == TrialState.COMPLETE:
        return f"trial {trial.number} [green]COMPLETE[/] val_accuracy={trial.value:.4f}  ({what})"
    if trial.state == TrialState.PRUNED:
        return f"trial {trial.number} [yellow]PRUNED[/] {_reason(trial, 'pruned_reason')}  ({what})"
    return f"trial {trial.number} [red]{trial.state.name}[/] {_reason(trial, 'fail_reason')}  ({what})"


def _reason(trial: FrozenTrial, key: str) -> str:
    # Free text (paths, "[study]"): escaped, or rich would drop its brackets or raise MarkupError on "[/x]".
    return escape(str(trial.user_attrs.get(key, '')))
