"""optuna-dashboard on a study's storage and artifact store, opened exactly as the workers open them, behind
`DashboardGuard` (its Host check, and with --allow-remote its token)."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import optuna

from hpsearch.config import read_study_file
from hpsearch.errors import ArtifactStoreError
from hpsearch.monitor._guard import DashboardGuard, RequestLog, allowed_hosts, url_host
from hpsearch.record import read_study_record
from hpsearch.store import (
    is_s3,
    load_existing,
    open_artifact_store,
    open_storage,
    redact,
    resolve_artifacts,
    resolve_storage_url,
)


def artifacts_for(storage: optuna.storages.BaseStorage, study_name: str | None, cli: str | None,
                  study_file: str | None) -> str:
    """The study's recorded artifact store; without a study, the one all recorded studies share."""
    if study_name is not None:
        return resolve_artifacts(cli, load_existing(storage, study_name), study_file)
    recorded = {read_study_record(s).artifacts for s in storage.get_all_studies()} - {None}
    return resolve_artifacts(cli or (recorded.pop() if len(recorded) == 1 else None), None, study_file)


def serve(study_path: str | None, *, storage: str | None, artifacts: str | None, host: str, port: int,
          loopback: bool, allow_remote: bool, echo: Callable[[str], None] = print) -> None:
    """optuna-dashboard behind `DashboardGuard`: bound to loopback (`loopback`), it answers only requests for
    that address; with `allow_remote`, only those that carry this start's token (printed once, in the URL)."""
    from bottle import run  # optuna-dashboard's own server: its run_server is bottle's run on its app
    from optuna_dashboard import wsgi

    cfg = read_study_file(study_path) if study_path else None
    url = resolve_storage_url(storage, cfg.study.storage if cfg else None)
    opened = open_storage(url, reader=True, existing=True)  # watching never creates a storage
    location = artifacts_for(opened, cfg.study.name if cfg else None, artifacts,
                             cfg.study.artifacts if cfg else None)
    try:
        store = open_artifact_store(location, create=False)
    except ArtifactStoreError:
        if is_s3(location):  # a named bucket that cannot be read is the user's to fix
            raise
        store = None  # no folder yet: the dashboard still shows the studies, without artifacts
    token = secrets.token_urlsafe(32) if allow_remote else None
    app = DashboardGuard(wsgi(opened, artifact_store=store), hosts=allowed_hosts(host, port) if loopback else None,
                         token=token, port=port)
    echo(f"optuna-dashboard on http://{url_host(host)}:{port}/{f'?token={token}' if token else ''}"
         f" for {redact(url)} (artifacts: {location if store else 'none found'}); Ctrl-C stops it")
    run(app, host=host, port=port, handler_class=RequestLog)
