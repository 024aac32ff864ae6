"""Held-out evidence from the fitting data itself: cross-fitting, so that no weight or temperature is judged on
the samples it was fitted to.

Fitting the ensemble's weights and its temperature on some outputs and then judging them there rewards a fit to
noise: on a few hundred images, many members and an accuracy near 1, the weights and T that look best there made
test NLL worse, the more so on validation outputs, which also picked each trial's best epoch and ranked the
trials. Cross-fitting asks the question honestly without
retraining anything: the fitting outputs are cut into `PARTS` stratified parts; for each part, the weights and
T are fitted on the other parts and the combination is scored on that part; every sample is thus predicted by
a fit that never saw it. The pooled out-of-part predictions give each combination a held-out accuracy and NLL,
with T = 1 and with its fitted T, and those decide:

- whether a temperature ships at all: only when the held-out NLL with T is below the held-out NLL at T = 1 by
  more than the noise of the per-sample differences (GAIN_Z standard errors); otherwise T = 1: a temperature
  that does not clearly help samples it never saw is a fit to noise;
- which combination ships when the user leaves the choice to hpsearch (`--method auto`): the lowest held-out
  NLL among the best single trial, uniform and weighted soft voting.

What is shipped is then fitted on all the fitting outputs (more data than any part's fit). The fitting outputs
are the calibration split's (hpsearch.data), which no selection touched; on validation or out-of-fold outputs the
held-out parts also picked the trials' epochs and ranking, a selection cross-fitting cannot remove.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from hpsearch.ensemble._combine import accuracy, degenerate, fit_temperature, mixture_log_probs, nll, scale

PARTS = 5
PARTS_SEED = 0  # the same parts for every row and every run: rows are compared on the same held-out samples
# A temperature ships when its held-out NLL gain is above this many standard errors of the per-sample gains
# (one-sided 5 %): T = 1 is the default, and a gain within the noise of a few hundred samples is no evidence.
GAIN_Z = 1.645

WeightFitter = Callable[[np.ndarray, np.ndarray], np.ndarray]  # ([m, n, c] log-probs, labels) -> weights


@dataclass(frozen=True)
class HeldOut:
    """A combination's cross-fitted evidence: every sample predicted by a fit (weights and T) made without it."""

    accuracy: float
    nll: float  # at T = 1
    nll_scaled: float  # with the T fitted on the other parts
    gain_se: float = 0.0  # the standard error of nll - nll_scaled (from the per-sample differences)

    @property
    def temperature_helps(self) -> bool:
        return self.nll - self.nll_scaled > GAIN_Z * self.gain_se

    def shipped_nll(self, temperature_ships: bool) -> float:
        return self.nll_scaled if temperature_ships else self.nll


def parts(labels: np.ndarray, n_parts: int = PARTS) -> list[np.ndarray]:
    """Indices of each held-out part: stratified by class where every class has n_parts samples, else plain."""
    n = len(labels)
    k = min(n_parts, n)
    counts = np.bincount(labels)
    splitter = (StratifiedKFold(k, shuffle=True, random_state=PARTS_SEED) if counts[counts > 0].min() >= k
                else KFold(k, shuffle=True, random_state=PARTS_SEED))
    return [held for _, held in splitter.split(np.zeros(n), labels)]


def cross_fit(log_probs: np.ndarray, labels: np.ndarray, fit_weights: WeightFitter,
              held_parts: list[np.ndarray]) -> HeldOut:
    """The held-out evidence of one way of combining `log_probs` ([m, n, c]): `fit_weights` refitted on each
    part's complement, T too; each part scored with them."""
    raw = np.empty(log_probs.shape[1:])
    scaled = np.empty(log_probs.shape[1:])
    everything = np.arange(log_probs.shape[1])
    for held in held_parts:
        train = np.setdiff1d(everything, held)
        weights = fit_weights(log_probs[:, train], labels[train])
        fitted = mixture_log_probs(log_probs[:, train], weights)
        temperature = fit_temperature(fitted, labels[train])
        if degenerate(temperature, accuracy(fitted.argmax(axis=1), labels[train])):
            temperature = 1.0  # what would ship from this part's fit (hpsearch.ensemble._rows.shipped_temperature)
        mixture = mixture_log_probs(log_probs[:, held], weights)
        raw[held] = mixture
        scaled[held] = scale(mixture, temperature)
    rows = np.arange(len(labels))
    gains = scaled[rows, labels] - raw[rows, labels]  # per sample: NLL at T = 1 minus NLL with T
    se = float(gains.std(ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else 0.0
    return HeldOut(accuracy(raw.argmax(axis=1), labels), nll(raw, labels), nll(scaled, labels), se)


def fixed(weights: np.ndarray) -> WeightFitter:
    """A combination whose weights are not fitted (the best single trial, uniform soft voting, a soup)."""
    return lambda _log_probs, _labels: weights
