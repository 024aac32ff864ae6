"""The ensemble stage: weights on the simplex, the four ways of combining on hand-worked numbers, ECE,
temperature scaling, greedy selection, candidate filtering on a real study, and the `ensemble` command.

No training: outputs are built by hand as tensors; probabilities p are given as logits log(p), so each
member's softmax returns exactly the p written here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from hpsearch.cli._main import main
from hpsearch.config import read_study_file
from hpsearch.ensemble._candidates import Candidate, select_candidates
from hpsearch.ensemble._combine import (
    ece_from,
    expected_calibration_error,
    fit_nll_weights,
    fit_temperature,
    greedy_selection,
    hard_vote,
    member_log_probs,
    mixture_log_probs,
    nll,
    scale,
    true_class_log_probs,
)
from hpsearch.ensemble._fit import build_ensemble
from hpsearch.errors import EnsembleError
from hpsearch.export import RESULT_FILE, staged_dir
from hpsearch.export._comparison import report_markdown, table_cells
from hpsearch.keys import OUTPUTS as ATTR_OUTPUTS
from hpsearch.keys import WEIGHTS as ATTR_WEIGHTS
from hpsearch.store import StudyArtifacts, TrialOutputs, open_artifact_store, open_storage, upload_trial_artifacts

SHA = "a" * 64

# --------------------------------------------------------------------------------------- the hand case
# 3 members (A, B, C), 4 samples, 3 classes, labels y = [0, 1, 2, 0]; rows are probabilities.
HAND_Y = np.array([0, 1, 2, 0])
HAND_P = np.array([
    # s0               s1               s2               s3
    [[.6, .3, .1], [.2, .7, .1], [.5, .2, .3], [.1, .8, .1]],  # A: argmax 0 1 0 1 -> right on s0, s1
    [[.3, .6, .1], [.1, .8, .1], [.1, .2, .7], [.6, .3, .1]],  # B: argmax 1 1 2 0 -> right on s1, s2, s3
    [[.1, .3, .6], [.6, .3, .1], [.2, .1, .7], [.1, .2, .7]],  # C: argmax 2 0 2 2 -> right on s2
])


def hand_log_probs() -> np.ndarray:
    return member_log_probs(list(np.log(HAND_P)))


def test_hard_vote_by_hand() -> None:
    # s0: votes A->0, B->1, C->2, a three-way tie; summed probabilities 0: .6+.3+.1 = 1.0,
    #     1: .3+.6+.3 = 1.2, 2: .1+.1+.6 = .8 -> class 1 (wrong; y = 0).
    # s1: A->1, B->1, C->0 -> class 1 by majority (right).
    # s2: A->0, B->2, C->2 -> class 2 by majority (right).
    # s3: A->1, B->0, C->2, a tie; sums 0: .1+.6+.1 = .8, 1: .8+.3+.2 = 1.3, 2: .1+.1+.7 = .9 -> 1 (wrong).
    predictions, share, ties = hard_vote(hand_log_probs())
    assert predictions.tolist() == [1, 1, 2, 1]
    assert float((predictions == HAND_Y).mean()) == 0.5  # right on s1, s2
    assert share == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1 / 3])  # the winner's vote share
    assert ties == 2


def test_hard_vote_tie_in_votes_and_sums_goes_to_lowest_class() -> None:
    # Two members that are exact mirror images: one vote each, equal summed probabilities (.7+.3 = 1.0 for
    # both classes) -> the lowest class, 0.
    probs = np.log(np.array([[[.7, .3]], [[.3, .7]]]))
    predictions, _, ties = hard_vote(member_log_probs(list(probs)))
    assert predictions.tolist() == [0]
    assert ties == 1


def test_uniform_soft_vote_by_hand() -> None:
    # Average of A, B, C per sample:
    # s0: [1.0, 1.2, .8]/3 -> argmax 1 (wrong), p(y=0) = 1/3
    # s1: [.9, 1.8, .3]/3  -> 1 (right),  p(y=1) = .6
    # s2: [.8, .5, 1.7]/3  -> 2 (right),  p(y=2) = 1.7/3
    # s3: [.8, 1.3, .9]/3  -> 1 (wrong),  p(y=0) = .8/3
    # accuracy 2/4 = .5; NLL = -(ln(1/3) + ln .6 + ln(1.7/3) + ln(.8/3)) / 4
    #   = (1.098612 + 0.510826 + 0.567984 + 1.321756) / 4 = 0.874795
    mix = mixture_log_probs(hand_log_probs(), np.full(3, 1 / 3))
    assert np.exp(mix) == pytest.approx(np.array([[1.0, 1.2, .8], [.9, 1.8, .3], [.8, .5, 1.7], [.8, 1.3, .9]]) / 3)
    assert mix.argmax(axis=1).tolist() == [1, 1, 2, 1]
    assert nll(mix, HAND_Y) == pytest.approx(0.874795, abs=1e-6)
    assert nll(mix, HAND_Y) == pytest.approx(-(math.log(1 / 3) + math.log(.6) + math.log(1.7 / 3)
                                               + math.log(.8 / 3)) / 4)


def test_weighted_soft_vote_by_hand() -> None:
    # Weights (A, B, C) = (.25, .75, 0):
    # s0: .25*[.6,.3,.1] + .75*[.3,.6,.1] = [.375, .525, .1] -> 1 (wrong), p(y=0) = .375
    # s1: .25*[.2,.7,.1] + .75*[.1,.8,.1] = [.125, .775, .1] -> 1 (right), p = .775
    # s2: .25*[.5,.2,.3] + .75*[.1,.2,.7] = [.2, .2, .6]     -> 2 (right), p = .6
    # s3: .25*[.1,.8,.1] + .75*[.6,.3,.1] = [.475, .425, .1] -> 0 (right), p = .475
    # accuracy 3/4; NLL = (0.980829 + 0.254892 + 0.510826 + 0.744440) / 4 = 0.622747
    mix = mixture_log_probs(hand_log_probs(), np.array([.25, .75, 0.0]))
    assert np.exp(mix) == pytest.approx(np.array([[.375, .525, .1], [.125, .775, .1], [.2, .2, .6],
                                                  [.475, .425, .1]]))
    assert float((mix.argmax(axis=1) == HAND_Y).mean()) == 0.75
    assert nll(mix, HAND_Y) == pytest.approx(0.622747, abs=1e-6)


def hand_candidates() -> list[Candidate]:
    """A, B, C as trials 7, 8, 9 (A ranked first), validation = test = the hand case."""
    y = torch.tensor(HAND_Y)
    out = []
    for i, p in enumerate(HAND_P):
        z = torch.tensor(np.log(p), dtype=torch.float32)
        out.append(Candidate(7 + i, {"lr": 0.01 * (i + 1)}, 0.9 - 0.1 * i, f"w{i}",
                             TrialOutputs(z, z.clone(), SHA, y, y.clone())))
    return out


def test_build_ensemble_rows_match_the_hand_case() -> None:
    result = build_ensemble(hand_candidates(), arch="resnet18")
    single, hard, soft, weighted = (result.row(k) for k in ("single", "hard", "soft", "weighted"))
    # Best single = A (ranked first): right on s0, s1 -> .5; NLL = -(ln .6 + ln .7 + ln .3 + ln .1)/4
    assert single.trials == (7,) and single.accuracy == 0.5
    assert single.nll == pytest.approx(-(math.log(.6) + math.log(.7) + math.log(.3) + math.log(.1)) / 4, rel=1e-6)
    assert hard.accuracy == 0.5 and hard.nll is None and len(hard.trials) == 3
    # Hard ECE: confidences = vote shares [1/3, 2/3, 2/3, 1/3], correct [0, 1, 1, 0]; with 15 bins 1/3 falls in
    # bin 4 (4/15, 5/15], 2/3 in bin 9 (9/15, 10/15]: ECE = 2/4*|0 - 1/3| + 2/4*|1 - 2/3| = 1/3
    assert hard.ece == pytest.approx(1 / 3)
    assert soft.accuracy == 0.5 and soft.nll == pytest.approx(0.874795, abs=1e-6)
    assert weighted.val_nll <= soft.val_nll + 1e-12
    assert sum(result.weight_fit.weights) == pytest.approx(1.0)
    assert result.method == "weighted"
    assert sum(m.weight for m in result.members) == pytest.approx(1.0)
    assert all(m.arch == "resnet18" and m.weight > 0 for m in result.members)
    names = [cells[0] for cells in table_cells(result)]
    assert names[0].startswith("best single trial (#7)") and names[1] == "hard voting"
    assert names[2] == "uniform soft voting" and names[3].startswith("weighted soft voting [chosen]")


def test_method_soft_and_hard_take_every_candidate_uniformly() -> None:
    for method in ("soft", "hard"):
        result = build_ensemble(hand_candidates(), arch="resnet18", method=method)
        assert [m.trial for m in result.members] == [7, 8, 9]
        assert [m.weight for m in result.members] == pytest.approx([1 / 3] * 3)
        assert (result.temperature is None) == (method == "hard")


def test_fewer_than_two_candidates_is_refused() -> None:
    with pytest.raises(EnsembleError, match="at least 2"):
        build_ensemble(hand_candidates()[:1], arch="resnet18")


# -------------------------------------------------------------------------------------------------- ECE


def test_ece_by_hand() -> None:
    # 15 bins of width 1/15: 0.9 and 0.91 in bin 13 (13/15, 14/15] = (.8667, .9333]; 0.95 in bin 14; 0.5 in
    # bin 7 (.4667, .5333].
    # bin 13: 2 samples, accuracy 1/2, mean confidence .905 -> 2/4 * .405 = .2025
    # bin 14: 1 sample, right, confidence .95 -> 1/4 * .05 = .0125
    # bin  7: 1 sample, right, confidence .5  -> 1/4 * .5  = .125
    # ECE = .2025 + .0125 + .125 = .34
    assert ece_from(np.array([.9, .91, .95, .5]), np.array([1, 0, 1, 1])) == pytest.approx(.34)
    probs = np.array([[.9, .05, .05], [.91, .05, .04], [.02, .95, .03], [.5, .3, .2]])
    labels = np.array([0, 1, 1, 0])  # right, wrong (predicts 0), right, right
    assert expected_calibration_error(np.log(probs), labels) == pytest.approx(.34)


def test_ece_of_a_calibrated_bin_is_zero() -> None:
    # Ten samples at confidence .8 (bin 11, (11/15, 12/15]), eight right: |.8 - .8| = 0.
    assert ece_from(np.full(10, .8), np.array([1] * 8 + [0] * 2)) == pytest.approx(0.0, abs=1e-12)


# -------------------------------------------------------------------------------------- weights, T, greedy


def random_members(m: int = 4, n: int = 300, c: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[m, n, c] log-probabilities of members of growing noise, and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(m, n, c)) * np.arange(1, m + 1)[:, None, None]
    logits[:, np.arange(n), labels] += 2.0
    return member_log_probs(list(logits)), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fitted_weights_lie_on_the_simplex(seed: int) -> None:
    log_probs, labels = random_members(seed=seed)
    true = true_class_log_probs(log_probs, labels)
    for fit in (greedy_selection(true)[0], fit_nll_weights(true)):
        w = np.array(fit.weights)
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_is_no_worse_than_uniform_on_validation_nll(seed: int) -> None:
    log_probs, labels = random_members(seed=seed)
    true = true_class_log_probs(log_probs, labels)
    uniform = nll(mixture_log_probs(log_probs, np.full(4, .25)), labels)
    fit = fit_nll_weights(true)
    assert fit.val_nll <= uniform + 1e-9
    assert fit.val_nll == pytest.approx(nll(mixture_log_probs(log_probs, np.array(fit.weights)), labels))


def test_weighted_row_no_worse_than_uniform_through_build_ensemble() -> None:
    log_probs, labels = random_members(seed=3)
    y = torch.tensor(labels)
    candidates = [Candidate(i, {}, 0.9, "", TrialOutputs(torch.tensor(lp), torch.tensor(lp), SHA, y, y))
                  for i, lp in enumerate(log_probs)]
    result = build_ensemble(candidates, arch="resnet18")
    assert result.row("weighted").val_nll <= result.row("soft").val_nll + 1e-9
    assert result.weight_fit.name in ("greedy", "slsqp")


def test_greedy_selection_picks_the_better_member_first() -> None:
    # Member 0 is noisy, member 1 is good; index order would favour 0 on a tie, so a pick of 1 is on merit.
    log_probs, labels = random_members(m=2, seed=4)
    log_probs = log_probs[::-1].copy()  # noise 2x first, 1x second
    true = true_class_log_probs(log_probs, labels)
    assert nll(log_probs[1], labels) < nll(log_probs[0], labels)
    fit, picks = greedy_selection(true, rounds=10)
    assert picks[0] == 1
    assert fit.weights[1] > fit.weights[0]
    assert len(picks) == 10


def test_greedy_keeps_the_best_prefix() -> None:
    # A near-perfect member and a useless one: every round picks member 0; the best prefix is all of it.
    labels = np.array([0, 1, 0, 1])
    good = np.log(np.array([[.99, .01], [.01, .99], [.99, .01], [.01, .99]]))
    bad = np.log(np.full((4, 2), .5))
    fit, picks = greedy_selection(true_class_log_probs(np.stack([bad, good]), labels), rounds=5)
    assert picks == [1] * 5 and fit.weights == (0.0, 1.0)
    assert fit.val_nll == pytest.approx(-math.log(.99))


def test_temperature_scaling_lowers_nll_of_an_overconfident_model() -> None:
    rng = np.random.default_rng(5)
    n, c = 400, 4
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += 1.0
    overconfident = member_log_probs([logits * 8.0])[0]
    t = fit_temperature(overconfident, labels)
    assert t > 1.5
    assert nll(scale(overconfident, t), labels) < nll(overconfident, labels) - 0.1
    assert (scale(overconfident, t).argmax(axis=1) == overconfident.argmax(axis=1)).all()


def test_collapse_to_one_member_is_said_plainly() -> None:
    # Trial 1 is confidently right, trial 2 confidently wrong everywhere: all weight goes to trial 1.
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    right = torch.nn.functional.one_hot(labels, 3).float() * 6.0
    wrong = torch.nn.functional.one_hot((labels + 1) % 3, 3).float() * 6.0
    candidates = [Candidate(1, {}, .9, "a", TrialOutputs(right, right, SHA, labels, labels)),
                  Candidate(2, {}, .1, "b", TrialOutputs(wrong, wrong, SHA, labels, labels))]
    result = build_ensemble(candidates, arch="resnet18")
    assert result.collapsed and [m.trial for m in result.members] == [1]
    assert "collapsed to 1 member" in table_cells(result)[3][0]
    assert any("collapsed to a single member (trial 1)" in n for n in result.notes)
    assert "collapsed to a single member (trial 1)" in report_markdown(result, "s", candidates, [])


def test_temperature_that_runs_to_a_bound_is_flagged_and_not_exported() -> None:
    # Every validation sample right: NLL keeps falling as T -> 0, so T hits the lower bound.
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    a = torch.nn.functional.one_hot(labels, 3).float() * 1.5
    b = torch.nn.functional.one_hot(labels, 3).float() * 1.0
    candidates = [Candidate(1, {}, 1.0, "a", TrialOutputs(a, a, SHA, labels, labels)),
                  Candidate(2, {}, 1.0, "b", TrialOutputs(b, b, SHA, labels, labels))]
    result = build_ensemble(candidates, arch="resnet18", method="soft")
    assert result.row("soft").temperature_at_bound
    assert result.temperature == 1.0
    assert any("search bound" in n for n in result.notes)


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


# --------------------------------------------------------------------------------------------- folder


def test_staged_dir_replaces_an_old_ensemble_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "ens"
    with staged_dir(target) as folder:
        (folder / RESULT_FILE).write_text("1")
    with staged_dir(target) as folder:
        (folder / RESULT_FILE).write_text("2")
    assert (target / RESULT_FILE).read_text() == "2"
    with pytest.raises(RuntimeError), staged_dir(target) as folder:
        (folder / RESULT_FILE).write_text("3")
        raise RuntimeError("boom")
    assert (target / RESULT_FILE).read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]


def test_staged_dir_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(EnsembleError, match="not an ensemble folder"), staged_dir(tmp_path / "mine"):
        pass
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


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
                           "--artifacts", str(store), "--out", str(out), "--no-export"], capture_output=True, text=True,
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
