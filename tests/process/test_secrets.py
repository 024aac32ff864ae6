"""A storage password never leaves the environment: not in any process's argv, not in any output or file."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from tests.support import cli_env, postgres_database, run_cli, tiny_tables, write_study

PASSWORD = "pw-9f3e-SECRET"  # the server trusts 127.0.0.1, so any password is accepted and none is checked


@pytest.fixture
def secret_url() -> Iterator[str]:
    for url in postgres_database():
        yield url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def _argv_with_password() -> dict[int, str]:
    """Every process on the machine whose command line holds the password (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if PASSWORD in argv:
                found[int(entry.name)] = argv
    return found


def _session_argvs(sid: int) -> dict[int, str]:
    """The argv of every live process in session `sid`: the run and everything it started (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:
                found[int(entry.name)] = argv
    return found


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_a_storage_password_appears_in_no_argv_output_or_file(secret_url: str, tmp_path: Path) -> None:
    study = write_study(tmp_path / "secret.toml", tiny_tables("secret", study={"n_trials": 3}))
    env = {"HPSEARCH_STORAGE": secret_url}
    run = subprocess.Popen([sys.executable, "-m", "hpsearch", "run", str(study), "--workers", "2",
                            "--artifacts", str(tmp_path / "artifacts")], cwd=tmp_path, env=cli_env(**env),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    leaks: dict[int, str] = {}
    seen: dict[int, str] = {}
    while run.poll() is None:  # read every process's argv while the workers run
        leaks |= _argv_with_password()
        seen |= _session_argvs(run.pid)
        time.sleep(0.1)
    output = run.stdout.read().decode(errors="replace") if run.stdout else ""
    assert run.returncode == 0, output
    trials = optuna.load_study(study_name="secret", storage=secret_url).get_trials(deepcopy=False)
    workers = {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in trials}
    assert len(workers) >= 2 and workers <= seen.keys(), f"workers {workers} not all seen running: {seen}"
    assert not leaks, f"the password is in a process's argv: {leaks}"
    assert not [argv for argv in seen.values() if "--storage" in argv or "postgresql" in argv], seen

    status = run_cli("status", str(study), cwd=tmp_path, **env)
    ensemble = run_cli("ensemble", str(study), "--out", str(tmp_path / "ens"), cwd=tmp_path, **env)
    assert status.returncode == 0 and ensemble.returncode == 0, status.stderr + ensemble.stderr
    texts = {"run": output, "status": status.stdout + status.stderr, "ensemble": ensemble.stdout + ensemble.stderr}
    assert "postgres:***@127.0.0.1" in texts["status"], "status names the storage, without its password"
    for name, text in texts.items():
        assert PASSWORD not in text, f"{name} printed the password:\n{text}"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in written)
    assert not [p for p in written if PASSWORD.encode() in p.read_bytes()], "a file holds the password"
