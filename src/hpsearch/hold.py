"""A test's hold: a process-level test stops a command at a named point until the test releases it.

`HPSEARCH_TEST_HOLD="POINT:PATH"` makes the process wait at POINT until PATH exists. The points: a number N
(a trial, after writing its checkpoint of epoch N) and `ensemble` (`hpsearch ensemble`, after pinning and
choosing its members, before writing them). A signal, a kill or a concurrent run then lands at the same moment
every time, however loaded the machine, with no polling for a window. Unset (always, outside tests), it costs
one environment lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

HOLD_ENV = "HPSEARCH_TEST_HOLD"


def hold_at(point: str) -> None:
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    at, _, release = spec.partition(":")
    while at == point and not Path(release).exists():
        time.sleep(0.05)
