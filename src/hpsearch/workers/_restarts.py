"""When the supervisor restarts a worker that died: after an exponential backoff, within a budget per window.

A worker that dies at once again and again (a storage outage at its start, a broken environment) is restarted
after 1 s, then 2, 4, ... up to a minute between tries, instead of ten times in a second; one that ran healthily
for a while (10 minutes) starts again from 1 s. The budget is a number of restarts within a sliding window (20
in an hour), not in the run's whole life: a run of days survives a rare crash a day forever, and gives a worker
up only when it keeps dying: 20 restarts at these delays take at least a quarter of an hour of failing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    first_s: float = 1.0  # the delay before the first restart of a series
    cap_s: float = 60.0  # the longest delay: doubling stops here
    healthy_s: float = 600.0  # a worker that ran this long died of something new: its next delay is first_s again
    window_s: float = 3600.0  # restarts older than this no longer count toward the budget
    max_in_window: int = 20


@dataclass
class Backoff:
    """One worker's restart history under a policy; times are time.monotonic() seconds."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    _delay: float = 0.0
    _recent: deque[float] = field(default_factory=deque)

    def next_delay(self, ran_s: float, now: float) -> float | None:
        """The delay before restarting a worker that died after running `ran_s` seconds, recording the restart;
        None when the budget is spent (max_in_window restarts within the last window_s)."""
        if ran_s >= self.policy.healthy_s:
            self._delay = 0.0
        while self._recent and self._recent[0] <= now - self.policy.window_s:
            self._recent.popleft()
        if len(self._recent) >= self.policy.max_in_window:
            return None
        self._delay = self.policy.first_s if self._delay == 0 else min(self.policy.cap_s, self._delay * 2)
        self._recent.append(now)
        return self._delay

    @property
    def in_window(self) -> int:
        """Restarts counted toward the budget now (the last call's window)."""
        return len(self._recent)
