"""The ensemble stage: candidate filtering on a real study, and the `ensemble` command (the combining itself is in
tests/ensemble/test_combine.py, the export folder in tests/export/test_export.py).

No training: the trials' outputs are random logits leaning to the true class, written to a real artifact store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from hpsearch.cli._main import main
from hpsearch.config import read_study_file
from hpsearch.ensemble._candidates import select_candidates
from hpsearch.keys import OUTPUTS as ATTR_OUTPUTS
from hpsearch.keys import WEIGHTS as ATTR_WEIGHTS
from hpsearch.store import StudyArtifacts, TrialOutputs, open_artifact_store, open_storage, upload_trial_artifacts

SHA = "a" * 64


# ------------------------------------------------------------------------------- a real study on disk


def outputs_for(seed: int, sha: str = SHA, n: int = 30, c: int = 3) -> TrialOutputs:
    gen = torch.Generator().manual_seed(seed)
    val_labels = torch.arange(n) % c
    test_labels = (torch.arange(n) + 1) % c

    def logits(labels: torch.Tensor) -> torch.Tensor:
        z = torch.randn(n, c, generator=gen)
        z[torch.arange(n), labels] += 1.5
        return z

    return TrialOutputs(logits(val_labels), logits(test_labels), sha, val_labels, test_labels)


def make_study(tmp_path: Path, specs: Sequence[tuple[str, float]], name: str = "tiny",
               config: dict | None = None) -> tuple[str, Path]:
    """A real SQLite study with real trials; specs: (kind, value), kind in good | missing (outputs file) |
    noweights (weights file) | othersplit | pruned.

    Returns (storage url, artifact store folder).
    """
    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"
    store_dir = tmp_path / "artifacts"
    storage = open_storage(url)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    files = StudyArtifacts(open_artifact_store(store_dir), storage, name, str(store_dir))
    study.set_user_attr("split_sha256", SHA)
    study.set_user_attr("classes", ["a", "b", "c"])
    study.set_user_attr("config", config or {"model": {"arch": "resnet18"}})
    study.set_user_attr("artifacts_dir", str(store_dir))
    for i, (kind, value) in enumerate(specs):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        if kind == "pruned":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        sha = "b" * 64 if kind == "othersplit" else SHA
        ids = upload_trial_artifacts(files, trial, {"w": torch.zeros(2)}, outputs_for(i, sha), {"arch": "resnet18"})
        if kind == "missing":
            (store_dir / ids[ATTR_OUTPUTS]).unlink()
        if kind == "noweights":
            (store_dir / ids[ATTR_WEIGHTS]).unlink()
        study.tell(trial, value)
    return url, store_dir


def test_candidates_skip_a_missing_artifact_and_another_split(tmp_path: Path) -> None:
    import optuna

    specs = [("good", .90), ("missing", .95), ("othersplit", .93), ("good", .80), ("good", .85), ("pruned", 0),
             ("noweights", .91)]
    url, store_dir = make_study(tmp_path, specs)
    study = optuna.load_study(study_name="tiny", storage=open_storage(url))
    selection = select_candidates(study, open_artifact_store(store_dir), top_k=2)
    assert [c.trial for c in selection.candidates] == [0, 4]  # .90, then .85; #1, #2, #6 skipped, #3 not needed
    missing, other, noweights = selection.skipped
    assert missing.startswith("trial 1 skipped") and "outputs artifact" in missing and "cannot be read" in missing
    assert other.startswith("trial 2 skipped") and "split" in other
    assert noweights.startswith("trial 6 skipped") and "weights artifact" in noweights
    assert [c.trial for c in select_candidates(study, open_artifact_store(store_dir), top_k=5).candidates] == \
        [0, 4, 3]


def test_candidates_tie_on_value_goes_to_the_lower_trial_number(tmp_path: Path) -> None:
    import optuna

    url, store_dir = make_study(tmp_path, [("good", .9), ("good", .9), ("good", .9)])
    study = optuna.load_study(study_name="tiny", storage=open_storage(url))
    assert [c.trial for c in select_candidates(study, open_artifact_store(store_dir), 3).candidates] == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ CLI


def cli_study(tmp_path: Path, study_file: Callable[..., Path], specs: Sequence[tuple[str, float]]
              ) -> tuple[Path, str, Path]:
    path = study_file("tiny")
    config = read_study_file(path).model_dump(mode="json")
    url, store_dir = make_study(tmp_path, specs, config=config)
    return path, url, store_dir


def test_cli_fewer_than_two_usable_trials_exits_2(tmp_path: Path, study_file: Callable[..., Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path, url, store = cli_study(tmp_path, study_file, [("good", .9), ("othersplit", .95), ("pruned", 0)])
    rc = main(["ensemble", str(path), "--storage", url, "--artifacts", str(store), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "trial 1 skipped" in err and "1 usable trial" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()


def test_cli_missing_study_exits_2(tmp_path: Path, study_file: Callable[..., Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = study_file("tiny")
    rc = main(["ensemble", str(path), "--storage", f"sqlite:///{tmp_path / 'empty.db'}"])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_top_k_one_exits_2(tmp_path: Path, study_file: Callable[..., Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    path, url, store = cli_study(tmp_path, study_file, [("good", .9), ("good", .8)])
    assert main(["ensemble", str(path), "--storage", url, "--artifacts", str(store), "--top-k", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_ensemble_writes_report_with_the_four_rows(tmp_path: Path, study_file: Callable[..., Path]) -> None:
    specs = [("good", .9), ("missing", .95), ("good", .85), ("good", .8), ("pruned", 0)]
    path, url, store = cli_study(tmp_path, study_file, specs)
    out = tmp_path / "best-ensemble"
    proc = subprocess.run([sys.executable, "-m", "hpsearch", "ensemble", str(path), "--storage", url,
                           "--artifacts", str(store), "--out", str(out), "--no-export", "--method", "weighted"],
                          capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "trial 1 skipped" in proc.stderr
    report = (out / "report.md").read_text()
    starts = ("| best single", "| hard voting", "| uniform soft", "| weighted soft")
    rows = [line for line in report.splitlines() if line.startswith(starts)]
    assert [r.split(" | ")[0] for r in rows] == ["| best single trial (#0)", "| hard voting",
                                                  "| uniform soft voting", "| weighted soft voting [chosen]"]
    payload = json.loads((out / "ensemble.json").read_text())
    assert payload["method"] == "weighted" and payload["split_sha256"] == SHA
    assert sum(m["weight"] for m in payload["members"]) == pytest.approx(1.0)
    assert {m["trial"] for m in payload["members"]} <= {0, 2, 3}
    assert [r["method"] for r in payload["metrics"]] == ["single", "hard", "soft", "weighted"]
    for name in ("best single trial", "hard voting", "uniform soft voting", "weighted soft voting"):
        assert name in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
def test_cli_ensemble_json_and_its_table_into_a_pipe(tmp_path: Path, study_file: Callable[..., Path]) -> None:
    """`--json` is one object a script parses (the keys the README lists); without it, into a pipe (no terminal,
    no COLUMNS), the comparison table is printed whole, not cut at 80 columns."""
    path, url, store = cli_study(tmp_path, study_file, [("good", .9), ("good", .85), ("good", .8)])
    out = tmp_path / "best-ensemble"
    argv = [sys.executable, "-m", "hpsearch", "ensemble", str(path), "--storage", url, "--artifacts", str(store),
            "--out", str(out), "--no-export", "--method", "weighted"]  # auto would pick by held-out evidence
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["study"] == "tiny" and result["method"] == "weighted"
    assert result["folder"] == str(out) and result["result_file"] == str(out / "ensemble.json")
    assert result["manifest"] is None and result["onnx"] is None  # --no-export
    assert sum(m["weight"] for m in result["members"]) == pytest.approx(1.0)
    assert {m["trial"] for m in result["members"]} <= {0, 1, 2}
    rows = {r["method"]: r for r in result["metrics"]}
    assert list(rows) == ["single", "hard", "soft", "weighted"]
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows.values())
    assert result == {**json.loads((out / "ensemble.json").read_text()), **{k: result[k] for k in (
        "folder", "result_file", "report", "manifest", "onnx")}}

    table = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert table.returncode == 0, table.stderr
    assert "…" not in table.stdout, table.stdout
    weighted = next(line for line in table.stdout.splitlines() if "weighted soft voting [chosen]" in line)
    cells = [c.strip() for c in weighted.split("│")[1:-1]]
    # method, members, weights, held-out acc, held-out NLL, acc, NLL, ECE, T, NLL (T), ECE (T): every cell whole
    assert cells[5] == f"{rows['weighted']['test_accuracy']:.4f}", table.stdout
    assert cells[10] == f"{rows['weighted']['test_ece_scaled']:.4f}", table.stdout
