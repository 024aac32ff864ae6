"""Tables of a study: its trials (pandas frames, rendered with rich) and its status."""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.markup import escape
from rich.table import Table

from hpsearch import keys
from hpsearch.record import TrialRecord, read_study_record, read_trial_record
from hpsearch.store import best_trial, ranked_trials, redact, stop_request, store_size_bytes, target_reached
from hpsearch.units import mib_text, size_text

if TYPE_CHECKING:
    import pandas as pd
    from rich.console import RenderableType

HEADERS = {"val_accuracy": "val_acc", "optimizer": "optim", "seconds": "sec"}


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    return {state.name: counts.get(state.name, 0) for state in TrialState}


def trials_frame(trials: list[FrozenTrial], metric: str = "val_accuracy") -> pd.DataFrame:
    """One row per trial; a study optimizing another metric than accuracy (`metric`, its objective's name) gets
    that value in a column of its own, before the accuracy."""
    import pandas as pd  # imported here: a worker prints trial lines, never a table

    rows = []
    for t in trials:
        p = t.params
        seconds = t.duration.total_seconds() if t.duration is not None else None
        rows.append({
            "trial": t.number,
            "state": t.state.name,
            **({metric: t.value if t.values else None} if metric != "val_accuracy" else {}),
            # Its accuracy whatever metric the study optimizes (the value, for an accuracy study).
            "val_accuracy": t.user_attrs.get("val_accuracy", t.value) if t.values else None,
            "epoch": _epoch(read_trial_record(t).best_epoch),
            **({"arch": p["arch"]} if "arch" in p else {}),  # a study of `[space] arch`
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
        "cosine": ("cosine_min_ratio",),
        "onecycle": ("onecycle_div",),
    }.get(name, ())
    values = [format_cell("", params[a]) for a in args if a in params]
    short = {"exponential": "exp"}.get(name, name)
    return f"{short}({', '.join(values)})" if values else name


def params_text(params: dict[str, Any]) -> str:
    """A trial's parameters as a user reads them: one `name = value` a line, floats to 3 significant digits
    (lr = 0.00123, not 0.0012345678901234567)."""
    return "\n".join(f"  {name} = {format_cell('', value)}" for name, value in params.items())


def _epoch(value: object) -> int | None:
    return int(value) + 1 if isinstance(value, int) else None  # shown 1-based, like the progress line


def format_cell(column: str, value: object) -> str:
    """A trials-table cell as every table of hpsearch prints it (terminal and the report's HTML): lr 1.05e-03."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column in ("lr", "weight_decay") and isinstance(value, float):
        return f"{value:.2e}"
    if column.startswith("val_") and isinstance(value, float):
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
        table.add_row(*(format_cell(str(c), record[c]) for c in frame.columns))
    return table


def top_trials_table(study: optuna.Study, k: int) -> Table:
    top = ranked_trials(study)[:k]
    metric = study.metric_names[0] if study.metric_names else "val_accuracy"
    frame = trials_frame(top, metric).drop(columns=["state"], errors="ignore")
    return frame_table(frame, f"top {len(top)} trials of {study.study_name!r} (COMPLETE)")


def device_label(record: TrialRecord) -> str:
    """`cpu`, or `cuda:0` with the physical GPU it is (name, and CUDA_VISIBLE_DEVICES' id) and the trial's peak
    memory once known: what tells two workers' GPUs apart."""
    device = record.device or ""
    gpu = record.gpu or {}
    if not gpu:
        return device
    parts = [str(gpu.get("name", "GPU"))]
    if gpu.get("visible"):
        parts.append(f"CUDA_VISIBLE_DEVICES={gpu['visible']}")
    if record.peak_gpu_mib is not None:
        parts.append(f"peak {mib_text(record.peak_gpu_mib)}")
    return f"{device} ({', '.join(parts)})"


def gpu_memory_lines(study: optuna.Study) -> list[str]:
    """Per physical GPU the finished trials ran on: the largest peak memory of a trial, against the GPU's own
    (what --workers-per-gpu M and the batch size are chosen by: M x peak must fit)."""
    by_gpu: dict[tuple[str, str], list[float]] = {}
    total: dict[tuple[str, str], Any] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        record = read_trial_record(t)
        gpu, peak = record.gpu, record.peak_gpu_mib
        if gpu and peak is not None:
            key = (str(gpu.get("name", "GPU")), str(gpu.get("uuid") or gpu.get("visible") or gpu.get("index")))
            by_gpu.setdefault(key, []).append(float(peak))
            total[key] = gpu.get("memory_mib")
    return [f"GPU {name} ({ident}): peak {mib_text(max(peaks))} per trial of "
            f"{mib_text(total[(name, ident)]) if total[(name, ident)] else '?'}, over "
            f"{len(peaks)} trials" for (name, ident), peaks in sorted(by_gpu.items())]


def running_trials_table(study: optuna.Study, epochs: int, now: datetime | None = None) -> Table | None:
    """Who runs what now, across machines: each RUNNING trial's worker, last reported epoch and age."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return None
    now = now or datetime.now()
    table = Table(title=f"running trials of {study.study_name!r}", header_style="bold")
    for column in ("trial", "worker", "device", "epoch", "val_acc", "running for", "resumed from"):
        table.add_column(column, justify="right" if column in ("trial", "epoch", "val_acc") else "left")
    folds = read_study_record(study).n_folds  # cross-validated: a step is a fold, not an epoch
    for t in sorted(running, key=lambda t: t.number):
        last = max(t.intermediate_values) if t.intermediate_values else None
        record = read_trial_record(t)
        resumed = record.resumed_from or {}
        table.add_row(
            str(t.number), record.worker or "", device_label(record),
            (f"{last + 1}/{epochs}" if last is not None else f"0/{epochs}") if not folds else
            f"fold {len(record.folds) + 1}/{folds}",
            format_cell("val_accuracy", t.intermediate_values[last]) if last is not None else "",
            _duration((now - t.datetime_start).total_seconds()) if t.datetime_start else "",
            f"trial {resumed['trial']}, " + (f"fold {resumed['folds_done']}, " if "folds_done" in resumed else "")
            + f"epoch {resumed['epochs_done']}" if resumed else "",
        )
    return table


def failed_trials_table(study: optuna.Study, last: int = 5) -> Table | None:
    """The most recent FAIL trials and why, and what became of each (retried by a later trial, or not)."""
    trials = study.get_trials(deepcopy=False)
    every = [t for t in trials if t.state == TrialState.FAIL]
    if not every:
        return None
    failed = every[-last:]
    original = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    retried_by = {original(t): t.number for t in trials if original(t) is not None}
    shown = f" (the last {len(failed)} of {len(every)})" if len(every) > len(failed) else ""
    table = Table(title=f"failed trials of {study.study_name!r}{shown}", header_style="bold")
    table.add_column("trial", justify="right")
    table.add_column("retried by", justify="right")
    table.add_column("reason", overflow="fold")
    for t in failed:
        retry = retried_by.get(t.number)
        reason = _escaped(read_trial_record(t).fail_reason)
        table.add_row(str(t.number), "" if retry is None else f"trial {retry}", reason)
    return table


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def describe_trial(trial: FrozenTrial) -> str:
    """One line per finished trial, for the run's log."""
    p = trial.params
    arch = f"{p['arch']} " if "arch" in p else ""  # a study of `[space] arch`
    what = f"{arch}{p.get('optimizer', '?')} lr={p.get('lr', float('nan')):.2e} {p.get('scheduler', '?')} " \
           f"dropout={p.get('dropout', float('nan')):.2f}"
    record = read_trial_record(trial)
    if trial.state == TrialState.COMPLETE:
        folds = record.fold_val_accuracy
        per_fold = f" (folds {' '.join(f'{v:.4f}' for v in folds)})" if folds is not None else ""
        accuracy = trial.user_attrs.get("val_accuracy", trial.value)
        # A study of another metric: its value first, then the accuracy (the value is what ranks the trial).
        value = f"value={trial.value:.4f} " if accuracy != trial.value else ""
        return f"trial {trial.number} [green]COMPLETE[/] {value}val_accuracy={accuracy:.4f}{per_fold}  ({what})"
    if trial.state == TrialState.PRUNED:
        return f"trial {trial.number} [yellow]PRUNED[/] {_escaped(record.pruned_reason)}  ({what})"
    return f"trial {trial.number} [red]{trial.state.name}[/] {_escaped(record.fail_reason)}  ({what})"


def _escaped(reason: str | None) -> str:
    # Free text (paths, "[study]"): escaped, or rich would drop its brackets or raise MarkupError on "[/x]".
    return escape(reason or "")


def status_renderables(study: optuna.Study, storage_url: str, artifacts: str, top_k: int,
                       default_epochs: int) -> list[RenderableType]:
    """`hpsearch status`: counts by state, the best trial, the store's size, the top-k table, the running trials
    and the last failures."""
    values = state_counts(study)
    shown = [k for k in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING") if k in values]
    counts = Table(title=f"study {study.study_name!r} in {redact(storage_url)}", header_style="bold")
    for state in shown:
        counts.add_column(state, justify="right")
    counts.add_row(*(str(values[s]) for s in shown))
    parts: list[RenderableType] = [counts]
    best = best_trial(study)
    if best is not None:
        name = study.metric_names[0] if study.metric_names else "val_accuracy"
        parts.append(f"best: trial {best.number} {name}={best.value:.4f}, with\n" + params_text(best.params))
    else:  # a study `run` has just created, or whose first trials still run
        parts.append("no trial yet" if not sum(values.values()) else "no finished trial yet")
    record = read_study_record(study)
    target = record.config_value("study", "target")
    if target is not None:
        reached = target_reached(study, float(target))
        parts.append(f"target {target}: " + (f"reached by trial {reached.number}" if reached else "not reached yet"))
    request = stop_request(study.user_attrs)
    if request is not None:
        parts.append(f"last stop: {request.line()}")
    parts.append(f"artifacts: {artifacts} ({size_text(store_size_bytes(artifacts))})")
    parts += gpu_memory_lines(study)
    skipped = record.skipped_images
    if skipped:
        parts.append(f"{len(skipped)} unreadable images left out (bad_images = \"skip\"), e.g. {skipped[0]}; all "
                     f"in the study's {keys.SKIPPED_IMAGES!r} attr")
    if best is not None:
        parts.append(top_trials_table(study, top_k))
    epochs = int(record.config_value("train", "epochs", default_epochs))
    parts += [t for t in (running_trials_table(study, epochs), failed_trials_table(study)) if t is not None]
    return parts
