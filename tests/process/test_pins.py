"""`hpsearch ensemble` beside running workers: the weights it chose are pinned, so a worker's keep_weights
leaves them until the export is written, then deletes them. A real concurrent run: the export is held (test
hold `ensemble`) after choosing its members while another `hpsearch run` finishes a trial with keep_weights 1."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch._testhooks import HOLD_ENV
from hpsearch.predict import load_ensemble
from hpsearch.store import open_storage, pinned
from tests.support import cli_env, run_cli, tiny_tables, write_study


def _weights_on_disk(study: optuna.Study, store: Path) -> dict[int, bool]:
    return {t.number: (store / t.user_attrs["weights_artifact"]).exists()
            for t in study.get_trials(states=(TrialState.COMPLETE,))}


@pytest.mark.slow
def test_an_export_keeps_its_members_while_a_worker_deletes_losers(tmp_path: Path) -> None:
    url, store = f"sqlite:///{tmp_path / 'race.db'}", tmp_path / "store"
    out, release = tmp_path / "ens", tmp_path / "go"
    roomy = write_study(tmp_path / "roomy.toml", tiny_tables("race", study={"n_trials": 3, "keep_weights": 10}))
    tight = write_study(tmp_path / "tight.toml", tiny_tables("race", study={"n_trials": 4, "keep_weights": 1}))
    common = ["--storage", url, "--artifacts", str(store)]
    first = run_cli("run", str(roomy), *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    study = optuna.load_study(study_name="race", storage=open_storage(url))
    assert all(_weights_on_disk(study, store).values())

    export = subprocess.Popen([sys.executable, "-m", "hpsearch", "ensemble", str(roomy), *common, "--method",
                               "soft", "--out", str(out)], cwd=tmp_path,
                              env=cli_env(**{HOLD_ENV: f"ensemble:{release}"}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(pinned(study.user_attrs)) < 2:  # top_k 2: it pinned its two members and holds
            assert export.poll() is None, export.communicate()
            assert time.monotonic() < deadline, "the export never pinned its members"
            time.sleep(0.2)
        members = pinned(study.user_attrs)

        # Meanwhile a worker finishes a trial and keeps the best one weights file only ...
        second = run_cli("run", str(tight), *common, cwd=tmp_path)
        assert second.returncode == 0, second.stderr
        ranked = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: (-t.value, t.number))
        on_disk = _weights_on_disk(study, store)
        # ... but not the pinned members: those wait; every other loser went.
        for rank, trial in enumerate(ranked):
            kept = rank == 0 or trial.user_attrs["weights_artifact"] in members
            assert on_disk[trial.number] == kept, (rank, trial.number)
    finally:
        release.touch()
    _, err = export.communicate(timeout=120)
    assert export.returncode == 0, err
    assert "Traceback" not in err
    ensemble = load_ensemble(out)  # every checksum verified, both members loaded strictly
    assert len(ensemble.members) == 2
    assert not pinned(study.user_attrs), "the export unpinned its members"

    # The next finished trial deletes what the pins held back: the store is bounded again.
    third = run_cli("run", str(tight), *common, "--n-trials", "5", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert sum(_weights_on_disk(study, store).values()) == 1
