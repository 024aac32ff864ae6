"""Ensembles of a study's best trials, built from their stored outputs only (no model is re-run).

Candidates are the COMPLETE trials, best validation accuracy first (ties: lower trial number), whose
`outputs.safetensors` loads and carries the study's split sha256; the top k of them are combined. Member
weights are fitted on the validation outputs only, two ways, and the one with the lower validation NLL wins:

- greedy ensemble selection with replacement (Caruana et al., 2004): add, one round at a time, the member
  whose addition gives the lowest validation NLL of the running average; keep the best prefix; a member's
  weight is how often it was picked in that prefix;
- direct minimisation of the validation NLL of the weighted average over the simplex (scipy SLSQP; the NLL
  of a mixture is convex in its weights, so this is the global optimum up to solver tolerance).

The held-out test outputs are used only to compare, in one table: the best single trial, hard voting,
uniform soft voting and weighted soft voting; accuracy, NLL and ECE (15 equal-width confidence bins),
and for the probabilistic rows the same after temperature scaling fitted on validation.

With `--method soup` (hpsearch.soup) the table gains a "greedy soup" row: one model whose weights average
several trials', re-run on the data (weight averaging changes the function), measured like the other rows.

Conventions: soft voting averages probabilities (softmax of each member's logits), not logits; NLL is the
mean natural-log negative log-likelihood; argmax ties go to the lowest class index. Hard voting takes each
member's argmax; a tie between classes with the most votes goes to the class with the highest summed
probability over all members, then to the lowest class index. Hard voting yields votes, not probabilities,
so it has no NLL or temperature; its ECE uses the winning class's vote share as the confidence.

The math takes numpy arrays and imports no Optuna; `select_candidates` is the one function that reads a study.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, logsumexp

from hpsearch.artifacts import ATTR_OUTPUTS, ATTR_WEIGHTS, TrialOutputs, load_trial_outputs

if TYPE_CHECKING:
    import optuna
    from rich.table import Table

    from hpsearch.artifacts import ArtifactStore

Method = Literal["weighted", "soft", "hard", "soup"]
# What build_ensemble combines from stored outputs; "soup" (hpsearch.soup) re-runs an averaged model instead.
METHODS: tuple[Method, ...] = ("weighted", "soft", "hard")
ECE_BINS = 15
GREEDY_ROUNDS = 50
# SLSQP weights below this are set to 0 (and the rest renormalised): a member worth 0.1% is not worth shipping.
MIN_WEIGHT = 1e-3
# Temperature scaling searches T in [1/20, 20] (on a log scale).
T_BOUNDS = (0.05, 20.0)
HARD_TIE_RULE = "ties between the most-voted classes go to the highest summed probability, then the lowest class"
REPORT_FILE = "report.md"
RESULT_FILE = "ensemble.json"


class EnsembleError(ValueError):
    """An ensemble that cannot be built (too few usable candidates, outputs that do not line up)."""


# ----------------------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class Candidate:
    """A usable trial: its rank data and its stored outputs."""

    trial: int
    params: Mapping[str, Any]
    val_accuracy: float
    weights_artifact: str
    outputs: TrialOutputs


@dataclass(frozen=True)
class Selection:
    candidates: tuple[Candidate, ...]  # best validation accuracy first
    skipped: tuple[str, ...]  # one warning per trial passed over, naming it and why


@dataclass(frozen=True)
class Member:
    """One model of the chosen ensemble, everything an exporter needs to rebuild and weigh it."""

    trial: int
    params: Mapping[str, Any]
    arch: str
    weight: float
    weights_artifact: str
    val_accuracy: float


@dataclass(frozen=True)
class WeightFit:
    name: Literal["greedy", "slsqp", "uniform"]
    weights: tuple[float, ...]  # one per candidate, in candidate order; >= 0, sum 1
    val_nll: float


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


@dataclass(frozen=True)
class SoupStep:
    """One greedy-soup step: the soup's validation numbers with `trial` added (in-process re-run)."""

    trial: int
    val_accuracy: float
    val_nll: float
    added: bool


@dataclass(frozen=True)
class SoupInfo:
    """The greedy soup tried by `--method soup` (hpsearch.soup): what went in and whether it was kept."""

    ingredients: tuple[int, ...]  # trials whose weights were averaged, rank order
    steps: tuple[SoupStep, ...]  # the first is the best trial alone: the baseline the soup must beat
    kept: bool
    reason: str  # one line: why it was kept or not


@dataclass(frozen=True)
class EnsembleResult:
    method: Method
    members: tuple[Member, ...]  # of `method`; weights sum to 1
    temperature: float | None  # to apply with `method`: fitted T, 1.0 if it ran to a bound, None for hard voting
    weight_fit: WeightFit  # the fit the weighted row uses
    fits: tuple[WeightFit, ...]  # every fit tried (greedy, slsqp), for the report
    rows: tuple[Row, ...]  # single, hard, soft, weighted
    collapsed: bool  # the weighted ensemble is a single member
    notes: tuple[str, ...]
    split_sha256: str
    sizes: Mapping[str, int]  # val, test
    candidates: tuple[int, ...]  # trial numbers in rank order; WeightFit.weights line up with them
    soup: SoupInfo | None = None  # only with --method soup

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)


# ----------------------------------------------------------------------------------------------- math


def member_log_probs(logits: Sequence[np.ndarray]) -> np.ndarray:
    """[m][n, c] logits -> [m, n, c] float64 log-probabilities."""
    return log_softmax(np.stack([np.asarray(z, dtype=np.float64) for z in logits]), axis=-1)


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


# -------------------------------------------------------------------------------------------- building


@dataclass(frozen=True)
class _Outputs:
    val: np.ndarray  # [m, n_val, c] log-probabilities
    test: np.ndarray  # [m, n_test, c]
    y_val: np.ndarray
    y_test: np.ndarray


def _stack(candidates: Sequence[Candidate]) -> _Outputs:
    if len(candidates) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 usable candidates, got {len(candidates)}")
    first = candidates[0].outputs
    for c in candidates[1:]:
        o = c.outputs
        if o.split_sha256 != first.split_sha256 or o.val_logits.shape != first.val_logits.shape \
                or o.test_logits.shape != first.test_logits.shape or not o.val_labels.equal(first.val_labels) \
                or not o.test_labels.equal(first.test_labels):
            raise EnsembleError(f"trial {c.trial}'s outputs do not line up with trial {candidates[0].trial}'s "
                                "(split, shape or labels differ)")
    return _Outputs(
        val=member_log_probs([c.outputs.val_logits.double().numpy() for c in candidates]),
        test=member_log_probs([c.outputs.test_logits.double().numpy() for c in candidates]),
        y_val=first.val_labels.numpy().astype(np.int64),
        y_test=first.test_labels.numpy().astype(np.int64),
    )


def _soft_row(key: Literal["single", "soft", "weighted", "soup"], name: str, data: _Outputs, weights: np.ndarray,
              trials: Sequence[int]) -> Row:
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


def _hard_row(data: _Outputs, trials: Sequence[int]) -> tuple[Row, int]:
    predictions, share, ties = hard_vote(data.test)
    correct = predictions == data.y_test
    m = len(trials)
    val_predictions, _, _ = hard_vote(data.val)
    row = Row("hard", "hard voting", tuple(trials), (1.0 / m,) * m, None, accuracy(predictions, data.y_test),
              None, ece_from(share, correct), None, None, None, accuracy(val_predictions, data.y_val))
    return row, ties


def choose_weights(fits: Sequence[WeightFit], uniform_nll: float, m: int) -> WeightFit:
    """The fit with the lowest validation NLL (ties: the first, greedy); uniform if none beats uniform."""
    best = min(fits, key=lambda f: f.val_nll)
    if best.val_nll > uniform_nll:
        return WeightFit("uniform", (1.0 / m,) * m, uniform_nll)
    return best


def build_ensemble(candidates: Sequence[Candidate], arch: str, method: Method = "weighted", *,
                   rounds: int = GREEDY_ROUNDS) -> EnsembleResult:
    """Fit weights on validation, compare the four ways of combining on test, and pick `method`'s members.

    `candidates` must be in rank order (best validation accuracy first): the first is the best single trial.
    """
    if method not in METHODS:
        raise EnsembleError(f"method {method!r} is not one of {', '.join(METHODS)}")
    data = _stack(candidates)
    m = len(candidates)
    trials = [c.trial for c in candidates]
    true_val = true_class_log_probs(data.val, data.y_val)
    uniform = np.full(m, 1.0 / m)
    greedy, _ = greedy_selection(true_val, rounds)
    fits = (greedy, fit_nll_weights(true_val))
    chosen = choose_weights(fits, mixture_nll(true_val, uniform), m)

    single = _soft_row("single", f"best single trial (#{trials[0]})", data, np.eye(m)[0], trials)
    hard, ties = _hard_row(data, trials)
    soft = _soft_row("soft", "uniform soft voting", data, uniform, trials)
    weighted = _soft_row("weighted", "weighted soft voting", data, np.asarray(chosen.weights), trials)
    collapsed = len(weighted.trials) == 1

    weights = {"weighted": chosen.weights, "soft": tuple(uniform), "hard": tuple(uniform)}[method]
    members = tuple(Member(c.trial, dict(c.params), arch, w, c.weights_artifact, c.val_accuracy)
                    for c, w in zip(candidates, weights, strict=True) if w > 0)
    temperature = {"weighted": _usable_t(weighted), "soft": _usable_t(soft), "hard": None}[method]
    notes = _notes(fits, chosen, (single, soft, weighted), collapsed, ties, len(data.y_test))
    return EnsembleResult(method, members, temperature, chosen, fits, (single, hard, soft, weighted), collapsed,
                          notes, candidates[0].outputs.split_sha256,
                          {"val": len(data.y_val), "test": len(data.y_test)}, tuple(trials))


def _usable_t(row: Row) -> float:
    return 1.0 if row.temperature is None or row.temperature_at_bound else row.temperature


def _notes(fits: Sequence[WeightFit], chosen: WeightFit, soft_rows: Sequence[Row], collapsed: bool, ties: int,
           n_test: int) -> tuple[str, ...]:
    weighted = soft_rows[-1]
    tried = ", ".join(f"{FIT_NAMES[f.name]} {f.val_nll:.6f}" for f in fits)
    others = [f.val_nll for f in fits if f.name != chosen.name]
    margin = f" (lower by {min(others) - chosen.val_nll:.2g})" if others and chosen.name != "uniform" else ""
    notes = [f"weights: validation NLL {tried}; the weighted row uses {FIT_NAMES[chosen.name]}{margin}"
             + (" (neither fit beat uniform weights)" if chosen.name == "uniform" else "")]
    if collapsed:
        notes.append(f"the weighted ensemble collapsed to a single member (trial {weighted.trials[0]}): weighted "
                     "soft voting is that one model, not an ensemble")
    notes.append(f"hard voting: {HARD_TIE_RULE}; {ties} of {n_test} test samples were ties")
    notes.append(f"ECE: {ECE_BINS} equal-width confidence bins; T: temperature fitted on validation by 1-D "
                 f"minimisation of NLL over T in [{T_BOUNDS[0]}, {T_BOUNDS[1]}] (accuracy unchanged)")
    for row in soft_rows:
        if row.temperature_at_bound:
            why = (f"validation accuracy is {row.val_accuracy:.4f}, so sharper is always better there"
                   if row.val_accuracy == 1.0 else "validation NLL has no minimum inside the bounds")
            notes.append(f"{row.name}: T ran to the search bound ({row.temperature:.3g}): {why}; T overfits "
                         "validation, its 'after T' numbers are no calibration, and T = 1 is kept for export")
    return tuple(notes)


FIT_NAMES = {"greedy": "greedy selection", "slsqp": "direct NLL minimisation (SLSQP)", "uniform": "uniform"}


# ------------------------------------------------------------------------------------------ candidates


def select_candidates(study: optuna.Study, store: ArtifactStore, top_k: int) -> Selection:
    """The top_k usable trials, best validation accuracy first (ties: lower trial number).

    A trial whose weights are missing, or whose outputs are missing, unreadable, from another split or shaped
    unlike the study's classes, is passed over with a warning in `skipped`, and the next one is tried.
    """
    from hpsearch.report import ranked_trials

    expected_sha = study.user_attrs.get("split_sha256")
    if not expected_sha:
        raise EnsembleError(f"study {study.study_name!r} records no split_sha256; it was not created by hpsearch")
    n_classes = len(study.user_attrs.get("classes", [])) or None
    chosen: list[Candidate] = []
    skipped: list[str] = []
    for trial in ranked_trials(study):
        if len(chosen) >= top_k:
            break
        problem, outputs = _load(store, trial)
        if outputs is not None:
            problem = _mismatch(outputs, expected_sha, n_classes, chosen[0].outputs if chosen else None)
        if problem is not None or outputs is None:
            skipped.append(f"trial {trial.number} skipped: {problem}")
            continue
        chosen.append(Candidate(trial.number, dict(trial.params), float(trial.value or 0.0),
                                str(trial.user_attrs.get(ATTR_WEIGHTS, "")), outputs))
    return Selection(tuple(chosen), tuple(skipped))


def _load(store: ArtifactStore, trial: optuna.trial.FrozenTrial) -> tuple[str | None, TrialOutputs | None]:
    for attr in (ATTR_OUTPUTS, ATTR_WEIGHTS):
        if attr not in trial.user_attrs:
            return f"it has no {attr} user attr", None
    try:
        store.open_reader(trial.user_attrs[ATTR_WEIGHTS]).close()  # a member must be exportable
    except Exception as err:
        return f"its weights artifact {trial.user_attrs[ATTR_WEIGHTS]} cannot be opened ({type(err).__name__})", None
    try:
        return None, load_trial_outputs(store, trial)
    except Exception as err:  # a missing or corrupt file skips this trial, whatever the store raised
        name = type(err).__name__
        return f"its outputs artifact {trial.user_attrs[ATTR_OUTPUTS]} cannot be read ({name}: {err})", None


def _mismatch(outputs: TrialOutputs, sha: str, n_classes: int | None, first: TrialOutputs | None) -> str | None:
    if outputs.split_sha256 != sha:
        return f"its outputs are from split {outputs.split_sha256[:12] or '(none)'}, not the study's {sha[:12]}"
    if n_classes is not None and outputs.val_logits.shape[-1] != n_classes:
        return f"its outputs have {outputs.val_logits.shape[-1]} classes, the study {n_classes}"
    if first is not None and not (outputs.val_labels.equal(first.val_labels)
                                  and outputs.test_labels.equal(first.test_labels)):
        return "its stored labels differ from the best candidate's"
    return None


# --------------------------------------------------------------------------------------------- report

# Every column but `val NLL` is measured on the test split; `(T)`: after temperature scaling.
HEADERS = ("method", "members", "weights", "val NLL", "acc", "NLL", "ECE", "T", "NLL (T)", "ECE (T)")


def _f(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _weights_cell(row: Row) -> str:
    return " ".join(f"#{t}:{w:.2f}" for t, w in zip(row.trials, row.weights, strict=True))


def table_cells(result: EnsembleResult) -> list[list[str]]:
    """The comparison as text cells, shared by the terminal table and report.md."""
    cells = []
    for row in result.rows:
        name = row.name + (" [chosen]" if row.key == result.method else "")
        if row.key == "weighted" and result.collapsed:
            name += " [collapsed to 1 member]"
        if row.key == "soup" and result.soup is not None and not result.soup.kept:
            name += " [not kept]"
        t = _f(row.temperature, 3) + (" (bound)" if row.temperature_at_bound else "")
        cells.append([name, str(len(row.trials)), _weights_cell(row), _f(row.val_nll), _f(row.accuracy),
                      _f(row.nll), _f(row.ece), t, _f(row.nll_scaled), _f(row.ece_scaled)])
    return cells


def result_table(result: EnsembleResult, title: str) -> Table:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), header_style="bold")
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i in (0, 2) else "right")
    for cells in table_cells(result):
        table.add_row(*(escape(c) for c in cells))
    return table


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "|".join(":---" if i in left else "---:" for i in range(len(headers))) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def report_markdown(result: EnsembleResult, study_name: str, candidates: Sequence[Candidate],
                    skipped: Sequence[str]) -> str:
    weights = dict(zip((c.trial for c in candidates), result.weight_fit.weights, strict=True))
    cand_rows = [[f"#{c.trial}", f"{c.val_accuracy:.4f}", f"{weights[c.trial]:.3f}",
                  ", ".join(f"{k}={_param(v)}" for k, v in c.params.items())] for c in candidates]
    parts = [
        f"# Ensemble of study `{study_name}`",
        "",
        f"Split `{result.split_sha256}`: {result.sizes['val']} validation, {result.sizes['test']} test samples. "
        "Weights and temperatures are fitted on validation outputs only; every metric below except `val NLL` "
        "is on the held-out test split.",
        "",
        f"Chosen method: **{result.method}** ({len(result.members)} members"
        + (f", T = {result.temperature:.3f}" if result.temperature is not None else "") + ").",
        "",
    ]
    if result.collapsed:
        parts += [f"**The weighted ensemble collapsed to a single member (trial {result.row('weighted').trials[0]})"
                  ": weighted soft voting is that one model, not an ensemble.**", ""]
    parts += ["## Comparison", "", "`val NLL` is on validation; acc, NLL and ECE are on test, before and after "
              "temperature scaling with the T fitted on validation.", "",
              _markdown_table(HEADERS, table_cells(result), left=(0, 2)), "",
              "## Candidates (rank order)", "",
              _markdown_table(["trial", "val acc", "fitted weight", "params"], cand_rows, left=(0, 3)), "",
              "## Notes", "", *(f"- {n}" for n in result.notes)]
    if result.soup is not None:
        parts += ["", "## Greedy soup", "", f"{'Kept' if result.soup.kept else 'Not kept'}: {result.soup.reason}.",
                  "", "Trials in rank order; each row is the soup's validation accuracy and NLL with that trial's "
                  "weights averaged in (re-run on the validation split); the first row is the best trial alone.", "",
                  _markdown_table(["trial", "val acc", "val NLL", "added"],
                                  [[f"#{s.trial}", f"{s.val_accuracy:.4f}", f"{s.val_nll:.4f}",
                                    "yes" if s.added else "no"] for s in result.soup.steps])]
    if skipped:
        parts += ["", "## Skipped trials", "", *(f"- {s}" for s in skipped)]
    return "\n".join(parts) + "\n"


def _param(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def result_json(result: EnsembleResult, study_name: str, classes: Sequence[str],
                skipped: Sequence[str] = ()) -> dict[str, Any]:
    """ensemble.json: what an exporter needs (members, weights, method, T) and the metrics."""
    from hpsearch import __version__

    return {
        "hpsearch_version": __version__,
        "study": study_name,
        "split_sha256": result.split_sha256,
        "classes": list(classes),
        "method": result.method,
        "combine": {"weighted": "weighted average of member softmax probabilities",
                    "soft": "uniform average of member softmax probabilities",
                    "hard": f"majority vote of member argmax; {HARD_TIE_RULE}",
                    "soup": "one model: the uniform average of the greedy soup's ingredients' weights"}[result.method],
        "temperature": _number(result.temperature),
        "weight_fit": result.weight_fit.name,
        "candidates": list(result.candidates),
        "fits": [{"name": f.name, "val_nll": _number(f.val_nll), "weights": list(f.weights)}  # one per candidate
                 for f in result.fits],
        "collapsed": result.collapsed,
        "members": [{"trial": m.trial, "arch": m.arch, "weight": m.weight, "weights_artifact": m.weights_artifact,
                     "val_accuracy": m.val_accuracy, "params": dict(m.params)} for m in result.members],
        "metrics": [{"method": r.key, "name": r.name, "trials": list(r.trials), "weights": list(r.weights),
                     "val_nll": _number(r.val_nll), "test_accuracy": _number(r.accuracy),
                     "test_nll": _number(r.nll), "test_ece": _number(r.ece), "temperature": _number(r.temperature),
                     "test_nll_scaled": _number(r.nll_scaled), "test_ece_scaled": _number(r.ece_scaled),
                     "val_accuracy": _number(r.val_accuracy), "temperature_at_bound": r.temperature_at_bound}
                    for r in result.rows],
        "notes": list(result.notes),
        "skipped": list(skipped),
        "soup": None if result.soup is None else {
            "ingredients": list(result.soup.ingredients), "kept": result.soup.kept, "reason": result.soup.reason,
            "steps": [{"trial": s.trial, "val_accuracy": s.val_accuracy, "val_nll": _number(s.val_nll),
                       "added": s.added} for s in result.soup.steps]},
    }


# ------------------------------------------------------------------------------------------ the folder


@contextlib.contextmanager
def staged_dir(target: Path, marker: str = RESULT_FILE) -> Iterator[Path]:
    """Yield a fresh folder next to `target`; on success it replaces `target` in one rename.

    An existing `target` must be a folder this tool wrote (it holds `marker`) or empty; it is moved aside,
    the new folder renamed in, and the old one deleted. On error the staged folder is removed and `target`
    is left untouched.
    """
    target = Path(target).expanduser().absolute()
    if target.exists() and not (target.is_dir() and ((target / marker).is_file() or not any(target.iterdir()))):
        raise EnsembleError(f"--out {target} exists and is not an ensemble folder (no {marker}); pick another "
                            "folder or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staged
        umask = os.umask(0)
        os.umask(umask)
        staged.chmod(0o777 & ~umask)
        if target.exists():
            old = target.parent / f".{target.name}-old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(staged, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def write_ensemble_dir(target: Path, result: EnsembleResult, study_name: str, classes: Sequence[str],
                       candidates: Sequence[Candidate], skipped: Sequence[str] = (),
                       export: Callable[[Path, Mapping[str, Any]], None] | None = None) -> Path:
    """Write report.md and ensemble.json into `target`, atomically (see `staged_dir`).

    `export(folder, payload)` adds more files (hpsearch.export: member weights, manifest) in the same rename.
    """
    with staged_dir(target) as folder:
        (folder / REPORT_FILE).write_text(report_markdown(result, study_name, candidates, skipped), encoding="utf-8")
        payload = result_json(result, study_name, classes, skipped)
        (folder / RESULT_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        if export is not None:
            export(folder, payload)
    return Path(target).expanduser().absolute()
