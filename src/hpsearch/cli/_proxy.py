"""`storage-proxy`: Optuna's gRPC storage proxy in front of the database, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal

from hpsearch.cli._hosts import is_loopback
from hpsearch.cli._output import console
from hpsearch.errors import ExitCode, UsageError


def cmd_storage_proxy(args: argparse.Namespace) -> ExitCode:
    from hpsearch.store import resolve_storage_url, serve

    if not args.allow_remote and not is_loopback(args.host):
        raise UsageError(f"--host {args.host}: the storage proxy has no authentication nor encryption (anyone who "
                         "reaches the port can change or delete studies); bind 127.0.0.1 (default), or add "
                         "--allow-remote on a private network")
    os.environ.setdefault("HPSEARCH_APP_NAME", "hpsearch-storage-proxy")  # what pg_stat_activity shows

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)  # `docker stop` ends it like Ctrl-C
    try:
        serve(resolve_storage_url(args.storage, None), host=args.host, port=args.port, pool_size=args.pool_size,
              heartbeat_grace=args.heartbeat_grace, echo=console.print)
    except KeyboardInterrupt:
        console.print("storage proxy stopped")
    return ExitCode.OK
