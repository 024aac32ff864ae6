"""optuna-dashboard served on a real local port, and what it lists."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def dashboard_http(url: str, artifacts: Path | str) -> Iterator[Callable[[str], tuple[int, bytes]]]:
    """optuna-dashboard (its WSGI app, as `hpsearch dashboard` serves it) on a real local port, in a thread;
    yields get(path) -> (HTTP status, body)."""
    import threading
    import urllib.error
    import urllib.request
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from optuna_dashboard import wsgi

    from hpsearch.store import open_artifact_store, open_storage

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    app = wsgi(open_storage(url, reader=True), artifact_store=open_artifact_store(artifacts, create=False))
    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(base + path, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.read()

    try:
        yield get
    finally:
        server.shutdown()
        server.server_close()


def dashboard_artifacts(get: Callable[[str], tuple[int, bytes]], study_id: int) -> dict[int, set[str]]:
    """Trial number -> the artifact ids the dashboard lists for it (its study API, as the web page reads it)."""
    import json

    status, body = get(f"/api/studies/{study_id}?after=0")
    assert status == 200, body
    return {t["number"]: {a["artifact_id"] for a in t["artifacts"]} for t in json.loads(body)["trials"]}
