"""`hpsearch storage-proxy` and `grpc://` storages: a real study through a real proxy (their refusals in one line are
in tests/store/test_proxy.py).

The storage conformance tests run through the proxy too (STORAGES_AND_PROXY in test_storage, test_supervisor,
test_search), and so do the 16-worker pop (test_queue) and the lone killed worker (test_killed_workers).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch._testhooks import HOLD_ENV
from hpsearch.store._storage import close_storage, open_storage
from tests.support import (
    Procs,
    dashboard_http,
    held_trials,
    hpsearch_argv,
    postgres_database,
    run_cli,
    states_of,
    storage_proxy,
    trials_of,
)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(600)
def test_run_workers_through_a_proxy_restarted_midway_then_every_command(
        study_file: Callable[..., Path], tmp_path: Path, procs: Procs) -> None:
    """`run --workers 4` on PostgreSQL through one proxy, which restarts while every worker is mid-trial: the
    run ends as it does directly (every trial once, none failed, no worker restarted); then status, report,
    ensemble and the dashboard read the study through the proxy."""
    n_workers = 4
    path = study_file("proxied", study={"n_trials": n_workers, "heartbeat_interval": 1},
                      data={"subset": 120, "image_size": 16}, train={"epochs": 2, "checkpoint_every": 1})
    artifacts = tmp_path / "artifacts"
    for database in postgres_database():
        # A grace well above the restart's few seconds (on a loaded machine, tens): the restart must not
        # look like dead workers.
        with storage_proxy(database, tmp_path / "proxy.out", grace=90) as proxy:
            release = tmp_path / "release"
            run = procs.start(hpsearch_argv("run", str(path), "--workers", str(n_workers), "--artifacts",
                                            str(artifacts)), "run", HPSEARCH_STORAGE=proxy.url,
                              **{HOLD_ENV: f"1:{release}"})
            held = held_trials(proxy.url, "proxied", n_workers, run, procs)
            proxy.restart()  # a redeploy: SIGTERM, then a new process on the same port
            release.touch()
            assert procs.wait(run, timeout=400) == 0, procs.output(run, 6000)
            output = procs.output(run, 20000)
            assert "restarting" not in output and "Traceback" not in output, output

            trials = trials_of(proxy.url, "proxied")
            numbers = sorted(t.number for t in trials)
            # Every trial once; a worker that finishes while others still run may start one more (as directly).
            assert numbers == list(range(len(trials))) and n_workers <= len(trials) < 2 * n_workers, states_of(trials)
            assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), states_of(trials)
            # The held trials went on after the restart from where they were: their epochs all reported.
            assert all(len(t.intermediate_values) == 2 for t in trials if t.number in {h.number for h in held})
            # The proxy's database is the one the study lives in, and the proxy held no trial attribute of its own.
            direct = optuna.load_study(study_name="proxied", storage=open_storage(database))
            assert [t.number for t in direct.trials] == numbers
            assert not any("hpsearch:heartbeat" in t.system_attrs for t in direct.trials)

            env = {"HPSEARCH_STORAGE": proxy.url}
            status = run_cli("status", str(path), "--artifacts", str(artifacts), cwd=tmp_path, **env)
            assert status.returncode == 0 and "COMPLETE" in status.stdout, status.stderr
            report = run_cli("report", str(path), "--artifacts", str(artifacts), "--out", str(tmp_path / "report"),
                             cwd=tmp_path, **env)
            assert report.returncode == 0 and (tmp_path / "report" / "report.html").is_file(), report.stderr
            ensemble = run_cli("ensemble", str(path), "--artifacts", str(artifacts), "--out", str(tmp_path / "ens"),
                               cwd=tmp_path, **env)
            assert ensemble.returncode == 0, ensemble.stderr
            assert json.loads((tmp_path / "ens" / "ensemble.json").read_text())["members"]

            with dashboard_http(proxy.url, artifacts) as get:
                code, body = get("/api/studies")
            assert code == 200 and [s["study_name"] for s in json.loads(body)["study_summaries"]] == ["proxied"]
            close_storage(direct._storage)
