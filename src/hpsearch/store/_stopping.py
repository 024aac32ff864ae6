"""Stopping a study on purpose: `[study] target` reached, or `hpsearch stop` from any machine.

A stop is a request recorded in the study (user attr `stop_request`: its number, when, by whom, why, and whether
at once), so every worker on every machine and storage sees it. Each process honours the requests made after it
started: a worker stops after its current trial (`StopWhenAsked`, an Optuna callback), or at once for
`--now` (`StopWatch`, a thread that interrupts the trial like Ctrl-C, so it ends FAIL with a queued retry that
resumes its checkpoint). A `run` started later resumes the study: an old request does not stop it.

"After it started" is decided by the request's number, never by clocks: each request numbers itself one above
the last, and a process notes the number it found when it started (`stop_generation`). Comparing the requester's
wall clock with the worker's made a machine whose clock was behind miss a stop, and one ahead obey an old one.
"""

from __future__ import annotations

import _thread
import getpass
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpsearch import keys
from hpsearch.store._studies import METRIC_NAME

WATCH_EVERY_S = 2.0  # how often a running trial looks for `stop --now`: one small read of the study


@dataclass(frozen=True)
class StopRequest:
    generation: int  # 1 for the study's first request, one more for each later one
    at: float  # unix seconds on the requester's clock: shown, never compared
    by: str  # user@host, or "target"
    reason: str
    now: bool  # at once (the running trials interrupted), or after each worker's current trial

    def line(self) -> str:
        when = datetime.fromtimestamp(self.at, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        how = "at once" if self.now else "after the current trial"
        return f"{self.reason} ({self.by}, {when}; {how})"


def request_stop(study: optuna.Study, reason: str, *, by: str | None = None, now: bool = False) -> StopRequest:
    """Record a stop request in the study; every worker started before it honours it. Two requests at the same
    moment may take the same number: either one stops the same workers."""
    request = StopRequest(stop_generation(study.user_attrs) + 1, time.time(),
                          by or f"{getpass.getuser()}@{socket.gethostname()}", reason, now)
    study.set_user_attr(keys.STOP_REQUEST, {"generation": request.generation, "at": request.at, "by": request.by,
                                            "reason": request.reason, "now": request.now})
    return request


def stop_request(attrs: dict[str, Any]) -> StopRequest | None:
    """The study's last stop request, from its user attrs."""
    raw = attrs.get(keys.STOP_REQUEST)
    if not isinstance(raw, dict):
        return None
    # A request recorded before requests were numbered counts as the first.
    return StopRequest(int(raw.get("generation", 1)), float(raw.get("at", 0.0)), str(raw.get("by", "")),
                       str(raw.get("reason", "stop")), bool(raw.get("now", False)))


def stop_generation(attrs: dict[str, Any]) -> int:
    """The number of the study's last stop request (0: none yet): what a process notes when it starts."""
    request = stop_request(attrs)
    return 0 if request is None else request.generation


def pending(attrs: dict[str, Any], seen: int) -> StopRequest | None:
    """A stop request made after this process started (numbered above `seen`, its `stop_generation` then), which
    it must honour."""
    request = stop_request(attrs)
    return request if request is not None and request.generation > seen else None


def reaches(study: optuna.Study, value: float | None, target: float) -> bool:
    """Whether a trial's value reaches the target: at or above it, or at or below for a minimized metric (loss)."""
    if value is None:
        return False
    return value <= target if study.direction == optuna.study.StudyDirection.MINIMIZE else value >= target


def target_reached(study: optuna.Study, target: float | None) -> FrozenTrial | None:
    """The first COMPLETE trial that reached the target, if any."""
    if target is None:
        return None
    reached = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
               if reaches(study, t.value, target)]
    return min(reached, key=lambda t: t.number) if reached else None


class StopWhenAsked:
    """After each trial: stop this process's study loop if a stop request came since it started (numbered above
    `seen`), or (with a target) if this trial reached it, in which case the request goes to every other worker
    too."""

    def __init__(self, seen: int, target: float | None) -> None:
        self.seen = seen
        self.target = target
        self.request: StopRequest | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if (self.target is not None and trial.state == TrialState.COMPLETE
                and reaches(study, trial.value, self.target)):
            name = study.metric_names[0] if study.metric_names else METRIC_NAME
            self.request = request_stop(study, f"target {self.target} reached by trial {trial.number} "
                                               f"({name} {trial.value:.4f})", by="target")
        else:
            self.request = pending(study.user_attrs, self.seen)
        if self.request is not None:
            study.stop()


class StopWatch:
    """A daemon thread that interrupts the main thread (like Ctrl-C) when `hpsearch stop --now` is asked; the
    running trial then ends FAIL with a queued retry, as an interrupted trial does."""

    def __init__(self, study: optuna.Study, seen: int, every_s: float = WATCH_EVERY_S) -> None:
        self.study = study
        self.seen = seen
        self.every_s = every_s
        self.fired: StopRequest | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hpsearch-stop-watch", daemon=True)

    def __enter__(self) -> StopWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(self.every_s):
            try:
                request = pending(self.study.user_attrs, self.seen)
            except Exception:  # a storage hiccup: look again at the next tick
                continue
            if request is not None and request.now:
                self.fired = request
                _thread.interrupt_main()
                return
