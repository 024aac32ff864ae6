"""Tables of a study's trials (pandas frames, rendered with rich)."""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime

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


def running_trials_table(study: optuna.Study, epochs: int, now: datetime | None = None) -> Table | None:
    """Who runs what now, across machines: each RUNNING trial's worker, last reported epoch and age."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return None
    now = now or datetime.now()
    table = Table(title=f"running trials of {study.study_name!r}", header_style="bold")
    for column in ("trial", "worker", "device", "epoch", "val_acc", "running for", "resumed from"):
        table.add_column(column, justify="right" if column in ("trial", "epoch", "val_acc") else "left")
    for t in sorted(running, key=lambda t: t.number):
        last = max(t.intermediate_values) if t.intermediate_values else None
        resumed = t.user_attrs.get("resumed_from") or {}
        table.add_row(
            str(t.number), str(t.user_attrs.get("worker", "")), str(t.user_attrs.get("device", "")),
            f"{last + 1}/{epochs}" if last is not None else f"0/{epochs}",
            _format("val_accuracy", t.intermediate_values[last]) if last is not None else "",
            _duration((now - t.datetime_start).total_seconds()) if t.datetime_start else "",
            f"trial {resumed['trial']}, epoch {resumed['epochs_done']}" if resumed else "",
        )
    return table


def failed_trials_table(study: optuna.Study, last: int = 5) -> Table | None:
    """The most recent FAIL trials and why, and what became of each (retried by a later trial, or not)."""
    trials = study.get_trials(deepcopy=False)
    every = [t for t in trials if t.state == TrialState.FAIL]
    if not every:
        return None
    failed = every[-last:]
    retried_by = {t.system_attrs["failed_trial"]: t.number for t in trials if "failed_trial" in t.system_attrs}
    shown = f" (the last {len(failed)} of {len(every)})" if len(every) > len(failed) else ""
    table = Table(title=f"failed trials of {study.study_name!r}{shown}", header_style="bold")
    table.add_column("trial", justify="right")
    table.add_column("retried by", justify="right")
    table.add_column("reason", overflow="fold")
    for t in failed:
        retry = retried_by.get(t.number)
        table.add_row(str(t.number), "" if retry is None else f"trial {retry}", _reason(t, "fail_reason"))
    return table


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


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
