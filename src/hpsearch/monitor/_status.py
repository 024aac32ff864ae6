"""`status --json`: a study's state as one object with stable keys, for scripts (docs/cli.md lists
them); the same facts the status tables show, as numbers rather than text."""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpsearch.monitor._tables import state_counts
from hpsearch.record import read_study_record, read_trial_record
from hpsearch.store import best_trial, ranked_trials, redact, stop_request, store_size_bytes, target_reached


def _number(value: float | None) -> float | None:
    """A finite float, else None: JSON has no NaN or infinity, and a script must be able to parse every value."""
    return float(value) if value is not None and math.isfinite(value) else None


def trial_object(trial: FrozenTrial) -> dict[str, Any]:
    """One finished trial: its number, state, value (validation accuracy), best epoch (1-based), parameters."""
    best_epoch = read_trial_record(trial).best_epoch
    return {
        "trial": trial.number,
        "state": trial.state.name,
        "value": _number(trial.value) if trial.values else None,
        "best_epoch": best_epoch + 1 if isinstance(best_epoch, int) else None,
        "params": dict(trial.params),
        "seconds": round(trial.duration.total_seconds(), 1) if trial.duration is not None else None,
    }


def _running(trial: FrozenTrial) -> dict[str, Any]:
    record = read_trial_record(trial)
    last = max(trial.intermediate_values) if trial.intermediate_values else None
    return {
        "trial": trial.number,
        "worker": record.worker,
        "device": record.device,
        "steps_done": last + 1 if last is not None else 0,  # epochs, or folds in a cross-validated study
        "value": _number(trial.intermediate_values[last]) if last is not None else None,
        "started": trial.datetime_start.isoformat() if trial.datetime_start else None,
        "resumed_from": record.resumed_from,
    }


def _failed(study: optuna.Study) -> list[dict[str, Any]]:
    trials = study.get_trials(deepcopy=False)
    original = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    retried_by = {original(t): t.number for t in trials if original(t) is not None}
    return [{"trial": t.number, "reason": read_trial_record(t).fail_reason, "retried_by": retried_by.get(t.number)}
            for t in trials if t.state == TrialState.FAIL]


def status_object(study: optuna.Study, storage_url: str, artifacts: str, top_k: int) -> dict[str, Any]:
    """What `hpsearch status --json` prints (keys documented in docs/cli.md)."""
    trials = study.get_trials(deepcopy=False)
    best = best_trial(study)
    record = read_study_record(study)
    target = record.config_value("study", "target")
    reached = target_reached(study, float(target)) if target is not None else None
    request = stop_request(study.user_attrs)
    return {
        "study": study.study_name,
        "storage": redact(storage_url),
        "direction": study.direction.name.lower(),
        "states": state_counts(study),
        "best": trial_object(best) if best is not None else None,
        "top": [trial_object(t) for t in ranked_trials(study)[:top_k]],
        "running": [_running(t) for t in sorted(trials, key=lambda t: t.number) if t.state == TrialState.RUNNING],
        "failed": _failed(study),
        "target": None if target is None else {"value": float(target),
                                               "reached_by": reached.number if reached else None},
        "stop_request": request.line() if request is not None else None,
        "artifacts": {"location": artifacts, "bytes": store_size_bytes(artifacts)},
        "skipped_images": list(record.skipped_images or ()),
    }
