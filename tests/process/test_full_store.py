"""A full artifact store is not a trial's fault: the first trial that finds no room stops the run at once, with
one line naming the store, its free space and what a trial needs; the trial is queued again; nothing
half-written stays behind. The store is a real 100 MB filesystem (tmpfs, mounted in a private mount namespace
so the test needs no privileges beyond a user namespace)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch.store import open_storage
from tests.support import run_on_a_small_tmpfs, tiny_tables, write_study

FILLER_MB = 20  # 100 MB - 20 MB: room for one ResNet-18's weights (45 MB), not two



@pytest.mark.slow
def test_a_full_store_stops_the_run_at_the_first_trial_without_room(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    study_file = write_study(tmp_path / "full.toml", tiny_tables("full", study={
        "n_trials": 5, "max_consecutive_failures": 5}))
    url = f"sqlite:///{tmp_path / 'full.db'}"
    command = [sys.executable, "-m", "hpsearch", "run", str(study_file), "--storage", url, "--artifacts", str(store)]
    # a 100 MB store holding FILLER_MB of filler
    done = run_on_a_small_tmpfs(store, 100, command, tmp_path,
                                prelude=f"head -c {FILLER_MB * 10**6} /dev/zero > '{store}/filler'\n")

    assert "rc=2" in done.stderr, done.stderr  # bad input's exit code: the user frees space, nothing is broken
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    files = dict(reversed(entry.split(" ", 1)) for entry in done.stdout.splitlines())  # name -> bytes

    study = optuna.load_study(study_name="full", storage=open_storage(url))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING], \
        "the run stopped at the first full write; the trial was queued again, not four more trials burned"
    first, failed, retry = trials
    assert failed.user_attrs["store_full"] is True
    assert retry.params == failed.params and "store_full" not in retry.user_attrs

    # One line: the store, why, its free space, what a trial needs, the fix, the retry.
    weights = int(files[first.user_attrs["weights_artifact"]])
    assert line.startswith(f"error: artifacts: the store is full (no space left writing weights.safetensors to "
                           f"{store})"), line
    free = float(re.search(r": ([\d.]+) MB free", line).group(1))
    assert abs(free - (100 * 2**20 - FILLER_MB * 10**6 - weights) / 1e6) < 2, line
    assert "a trial needs about " in line and f"weights {weights / 1e6:.1f} MB" in line, line
    assert "--artifacts" in line and "trial 1 is queued for retry" in line, line
    assert failed.user_attrs["fail_reason"] == line.removeprefix("error: ")

    # Nothing half-written: the filler and the finished trial's two files, no temporary or orphaned file.
    assert set(files) == {"filler", first.user_attrs["weights_artifact"], first.user_attrs["outputs_artifact"]}


