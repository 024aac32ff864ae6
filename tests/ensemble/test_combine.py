"""Combining members: the four ways (best single, hard vote, uniform and weighted soft vote) on hand-worked numbers,
ECE, weights on the simplex, temperature scaling and greedy selection, and `build_ensemble` putting them together.

No training and no study: outputs are built by hand as tensors; probabilities p are given as logits log(p), so
each member's softmax returns exactly the p written here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpsearch.ensemble._candidates import Candidate
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
from hpsearch.export._comparison import report_markdown, table_cells
from hpsearch.store import TrialOutputs

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
    result = build_ensemble(hand_candidates(), arch="resnet18", method="weighted")
    single, hard, soft, weighted = (result.row(k) for k in ("single", "hard", "soft", "weighted"))
    # Best single = A (ranked first): right on s0, s1 -> .5; NLL = -(ln .6 + ln .7 + ln .3 + ln .1)/4
    assert single.trials == (7,) and single.accuracy == 0.5
    assert single.nll == pytest.approx(-(math.log(.6) + math.log(.7) + math.log(.3) + math.log(.1)) / 4, rel=1e-6)
    assert hard.accuracy == 0.5 and hard.nll is None and len(hard.trials) == 3
    # Hard ECE: confidences = vote shares [1/3, 2/3, 2/3, 1/3], correct [0, 1, 1, 0]; with 15 bins 1/3 falls in
    # bin 4 (4/15, 5/15], 2/3 in bin 9 (9/15, 10/15]: ECE = 2/4*|0 - 1/3| + 2/4*|1 - 2/3| = 1/3
    assert hard.ece == pytest.approx(1 / 3)
    assert soft.accuracy == 0.5 and soft.nll == pytest.approx(0.874795, abs=1e-6)
    assert weighted.fit_nll <= soft.fit_nll + 1e-12
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
    assert fit.fit_nll <= uniform + 1e-9
    assert fit.fit_nll == pytest.approx(nll(mixture_log_probs(log_probs, np.array(fit.weights)), labels))


def test_weighted_row_no_worse_than_uniform_through_build_ensemble() -> None:
    log_probs, labels = random_members(seed=3)
    y = torch.tensor(labels)
    candidates = [Candidate(i, {}, 0.9, "", TrialOutputs(torch.tensor(lp), torch.tensor(lp), SHA, y, y))
                  for i, lp in enumerate(log_probs)]
    result = build_ensemble(candidates, arch="resnet18")
    assert result.row("weighted").fit_nll <= result.row("soft").fit_nll + 1e-9
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
    assert fit.fit_nll == pytest.approx(-math.log(.99))


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
