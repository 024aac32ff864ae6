"""Starting, pinning and supervising worker processes on one machine; failing and retrying a dead
worker's trial.
"""

from __future__ import annotations

from hpsearch.workers._forkserver import start_forkserver, stop_forkserver
from hpsearch.workers._supervisor import (
    WorkerJob,
    check_gpus,
    install_stop_handler,
    run_workers,
    visible_gpus,
    watch_supervisor,
)

__all__ = [
    "WorkerJob",
    "check_gpus",
    "install_stop_handler",
    "run_workers",
    "start_forkserver",
    "stop_forkserver",
    "visible_gpus",
    "watch_supervisor",
]
