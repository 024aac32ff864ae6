"""Watching a study without torch: the trials and `status` tables, optuna-dashboard."""

from __future__ import annotations

from hpsearch.monitor._dashboard import serve
from hpsearch.monitor._status import status_object
from hpsearch.monitor._tables import (
    describe_trial,
    format_cell,
    state_counts,
    status_renderables,
    top_trials_table,
    trials_frame,
)

__all__ = [
    "describe_trial",
    "format_cell",
    "serve",
    "state_counts",
    "status_object",
    "status_renderables",
    "top_trials_table",
    "trials_frame",
]
