"""Ensembles of a study's best trials, built from their stored outputs only (no model is re-run).

The top k candidates (hpsearch.candidates) are combined. Member weights are fitted on the validation outputs
only, two ways, and the one with the lower validation NLL wins (hpsearch.combine):

- greedy ensemble selection with replacement (Caruana et al., 2004): add, one round at a time, the member
  whose addition gives the lowest validation NLL of the running average; keep the best prefix; a member's
  weight is how often it was picked in that prefix;
- direct minimisation of the validation NLL of the weighted average over the simplex (scipy SLSQP; the NLL
  of a mixture is convex in its weights, so this is the global optimum up to solver tolerance).

The held-out test outputs are used only to compare, in one table: the best single trial, hard voting,
uniform soft voting and weighted soft voting; accuracy, NLL and ECE (15 equal-width confidence bins),
and for the probabilistic rows the same after temperature scaling fitted on validation.

In a cross-validated study (`[data] folds`) a member is a trial's K fold models, their softmaxes averaged
uniformly; the weights are fitted on the out-of-fold outputs of every train+val image (hpsearch.candidates), and
the test rows compare the fold-averaged members in the same table. A soup (one averaged model) is refused there.

With `--method soup` (hpsearch.soup) the table gains a "greedy soup" row: one model whose weights average
several trials', re-run on the data (weight averaging changes the function), measured like the other rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hpsearch.ensemble._candidates import Candidate, Selection, select_candidates, stack_outputs
from hpsearch.ensemble._combine import (
    ECE_BINS,
    GREEDY_ROUNDS,
    HARD_TIE_RULE,
    T_BOUNDS,
    Row,
    WeightFit,
    choose_weights,
    fit_nll_weights,
    greedy_selection,
    hard_row,
    mixture_nll,
    soft_row,
    true_class_log_probs,
    usable_temperature,
)
from hpsearch.ensemble._soup import Soup, SoupInfo, make_soup
from hpsearch.errors import EnsembleError, UsageError
from hpsearch.record import read_study_record

if TYPE_CHECKING:
    import optuna
    import torch

    from hpsearch.store import ArtifactStore

Method = Literal["weighted", "soft", "hard", "soup"]
# What build_ensemble combines from stored outputs; "soup" (hpsearch.soup) re-runs an averaged model instead.
METHODS: tuple[Method, ...] = ("weighted", "soft", "hard")
FIT_NAMES = {"greedy": "greedy selection", "slsqp": "direct NLL minimisation (SLSQP)", "uniform": "uniform"}


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


def build_ensemble(candidates: Sequence[Candidate], arch: str, method: Method = "weighted", *,
                   rounds: int = GREEDY_ROUNDS) -> EnsembleResult:
    """Fit weights on validation, compare the four ways of combining on test, and pick `method`'s members.

    `candidates` must be in rank order (best validation accuracy first): the first is the best single trial.
    """
    if method not in METHODS:
        raise EnsembleError(f"method {method!r} is not one of {', '.join(METHODS)}")
    data = stack_outputs(candidates)
    m = len(candidates)
    trials = [c.trial for c in candidates]
    true_val = true_class_log_probs(data.val, data.y_val)
    uniform = np.full(m, 1.0 / m)
    greedy, _ = greedy_selection(true_val, rounds)
    fits = (greedy, fit_nll_weights(true_val))
    chosen = choose_weights(fits, mixture_nll(true_val, uniform), m)

    single = soft_row("single", f"best single trial (#{trials[0]})", data, np.eye(m)[0], trials)
    hard, ties = hard_row(data, trials)
    soft = soft_row("soft", "uniform soft voting", data, uniform, trials)
    weighted = soft_row("weighted", "weighted soft voting", data, np.asarray(chosen.weights), trials)
    collapsed = len(weighted.trials) == 1

    weights = {"weighted": chosen.weights, "soft": tuple(uniform), "hard": tuple(uniform)}[method]
    members = tuple(Member(c.trial, dict(c.params), arch, w, c.weights_artifact, c.val_accuracy,
                           fold_artifacts=c.fold_weights)
                    for c, w in zip(candidates, weights, strict=True) if w > 0)
    temperature = {"weighted": usable_temperature(weighted), "soft": usable_temperature(soft), "hard": None}[method]
    notes = _notes(fits, chosen, (single, soft, weighted), collapsed, ties, len(data.y_test))
    k = len(candidates[0].fold_weights)
    if k:
        notes = (f"cross-validated: each member is one trial's {k} fold models, their softmaxes averaged uniformly; "
                 f"weights and T are fitted on the out-of-fold outputs of all {len(data.y_val)} train+val images "
                 "(each predicted by the fold model that never saw it)", *notes)
    return EnsembleResult(method, members, temperature, chosen, fits, (single, hard, soft, weighted), collapsed,
                          notes, candidates[0].outputs.split_sha256,
                          {"val": len(data.y_val), "test": len(data.y_test)}, tuple(trials))


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


def with_soup(result: EnsembleResult, soup: Soup, candidates: Sequence[Candidate]) -> EnsembleResult:
    """`result` with the soup's row and notes added; when the soup is kept, it is the one exported member."""
    rows = (*result.rows, soup.row)
    info = soup.info
    if not info.kept:
        note = (f"greedy soup not kept: {info.reason}; the export is the {result.method} ensemble instead")
        return dataclasses.replace(result, rows=rows, soup=info, notes=(*result.notes, note))
    params: dict[str, Any] = dict(next(c.params for c in candidates if c.trial == info.ingredients[0]))
    member = Member(info.ingredients[0], params, soup.arch, 1.0, "", soup.row.val_accuracy,
                    state=soup.state_dict, soup_of=info.ingredients)
    note = (f"greedy soup kept: {info.reason}; the export is one model, the average of trials "
            + ", ".join(f"#{t}" for t in info.ingredients) + "'s weights")
    return dataclasses.replace(result, method="soup", members=(member,), temperature=usable_temperature(soup.row),
                               rows=rows, soup=info, notes=(*result.notes, note))


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
    result = build_ensemble(selection.candidates, arch, "weighted" if method == "soup" else method)
    if method == "soup":
        import torch

        soup = make_soup(study, store, selection.candidates, device() if device else torch.device("cpu"),
                         on_start=on_start)
        result = with_soup(result, soup, selection.candidates)
    return result, selection
