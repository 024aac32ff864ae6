"""The math of combining members' outputs: pure numpy/scipy, no Optuna, no files, no models.

Conventions: soft voting averages probabilities (softmax of each member's logits), not logits; NLL is the
mean natural-log negative log-likelihood; argmax ties go to the lowest class index. Hard voting takes each
member's argmax; a tie between classes with the most votes goes to the class with the highest summed
probability over all members, then to the lowest class index. Hard voting yields votes, not probabilities,
so it has no NLL or temperature; its ECE uses the winning class's vote share as the confidence.

Member weights are fitted on validation outputs only, two ways (`greedy_selection`, Caruana et al. 2004, and
`fit_nll_weights`, direct minimisation of the validation NLL over the simplex); temperature scaling is fitted on
validation too. A `Row` measures one combination: validation numbers, then accuracy, NLL and ECE on test,
before and after its temperature. The ensemble (hpsearch.ensemble) and the greedy soup (hpsearch.soup) both
build their rows here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, logsumexp

ECE_BINS = 15
GREEDY_ROUNDS = 50
# SLSQP weights below this are set to 0 (and the rest renormalised): a member worth 0.1% is not worth shipping.
MIN_WEIGHT = 1e-3
# Temperature scaling searches T in [1/20, 20] (on a log scale).
T_BOUNDS = (0.05, 20.0)
HARD_TIE_RULE = "ties between the most-voted classes go to the highest summed probability, then the lowest class"


@dataclass(frozen=True)
class WeightFit:
    name: Literal["greedy", "slsqp", "uniform"]
    weights: tuple[float, ...]  # one per candidate, in candidate order; >= 0, sum 1
    val_nll: float


@dataclass(frozen=True)
class Outputs:
    """Members' outputs stacked for combining: log-probabilities on validation and test, and the labels."""

    val: np.ndarray  # [m, n_val, c] log-probabilities
    test: np.ndarray  # [m, n_test, c]
    y_val: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class Row:
    """One line of the comparison; metrics on the held-out test split."""

    key: Literal["single", "hard", "soft", "weighted", "soup"]
    name: str
    trials: tuple[int, ...]  # members with non-zero weight
    weights: tuple[float, ...]  # their weights
    val_nll: float | None
    accuracy: float
    nll: float | None  # None for hard voting (votes are not probabilities)
    ece: float
    temperature: float | None  # fitted on validation; None for hard voting
    nll_scaled: float | None  # after temperature scaling
    ece_scaled: float | None
    val_accuracy: float  # of this combination on validation
    temperature_at_bound: bool = False  # T reached T_BOUNDS: no finite optimum (validation perfectly separated)


# ----------------------------------------------------------------------------------------- probabilities


def member_log_probs(logits: Sequence[np.ndarray]) -> np.ndarray:
    """[m][n, c] logits -> [m, n, c] float64 log-probabilities."""
    return log_softmax(np.stack([np.asarray(z, dtype=np.float64) for z in logits]), axis=-1)


def fold_average_log_probs(fold_logits: Sequence[np.ndarray]) -> np.ndarray:
    """One cross-validated member from its K fold models' [n, c] logits: log(mean_k softmax(z_k)), [n, c]."""
    log_probs = member_log_probs(fold_logits)
    return logsumexp(log_probs, axis=0) - math.log(len(log_probs))


def mixture_log_probs(log_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """log(sum_m w_m p_m) for [m, n, c] log-probabilities, computed in log space (no underflow)."""
    w = np.asarray(weights, dtype=np.float64)
    keep = w > 0
    return logsumexp(log_probs[keep] + np.log(w[keep])[:, None, None], axis=0)


def nll(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of [n, c] log-probabilities."""
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions == labels).mean())


def ece_from(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: bins (i/B, (i+1)/B] of confidence, sum_b |B_b|/n * |acc_b - conf_b|."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        inside = bins == b
        total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return total / len(confidence)


def expected_calibration_error(log_probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of [n, c] log-probabilities: confidence is the top probability, correct is argmax == label."""
    probs = np.exp(log_probs)
    return ece_from(probs.max(axis=1), probs.argmax(axis=1) == labels, n_bins)


def hard_vote(log_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Majority vote of [m, n, c] members -> (predictions, winning vote share, number of tied samples).

    A tie between the most-voted classes goes to the highest summed probability, then the lowest class.
    """
    m, n, c = log_probs.shape
    votes = np.zeros((n, c), dtype=np.int64)
    np.add.at(votes, (np.tile(np.arange(n), m), log_probs.argmax(axis=2).ravel()), 1)
    top = votes.max(axis=1, keepdims=True)
    tied = votes == top
    summed = np.exp(log_probs).sum(axis=0)
    predictions = np.where(tied, summed, -np.inf).argmax(axis=1)
    return predictions, top[:, 0] / m, int((tied.sum(axis=1) > 1).sum())


def true_class_log_probs(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[m, n, c] -> [m, n]: each member's log-probability of the true class (all a mixture's NLL needs)."""
    return log_probs[:, np.arange(len(labels)), labels]


def mixture_nll(true_log_probs: np.ndarray, weights: np.ndarray) -> float:
    """NLL of the weighted average, from [m, n] true-class log-probabilities."""
    w = np.asarray(weights, dtype=np.float64)
    keep = w > 0
    return float(-logsumexp(true_log_probs[keep] + np.log(w[keep])[:, None], axis=0).mean())


def greedy_selection(true_log_probs: np.ndarray, rounds: int = GREEDY_ROUNDS) -> tuple[WeightFit, list[int]]:
    """Caruana et al. (2004): forward selection with replacement by validation NLL, best prefix kept.

    Returns the fit (weights = pick counts of the best prefix / its length) and the full pick order.
    Ties between candidates go to the lower index (the better-ranked trial).
    """
    m = true_log_probs.shape[0]
    counts = np.zeros(m)
    picks: list[int] = []
    best_nll, best_counts = math.inf, counts.copy()
    for _ in range(rounds):
        scores = [mixture_nll(true_log_probs, (counts + np.eye(m)[j]) / (counts.sum() + 1)) for j in range(m)]
        j = int(np.argmin(scores))
        counts[j] += 1
        picks.append(j)
        if scores[j] < best_nll:
            best_nll, best_counts = scores[j], counts.copy()
    weights = best_counts / best_counts.sum()
    return WeightFit("greedy", tuple(float(w) for w in weights), best_nll), picks


def fit_nll_weights(true_log_probs: np.ndarray, min_weight: float = MIN_WEIGHT) -> WeightFit:
    """Weights on the simplex minimising the validation NLL of the weighted average (SLSQP, exact gradient).

    Weights below `min_weight` are set to 0 and the rest renormalised; the NLL reported is after that.
    """
    m = true_log_probs.shape[0]
    shift = true_log_probs.max(axis=0)
    q = np.exp(true_log_probs - shift)  # [m, n], each sample's largest entry is 1

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        mix = np.maximum(w @ q, 1e-300)
        return float(-(np.log(mix) + shift).mean()), -(q / mix).mean(axis=1)

    result = minimize(objective, np.full(m, 1.0 / m), jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(m)}],
                      options={"ftol": 1e-12, "maxiter": 500})
    w = np.clip(result.x, 0.0, None)
    w[w < min_weight] = 0.0
    if w.sum() <= 0:
        w = np.full(m, 1.0 / m)
    w = w / w.sum()
    return WeightFit("slsqp", tuple(float(x) for x in w), mixture_nll(true_log_probs, w))


def scale(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling of a (mixture's) output: softmax(log p / T)."""
    return log_softmax(log_probs / temperature, axis=-1)


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(log p / T) on these (validation) outputs; 1-D, bounded on log T."""
    result = minimize_scalar(lambda t: nll(scale(log_probs, math.exp(t)), labels),
                             bounds=(math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])), method="bounded",
                             options={"xatol": 1e-5})
    best = math.exp(float(result.x))
    # The bounded search never evaluates T = 1 exactly; never report a "calibration" that makes validation worse.
    return best if nll(scale(log_probs, best), labels) < nll(log_probs, labels) else 1.0


def at_bound(temperature: float) -> bool:
    """Whether a fitted T ran to the search's edge: then NLL has no finite minimiser on validation (for T -> 0:
    every validation sample is classified correctly, so sharper is always better there) and T overfits it."""
    return temperature <= T_BOUNDS[0] * 1.01 or temperature >= T_BOUNDS[1] * 0.99


# ------------------------------------------------------------------------------------------------ rows


def soft_row(key: Literal["single", "soft", "weighted", "soup"], name: str, data: Outputs, weights: np.ndarray,
             trials: Sequence[int]) -> Row:
    """The weighted average of the members' probabilities, measured; T fitted on its validation outputs."""
    val = mixture_log_probs(data.val, weights)
    test = mixture_log_probs(data.test, weights)
    temperature = fit_temperature(val, data.y_val)
    scaled = scale(test, temperature)
    nonzero = [i for i, w in enumerate(weights) if w > 0]
    return Row(key, name, tuple(trials[i] for i in nonzero), tuple(float(weights[i]) for i in nonzero),
               nll(val, data.y_val), accuracy(test.argmax(axis=1), data.y_test), nll(test, data.y_test),
               expected_calibration_error(test, data.y_test), temperature, nll(scaled, data.y_test),
               expected_calibration_error(scaled, data.y_test), accuracy(val.argmax(axis=1), data.y_val),
               at_bound(temperature))


def hard_row(data: Outputs, trials: Sequence[int]) -> tuple[Row, int]:
    """Majority voting, measured; with the number of test samples whose vote was a tie."""
    predictions, share, ties = hard_vote(data.test)
    correct = predictions == data.y_test
    m = len(trials)
    val_predictions, _, _ = hard_vote(data.val)
    row = Row("hard", "hard voting", tuple(trials), (1.0 / m,) * m, None, accuracy(predictions, data.y_test),
              None, ece_from(share, correct), None, None, None, accuracy(val_predictions, data.y_val))
    return row, ties


def usable_temperature(row: Row) -> float:
    """The T to ship with a row: its fitted T, or 1 where none was fitted or it ran to a bound (overfit)."""
    return 1.0 if row.temperature is None or row.temperature_at_bound else row.temperature


def choose_weights(fits: Sequence[WeightFit], uniform_nll: float, m: int) -> WeightFit:
    """The fit with the lowest validation NLL (ties: the first, greedy); uniform if none beats uniform."""
    best = min(fits, key=lambda f: f.val_nll)
    if best.val_nll > uniform_nll:
        return WeightFit("uniform", (1.0 / m,) * m, uniform_nll)
    return best
