"""The math of combining members' outputs: pure numpy/scipy, no Optuna, no files, no models.

Conventions: soft voting averages probabilities (softmax of each member's logits), not logits; NLL is the
mean natural-log negative log-likelihood; argmax ties go to the lowest class index. Hard voting takes each
member's argmax; a tie between classes with the most votes goes to the class with the highest summed
probability over all members, then to the lowest class index. Hard voting yields votes, not probabilities,
so it has no NLL or temperature; its ECE uses the winning class's vote share as the confidence.

Member weights are fitted on the fitting outputs only (calibration, out-of-fold or validation: `Outputs.fit`), two
ways (`greedy_selection`, Caruana et al. 2004, and `fit_nll_weights`, direct minimisation of their NLL over the
simplex); temperature scaling is fitted on the same outputs too. What judges those fits is cross-fitting
(hpsearch.ensemble._crossfit); a comparison line is a `Row` (hpsearch.ensemble._rows).
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
    fit_nll: float  # on the outputs it was fitted to


@dataclass(frozen=True)
class Outputs:
    """Members' outputs stacked for combining: log-probabilities on the fitting data (the calibration split, or
    validation, or out-of-fold: hpsearch.ensemble._candidates.stack_outputs says which) and on test, and labels."""

    fit: np.ndarray  # [m, n_fit, c] log-probabilities
    test: np.ndarray  # [m, n_test, c]
    y_fit: np.ndarray
    y_test: np.ndarray


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


def calibration_bins(confidence: np.ndarray, correct: np.ndarray,
                     n_bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin (i/B, (i+1)/B]: count, accuracy and mean confidence (NaN when empty). The
    one binning of this project: the ECE of the comparison table and the report's reliability diagram."""
    confidence = np.asarray(confidence, dtype=np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        hits = np.bincount(bins, weights=np.asarray(correct, dtype=np.float64), minlength=n_bins) / counts
        mean = np.bincount(bins, weights=confidence, minlength=n_bins) / counts
    return counts, hits, mean


def ece_from(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: bins (i/B, (i+1)/B] of confidence, sum_b |B_b|/n * |acc_b - conf_b|."""
    counts, hits, mean = calibration_bins(confidence, correct, n_bins)
    filled = counts > 0
    return float((counts[filled] * np.abs(hits[filled] - mean[filled])).sum() / counts.sum())


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
    """Caruana et al. (2004): forward selection with replacement by NLL on the fitting outputs, best prefix kept.

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
    """Weights on the simplex minimising the NLL of the weighted average on the fitting outputs (SLSQP, exact gradient).

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
    """The T > 0 minimising the NLL of softmax(log p / T) on these (fitting) outputs; 1-D, bounded on log T."""
    result = minimize_scalar(lambda t: nll(scale(log_probs, math.exp(t)), labels),
                             bounds=(math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])), method="bounded",
                             options={"xatol": 1e-5})
    best = math.exp(float(result.x))
    # The bounded search never evaluates T = 1 exactly; never report a "calibration" that makes these outputs worse.
    return best if nll(scale(log_probs, best), labels) < nll(log_probs, labels) else 1.0


def at_bound(temperature: float) -> bool:
    """Whether a fitted T ran to the search's edge: then NLL has no finite minimiser on the outputs (for T -> 0:
    every sample is classified correctly, so sharper is always better there) and T overfits it."""
    return temperature <= T_BOUNDS[0] * 1.01 or temperature >= T_BOUNDS[1] * 0.99


def degenerate(fitted: float, fit_accuracy: float) -> bool:
    """Whether a fitted T has no finite optimum behind it: it ran to a search bound, or it sharpens (T < 1)
    outputs that classify every fitting sample right, where NLL falls as T -> 0 and the search stops wherever its
    tolerance does. Cross-fitting cannot catch the second case: every held-out part is error-free too."""
    return at_bound(fitted) or (fitted < 1.0 and fit_accuracy == 1.0)


def choose_weights(fits: Sequence[WeightFit], uniform_nll: float, m: int) -> WeightFit:
    """The fit with the lowest validation NLL (ties: the first, greedy); uniform if none beats uniform."""
    best = min(fits, key=lambda f: f.fit_nll)
    if best.fit_nll > uniform_nll:
        return WeightFit("uniform", (1.0 / m,) * m, uniform_nll)
    return best
