"""Ensembles of a study's best trials, built from their stored outputs only (no model is re-run).

The top k candidates (hpsearch.candidates) are combined. The fitting outputs are the calibration split's: a
part of the data no trial trained on and no choice of the search (best epoch, pruning, ranking) read (`[data]
calibration_fraction`, 0.1 by default). With `[data] folds` they are the out-of-fold outputs of every train+val
image; a study that cut no calibration part falls back to its validation outputs, and a note says so. Member weights
are fitted there two ways, and the one with the lower NLL wins (hpsearch.combine):

- greedy ensemble selection with replacement (Caruana et al., 2004): add, one round at a time, the member
  whose addition gives the lowest NLL of the running average; keep the best prefix; a member's weight is how
  often it was picked in that prefix;
- direct minimisation of the NLL of the weighted average over the simplex (scipy SLSQP; the NLL of a mixture
  is convex in its weights, so this is the global optimum up to solver tolerance).

A fit judged on the outputs it was fitted to looks better than it is (and validation or out-of-fold outputs
also picked the epochs and ranked the trials). Every decision therefore rests on cross-fitted evidence
(hpsearch.ensemble._crossfit): weights and T refitted without each part of the fitting outputs and scored on
it. A temperature ships only where it lowers that held-out NLL; `--method auto` (the default) ships the lowest
held-out NLL among the best single trial, uniform and weighted soft voting. Hard voting ships votes, not
probabilities, so it has no NLL to compare and is shipped only when asked for.

The held-out test outputs are used only to compare, in one table: the best single trial, hard voting,
uniform soft voting and weighted soft voting; accuracy, NLL and ECE (15 equal-width confidence bins),
before and after the temperature each row ships.

In a cross-validated study (`[data] folds`) a member is a trial's K fold models, their softmaxes averaged
uniformly; the test rows compare the fold-averaged members in the same table. A soup (one averaged model) is
refused there.

With `--method soup` (hpsearch.soup) the table gains a "greedy soup" row: one model whose weights average
several trials', re-run on the data (weight averaging changes the function), measured like the other rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hpsearch.archs import trial_arch
from hpsearch.ensemble._candidates import (
    Candidate,
    FitPart,
    Selection,
    fit_outputs,
    fit_part,
    select_candidates,
    stack_outputs,
    trial_candidate,
)
from hpsearch.ensemble._combine import (
    ECE_BINS,
    GREEDY_ROUNDS,
    HARD_TIE_RULE,
    T_BOUNDS,
    Outputs,
    WeightFit,
    choose_weights,
    fit_nll_weights,
    greedy_selection,
    member_log_probs,
    mixture_nll,
    true_class_log_probs,
)
from hpsearch.ensemble._crossfit import PARTS, HeldOut
from hpsearch.ensemble._rows import MIN_MISTAKES, Row, hard_row, soft_row, usable_temperature
from hpsearch.ensemble._soup import Soup, SoupInfo, make_soup
from hpsearch.errors import EnsembleError, UsageError
from hpsearch.record import read_study_record

if TYPE_CHECKING:
    import optuna
    import torch

    from hpsearch.store import ArtifactStore

Method = Literal["auto", "single", "weighted", "soft", "hard", "soup"]
# What build_ensemble combines from stored outputs; "soup" (hpsearch.soup) re-runs an averaged model instead;
# "auto" is one of the PROBABILISTIC ones, chosen by its cross-fitted held-out NLL.
METHODS: tuple[Method, ...] = ("auto", "single", "weighted", "soft", "hard")
PROBABILISTIC: tuple[Method, ...] = ("single", "soft", "weighted")  # in the order ties are broken
FIT_NAMES = {"greedy": "greedy selection", "slsqp": "direct NLL minimisation (SLSQP)", "uniform": "uniform"}
# What fitted the weights and T, in words, by hpsearch.ensemble._candidates.fit_part.
FIT_DATA: dict[FitPart, str] = {
    "calibration": "calibration outputs (images no trial trained on and no choice of the search read)",
    "validation": "validation outputs",
    "out-of-fold": "out-of-fold outputs of train+val (each image predicted by the fold model that never saw it)",
}


@dataclass(frozen=True)
class Member:
    """One model of the chosen ensemble, everything an exporter needs to rebuild and weigh it."""

    trial: int
    params: Mapping[str, Any]
    arch: str
    weight: float
    weights_artifact: str  # the trial's stored weights; "" for a kept soup, whose weights are `state`
    val_accuracy: float
    # A kept greedy soup: the averaged weights of `soup_of` (plain torchvision keys), made in this process.
    state: Mapping[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    soup_of: tuple[int, ...] = ()
    fold_artifacts: tuple[str, ...] = ()  # a cross-validated member: its K fold models' stored weights


@dataclass(frozen=True)
class EnsembleResult:
    method: Method  # what ships: never "auto"
    members: tuple[Member, ...]  # of `method`; weights sum to 1
    temperature: float | None  # to apply with `method`: fitted T where held-out evidence backs it, else 1.0;
    # None for hard voting
    weight_fit: WeightFit  # the fit the weighted row uses
    fits: tuple[WeightFit, ...]  # every fit tried (greedy, slsqp), for the report
    rows: tuple[Row, ...]  # single, hard, soft, weighted
    collapsed: bool  # the weighted ensemble is a single member
    notes: tuple[str, ...]
    split_sha256: str
    sizes: Mapping[str, int]  # fit (the fitting outputs), test
    candidates: tuple[int, ...]  # trial numbers in rank order; WeightFit.weights line up with them
    soup: SoupInfo | None = None  # only with --method soup
    asked: Method = "weighted"  # what the user asked for (--method)
    fit_part: FitPart = "validation"  # which outputs fitted the weights and T

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    @property
    def fit_data(self) -> str:
        """What fitted the weights and T, in words."""
        return FIT_DATA[self.fit_part]

    def fitting(self) -> dict[str, Any]:
        """Which data fitted, chose and measured what: the export's manifest and ensemble.json record it."""
        shipped = self.row(self.method)
        sizes = f"{self.sizes['fit']} {self.fit_data}"
        if shipped.temperature is None:
            temperature = "none: hard voting ships vote shares"
        elif shipped.temperature_ships:
            temperature = (f"T = {shipped.temperature:.4g}, fitted on all {sizes}; shipped because cross-fitted on "
                           f"them it lowered held-out NLL from {_g(shipped.heldout, 'nll')} to "
                           f"{_g(shipped.heldout, 'nll_scaled')}")
        else:
            temperature = (f"T = 1: the T fitted on {sizes} ({_t(shipped.fitted_temperature)}) is not backed by "
                           "cross-fitted held-out NLL (a gain above 1.645 standard errors, with at least 10 mistakes "
                           "to fit it by)" + (" (a degenerate fit: a search bound, or sharpening "
                                                         "outputs without a mistake)"
                                                         if shipped.temperature_at_bound else ""))
        weights = {"single": "none: one member", "soft": "none: uniform", "hard": "none: uniform votes",
                   "soup": "none: one averaged model"}.get(self.method, f"{FIT_NAMES[self.weight_fit.name]} on all "
                                                                        f"{sizes}")
        choice = (f"auto: the lowest cross-fitted held-out NLL among {', '.join(PROBABILISTIC)}"
                  if self.asked == "auto" else f"asked for with --method {self.asked}")
        return {
            "selection": "each trial's best epoch and the trials' ranking: the study's metric on the "
                         + ("out-of-fold outputs" if self.fit_part == "out-of-fold" else "validation outputs"),
            "weights": weights, "temperature": temperature, "choice": choice,
            "evidence": f"cross-fitting in {PARTS} stratified parts of the {sizes}: weights and T refitted without "
                        "each part, scored on it",
            "test": f"{self.sizes['test']} test images, used for the comparison only, never for a fit or a choice",
            "heldout": {r.key: {"accuracy": r.heldout.accuracy, "nll": _finite(r.heldout.nll),
                                "nll_scaled": _finite(r.heldout.nll_scaled)}
                        for r in self.rows if r.heldout is not None},
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _g(heldout: HeldOut | None, name: str) -> str:
    return "—" if heldout is None else f"{getattr(heldout, name):.4f}"


def _t(value: float | None) -> str:
    return "none" if value is None else f"{value:.3g}"


def weight_fitter(rounds: int = GREEDY_ROUNDS) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Weights as the weighted row fits them (greedy or SLSQP, whichever has the lower NLL; uniform if neither
    beats it), as a function of the outputs: cross-fitting refits it on each part's complement."""
    def fit(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return np.asarray(_fit_weights(true_class_log_probs(log_probs, labels), rounds)[0].weights)

    return fit


def _fit_weights(true: np.ndarray, rounds: int) -> tuple[WeightFit, tuple[WeightFit, ...]]:
    m = true.shape[0]
    fits = (greedy_selection(true, rounds)[0], fit_nll_weights(true))
    return choose_weights(fits, mixture_nll(true, np.full(m, 1.0 / m)), m), fits


def choose_method(rows: Sequence[Row]) -> Method:
    """`--method auto`: the probabilistic row with the lowest cross-fitted held-out NLL of what it ships (with
    its T where T ships); ties go to the earlier of PROBABILISTIC (the simpler combination)."""
    by_key = {r.key: r for r in rows}
    return min(PROBABILISTIC, key=lambda k: (by_key[k].shipped_heldout_nll, PROBABILISTIC.index(k)))


def build_ensemble(candidates: Sequence[Candidate], arch: str, method: Method = "auto", *,
                   rounds: int = GREEDY_ROUNDS) -> EnsembleResult:
    """Fit weights on the fitting outputs, gather cross-fitted evidence for every row, compare the four ways of
    combining on test, and pick `method`'s members (with "auto", the row the held-out evidence favours).

    `candidates` must be in rank order (best validation accuracy first): the first is the best single trial.
    """
    if method not in METHODS:
        raise EnsembleError(f"method {method!r} is not one of {', '.join(METHODS)}")
    data = stack_outputs(candidates)
    m = len(candidates)
    trials = [c.trial for c in candidates]
    uniform = np.full(m, 1.0 / m)
    chosen, fits = _fit_weights(true_class_log_probs(data.fit, data.y_fit), rounds)

    single = soft_row("single", f"best single trial (#{trials[0]})", data, np.eye(m)[0], trials)
    hard, ties = hard_row(data, trials)
    soft = soft_row("soft", "uniform soft voting", data, uniform, trials)
    weighted = soft_row("weighted", "weighted soft voting", data, np.asarray(chosen.weights), trials,
                        fit_weights=weight_fitter(rounds))
    rows = (single, hard, soft, weighted)
    collapsed = len(weighted.trials) == 1
    shipped: Method = choose_method(rows) if method == "auto" else method

    weights = {"weighted": chosen.weights, "soft": tuple(uniform), "hard": tuple(uniform),
               "single": tuple(np.eye(m)[0])}[shipped]
    members = tuple(Member(c.trial, dict(c.params), trial_arch(arch, c.params), w, c.weights_artifact, c.val_accuracy,
                           fold_artifacts=c.fold_weights)
                    for c, w in zip(candidates, weights, strict=True) if w > 0)
    temperature = None if shipped == "hard" else usable_temperature(next(r for r in rows if r.key == shipped))
    k = len(candidates[0].fold_weights)
    part = fit_part(candidates[0].outputs)
    notes = _notes(fits, chosen, rows, collapsed, ties, len(data.y_test), method, shipped)
    if part == "validation":
        notes += ("no calibration part: weights, T and the choice rest on the validation outputs, which also picked "
                  "the trials' epochs and ranked them; a study with [data] calibration_fraction > 0 (a new one) gives "
                  "evidence nothing else was chosen on",)
    notes += _thin_evidence(single, len(data.y_fit), method, part)
    if k:
        notes = (f"cross-validated: each member is one trial's {k} fold models, their softmaxes averaged uniformly; "
                 f"weights and T are fitted on the out-of-fold outputs of all {len(data.y_fit)} train+val images "
                 "(each predicted by the fold model that never saw it)", *notes)
    return EnsembleResult(shipped, members, temperature, chosen, fits, rows, collapsed,
                          notes, candidates[0].outputs.split_sha256,
                          {"fit": len(data.y_fit), "test": len(data.y_test)}, tuple(trials), asked=method,
                          fit_part=part)


def _notes(fits: Sequence[WeightFit], chosen: WeightFit, rows: Sequence[Row], collapsed: bool, ties: int,
           n_test: int, asked: Method, shipped: Method) -> tuple[str, ...]:
    weighted = rows[-1]
    tried = ", ".join(f"{FIT_NAMES[f.name]} {f.fit_nll:.6f}" for f in fits)
    others = [f.fit_nll for f in fits if f.name != chosen.name]
    margin = f" (lower by {min(others) - chosen.fit_nll:.2g})" if others and chosen.name != "uniform" else ""
    notes = [f"weights: NLL on the fitting outputs {tried}; the weighted row uses {FIT_NAMES[chosen.name]}{margin}"
             + (" (neither fit beat uniform weights)" if chosen.name == "uniform" else "")]
    heldout = "; ".join(f"{r.key} {r.shipped_heldout_nll:.4f}" for r in rows if r.shipped_heldout_nll is not None)
    if asked == "auto":
        notes.append(f"chosen: {shipped}, the lowest cross-fitted held-out NLL ({PARTS} parts; with each row's "
                     f"shipped T): {heldout}")
    else:
        notes.append(f"{shipped} as asked (--method); cross-fitted held-out NLL ({PARTS} parts): {heldout}")
    if collapsed:
        notes.append(f"the weighted ensemble collapsed to a single member (trial {weighted.trials[0]}): weighted "
                     "soft voting is that one model, not an ensemble")
    notes.append(f"hard voting: {HARD_TIE_RULE}; {ties} of {n_test} test samples were ties; it ships votes, not "
                 "probabilities, so it is chosen only when asked for")
    notes.append(f"ECE: {ECE_BINS} equal-width confidence bins; T: fitted by 1-D minimisation of NLL over T in "
                 f"[{T_BOUNDS[0]}, {T_BOUNDS[1]}] (accuracy unchanged), shipped only where cross-fitting shows it "
                 "lowers held-out NLL; the 'after T' columns are at the T each row ships")
    for row in rows:
        if row.temperature_at_bound and row.fitted_temperature is not None:
            why = (f"its accuracy on the fitting outputs is {row.fit_accuracy:.4f}, so sharper is always better there"
                   if row.fit_accuracy == 1.0 else "NLL has no minimum inside the bounds")
            notes.append(f"{row.name}: T ran to the search bound ({row.fitted_temperature:.3g}): {why}; T overfits, "
                         "and T = 1 is kept")
        elif row.fitted_temperature is not None and row.fitted_temperature != 1.0 and not row.temperature_ships:
            notes.append(f"{row.name}: the fitted T = {row.fitted_temperature:.3g} is not backed by held-out evidence "
                         f"(cross-fitted NLL {row.heldout.nll:.4f} at T = 1, {row.heldout.nll_scaled:.4f} with T; "
                         "a T ships on a gain above 1.645 standard errors with at least 10 mistakes to fit it by), "
                         "so T = 1 is kept" if row.heldout is not None else "")
    return tuple(n for n in notes if n)


def _thin_evidence(single: Row, n_fit: int, asked: Method, part: FitPart) -> tuple[str, ...]:
    """A warning where `auto` chose on one split's outputs holding too few mistakes to tell the rows apart: there
    the rows differ mostly by their confidence on images they all get right. On validation (a study that cut no
    calibration part) the best trial is also best there partly by luck: the split ranked it. Measured on digits
    (bench/RESULTS.md): on validation, uniform soft voting had a higher test accuracy than what `auto` shipped on
    every seed; on 179 calibration images, one seed in three shipped a trial that test ranked below the best."""
    mistakes = round((1.0 - single.fit_accuracy) * n_fit)
    if asked != "auto" or part == "out-of-fold" or mistakes >= MIN_MISTAKES:
        return ()
    said = (f"thin evidence: the choice rests on {n_fit} {part} images on which the best trial makes {mistakes} "
            f"mistakes (under {MIN_MISTAKES}): the rows differ there mostly by their confidence on images all get "
            "right")
    if part == "validation":
        return (f"{said}, and that split ranked the trials; give the study a calibration part ([data] "
                "calibration_fraction, in a new study) or cross-validate it ([data] folds), or ask for --method soft",)
    return (f"{said}; a larger [data] calibration_fraction (in a new study) or [data] folds gives more evidence, or "
            "ask for the method you trust (--method)",)


def with_soup(result: EnsembleResult, soup: Soup, candidates: Sequence[Candidate]) -> EnsembleResult:
    """`result` with the soup's row and notes added; when the soup is kept, it is the one exported member."""
    rows = (*result.rows, soup.row)
    info = soup.info
    if not info.kept:
        note = (f"greedy soup not kept: {info.reason}; the export is the {result.method} ensemble instead")
        return dataclasses.replace(result, rows=rows, soup=info, notes=(*result.notes, note))
    params: dict[str, Any] = dict(next(c.params for c in candidates if c.trial == info.ingredients[0]))
    validated = [s.val_accuracy for s in info.steps if s.added][-1]  # the kept soup's, re-run on validation
    member = Member(info.ingredients[0], params, soup.arch, 1.0, "", validated,
                    state=soup.state_dict, soup_of=info.ingredients)
    note = (f"greedy soup kept: {info.reason}; the export is one model, the average of trials "
            + ", ".join(f"#{t}" for t in info.ingredients) + "'s weights")
    return dataclasses.replace(result, method="soup", members=(member,), temperature=usable_temperature(soup.row),
                               rows=rows, soup=info, notes=(*result.notes, note), asked="soup")


def single_trial(candidate: Candidate, arch: str) -> EnsembleResult:
    """One trial exported alone (`hpsearch export --trial N`): its temperature decided as every row's is (cross-
    fitted held-out evidence on its fitting outputs), its test numbers measured the same way."""
    o = candidate.outputs
    fit_logits, fit_labels = fit_outputs(o)
    data = Outputs(fit=member_log_probs([fit_logits.double().numpy()]),
                   test=member_log_probs([o.test_logits.double().numpy()]),
                   y_fit=fit_labels.numpy().astype(np.int64), y_test=o.test_labels.numpy().astype(np.int64))
    row = soft_row("single", f"trial #{candidate.trial}", data, np.ones(1), [candidate.trial])
    member = Member(candidate.trial, dict(candidate.params), trial_arch(arch, candidate.params), 1.0,
                    candidate.weights_artifact, candidate.val_accuracy, fold_artifacts=candidate.fold_weights)
    fit = WeightFit("uniform", (1.0,), float(row.fit_nll or 0.0))
    notes = [f"trial {candidate.trial} exported alone (--trial); T: shipped only where cross-fitting ({PARTS} "
             "parts) shows it lowers held-out NLL"]
    if row.fitted_temperature is not None and not row.temperature_ships and row.fitted_temperature != 1.0:
        notes.append(f"the fitted T = {row.fitted_temperature:.3g} is not shipped (T = 1)")
    return EnsembleResult("single", (member,), usable_temperature(row), fit, (), (row,), False, tuple(notes),
                          o.split_sha256, {"fit": len(data.y_fit), "test": len(data.y_test)}, (candidate.trial,),
                          asked="single", fit_part=fit_part(o))


def study_trial(study: optuna.Study, store: ArtifactStore, number: int, arch: str,
                pin: Callable[[str], None] | None = None) -> tuple[EnsembleResult, Selection]:
    """`hpsearch export --trial N`: trial N of the study as a one-member export; one line when it cannot be."""
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is None or trial.state.name != "COMPLETE":
        state = "does not exist" if trial is None else f"is {trial.state.name}"
        raise UsageError(f"--trial {number}: trial {number} of study {study.study_name!r} {state}; export a COMPLETE "
                         "trial (`hpsearch status` lists them)")
    candidate, problem = trial_candidate(study, store, trial, pin=pin)
    if candidate is None:
        raise UsageError(f"--trial {number}: {problem}")
    arch = str(read_study_record(study).config_value("model", "arch", arch))
    return single_trial(candidate, arch), Selection((candidate,), ())


def study_ensemble(study: optuna.Study, store: ArtifactStore, *, top_k: int, method: Method, arch: str,
                   device: Callable[[], torch.device] | None = None, on_warning: Callable[[str], None] | None = None,
                   on_start: Callable[[str], None] | None = None,
                   pin: Callable[[str], None] | None = None) -> tuple[EnsembleResult, Selection]:
    """The ensemble of a study's top_k usable trials; with method "soup", the greedy soup is tried too (re-run
    on `device()`). Each skipped trial is told to `on_warning`; fewer than 2 usable trials is an EnsembleError."""
    record = read_study_record(study)
    if method == "soup" and record.folds_sha256:
        raise UsageError(f"--method soup: study {study.study_name!r} is cross-validated ([data] folds), its members "
                         "are K fold models each, not one model to average; use --method weighted, soft or hard")
    selection = select_candidates(study, store, top_k, pin=pin)
    for line in selection.skipped:
        if on_warning is not None:
            on_warning(line)
    if len(selection.candidates) < 2:
        raise EnsembleError(f"study {study.study_name!r} has {len(selection.candidates)} usable trial(s) "
                            f"({len(selection.skipped)} skipped, see the warnings); an ensemble needs at least 2 "
                            "COMPLETE trials whose outputs are in the artifact store")
    arch = str(record.config_value("model", "arch", arch))
    result = build_ensemble(selection.candidates, arch, "auto" if method == "soup" else method)
    if method == "soup":
        import torch

        soup = make_soup(study, store, selection.candidates, device() if device else torch.device("cpu"),
                         on_start=on_start)
        result = with_soup(result, soup, selection.candidates)
    return result, selection
