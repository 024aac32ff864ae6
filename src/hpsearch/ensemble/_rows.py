"""One line of the comparison (`Row`): a way of combining the members, its cross-fitted evidence on the fitting
outputs (hpsearch.ensemble._crossfit), and its test numbers before and after the temperature it would ship.

The temperature a row ships is the one fitted on all the fitting outputs, and only when the cross-fitted
held-out NLL says a temperature helps (and it did not run to a bound); otherwise T = 1. The "after T" test
numbers are at that shipped T, so the table shows what an export of that row would give. The ensemble
(hpsearch.ensemble._fit) and the greedy soup (hpsearch.ensemble._soup) both build their rows here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from hpsearch.ensemble._combine import (
    Outputs,
    accuracy,
    degenerate,
    ece_from,
    expected_calibration_error,
    fit_temperature,
    hard_vote,
    mixture_log_probs,
    nll,
    scale,
)
from hpsearch.ensemble._crossfit import HeldOut, WeightFitter, cross_fit, fixed, parts

RowKey = Literal["single", "hard", "soft", "weighted", "soup"]


@dataclass(frozen=True)
class Row:
    """One line of the comparison; metrics on the held-out test split, evidence cross-fitted on the fitting data."""

    key: RowKey
    name: str
    trials: tuple[int, ...]  # members with non-zero weight
    weights: tuple[float, ...]  # their weights
    fit_nll: float | None  # on all the fitting outputs, fitted there (the optimistic figure)
    accuracy: float
    nll: float | None  # None for hard voting (votes are not probabilities)
    ece: float
    temperature: float | None  # the T this row ships: fitted, or 1.0 when held out it did not help; None for hard
    nll_scaled: float | None  # on test, at the shipped temperature
    ece_scaled: float | None
    fit_accuracy: float  # of this combination on the fitting outputs
    temperature_at_bound: bool = False  # the fitted T is degenerate (a bound, or sharpening a perfect fit): kept 1
    fitted_temperature: float | None = None  # T fitted on all the fitting outputs, shipped or not
    heldout: HeldOut | None = None  # cross-fitted evidence; for hard voting, accuracy only (nll = nll_scaled = nan)

    @property
    def temperature_ships(self) -> bool:
        return self.temperature is not None and self.temperature != 1.0

    @property
    def shipped_heldout_nll(self) -> float | None:
        """The held-out NLL of what this row ships (with its T when it ships one)."""
        if self.heldout is None or self.nll is None:
            return None
        return self.heldout.shipped_nll(self.temperature_ships)


# A temperature is fitted by the few samples the combination gets wrong or nearly wrong: with fewer mistakes than
# this in the fitting outputs, its NLL optimum is noise (on digits' 359 validation images, 3 to 7 mistakes gave
# T from 0.275 to above 1 and test NLL changes of -29 % to +47 % over three seeds), and T = 1 ships.
MIN_MISTAKES = 10


def shipped_temperature(fitted: float, heldout: HeldOut, fit_accuracy: float, n: int) -> float:
    """The T to ship: the fitted one when it clearly helped the samples its fits never saw, the fitting outputs
    hold enough mistakes to fit it, and it is no degenerate fit; else 1."""
    mistakes = round((1.0 - fit_accuracy) * n)
    trusted = heldout.temperature_helps and mistakes >= MIN_MISTAKES and not degenerate(fitted, fit_accuracy)
    return fitted if trusted and fitted != 1.0 else 1.0


def soft_row(key: RowKey, name: str, data: Outputs, weights: np.ndarray, trials: Sequence[int],
             fit_weights: WeightFitter | None = None) -> Row:
    """The weighted average of the members' probabilities, measured. `fit_weights` refits `weights` on each
    cross-fitting part's complement (None: the weights are fixed, only T is refitted)."""
    fit = mixture_log_probs(data.fit, weights)
    test = mixture_log_probs(data.test, weights)
    fitted = fit_temperature(fit, data.y_fit)
    heldout = cross_fit(data.fit, data.y_fit, fit_weights or fixed(weights), parts(data.y_fit))
    fit_accuracy = accuracy(fit.argmax(axis=1), data.y_fit)
    temperature = shipped_temperature(fitted, heldout, fit_accuracy, len(data.y_fit))
    scaled = scale(test, temperature)
    nonzero = [i for i, w in enumerate(weights) if w > 0]
    return Row(key, name, tuple(trials[i] for i in nonzero), tuple(float(weights[i]) for i in nonzero),
               nll(fit, data.y_fit), accuracy(test.argmax(axis=1), data.y_test), nll(test, data.y_test),
               expected_calibration_error(test, data.y_test), temperature, nll(scaled, data.y_test),
               expected_calibration_error(scaled, data.y_test), fit_accuracy, degenerate(fitted, fit_accuracy), fitted,
               heldout)


def hard_row(data: Outputs, trials: Sequence[int]) -> tuple[Row, int]:
    """Majority voting, measured; with the number of test samples whose vote was a tie. Nothing is fitted, so
    its held-out accuracy is its accuracy on the fitting outputs."""
    predictions, share, ties = hard_vote(data.test)
    correct = predictions == data.y_test
    m = len(trials)
    fit_predictions, _, _ = hard_vote(data.fit)
    fit_accuracy = accuracy(fit_predictions, data.y_fit)
    row = Row("hard", "hard voting", tuple(trials), (1.0 / m,) * m, None, accuracy(predictions, data.y_test),
              None, ece_from(share, correct), None, None, None, fit_accuracy,
              heldout=HeldOut(fit_accuracy, float("nan"), float("nan")))
    return row, ties


def usable_temperature(row: Row) -> float:
    """The T to ship with a row: 1 where none was fitted or shipping it is not backed by held-out evidence."""
    return 1.0 if row.temperature is None else row.temperature
