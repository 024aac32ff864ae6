"""A single-process `hpsearch run` stopped by SIGTERM or Ctrl-C: its trial ends FAIL at once, never RUNNING, and a
queued retry continues from the checkpoint the trial kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch._testhooks import HOLD_ENV
from tests.support import cli_env, run_cli, tiny_tables, write_study

# From the signal to the process gone, trial FAIL and retry queued: a broken handler leaves the trial RUNNING
# (it would wait for the heartbeat grace) or the process alive; a loaded machine needs a few seconds.
STOP_BUDGET_S = 30


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_fails_the_trial_at_once_and_its_retry_resumes_the_checkpoint(signum: signal.Signals,
                                                                              tmp_path: Path) -> None:
    study = write_study(tmp_path / "stop.toml", tiny_tables("stop", study={"n_trials": 1}, train={"epochs": 3}))
    url = f"sqlite:///{tmp_path / 'stop.db'}"
    artifacts = tmp_path / "artifacts"
    release = tmp_path / "release"
    argv = [sys.executable, "-m", "hpsearch", "run", str(study), "--storage", url, "--artifacts", str(artifacts)]
    # The trial waits after its first checkpoint until `release` exists: the signal lands mid-trial, every time.
    run = subprocess.Popen(argv, cwd=tmp_path, env=cli_env(**{HOLD_ENV: f"1:{release}"}),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not _checkpointed(url):
            assert run.poll() is None, run.stdout.read().decode() if run.stdout else ""
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        os.kill(run.pid, signum)
        signalled = time.monotonic()
        code = run.wait(timeout=STOP_BUDGET_S)
        stopped_in = time.monotonic() - signalled
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    output = run.stdout.read().decode(errors="replace") if run.stdout else ""
    assert code == 130, output
    assert "Traceback" not in output and "queued for retry" in output, output
    trials = optuna.load_study(study_name="stop", storage=url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING], output
    stopped, retry = trials
    assert signum.name in stopped.user_attrs["fail_reason"]
    assert retry.params == stopped.params
    checkpoint = artifacts / stopped.user_attrs["checkpoint_artifact"]
    assert checkpoint.is_file(), "the interrupted trial's checkpoint is kept for its retry"
    print(f"\n{signum.name}: process gone, trial FAIL and retry queued {stopped_in:.1f} s after the signal")

    resumed = run_cli("run", str(study), "--storage", url, "--artifacts", str(artifacts), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    trials = optuna.load_study(study_name="stop", storage=url).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["resumed_from"] == {"trial": 0, "epochs_done": 1}
    assert trials[1].user_attrs["seed"] == stopped.user_attrs["seed"]
    assert not checkpoint.exists(), "the retry deletes the checkpoint it resumed once it finishes"


def _checkpointed(url: str) -> bool:
    try:
        trials = optuna.load_study(study_name="stop", storage=url).trials
    except KeyError:
        return False
    return any(t.state == TrialState.RUNNING and "checkpoint_artifact" in t.user_attrs for t in trials)
