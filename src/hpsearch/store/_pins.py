"""Pins: weights a running `hpsearch ensemble` needs, which the workers' `keep_weights` must not delete yet.

An ensemble pins each candidate's weights (a study user attr `pin:<artifact id>` holding until when, in unix
seconds) before it checks that they exist, and unpins them when its export is written. A worker deletes a
loser's weights only while no live pin names them, and deletes them after the pin ends. A pin of an ensemble
that was killed expires by itself after PIN_TTL_S.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import optuna

from hpsearch import keys

PIN_TTL_S = 6 * 3600.0  # longer than any export (a greedy soup re-runs its members); a killed one's pins lapse


def pin(study: optuna.Study, artifact_id: str, ttl_s: float = PIN_TTL_S) -> None:
    study.set_user_attr(keys.PIN + artifact_id, time.time() + ttl_s)


def unpin(study: optuna.Study, artifact_ids: Iterable[str]) -> None:
    for artifact_id in artifact_ids:
        study.set_user_attr(keys.PIN + artifact_id, 0.0)  # a study attr cannot be deleted; 0 is long past


def pinned(attrs: dict[str, object], now: float | None = None) -> set[str]:
    """The artifact ids pinned now, from a study's user attrs."""
    now = time.time() if now is None else now
    return {key.removeprefix(keys.PIN) for key, until in attrs.items()
            if key.startswith(keys.PIN) and isinstance(until, int | float) and until > now}
