"""An ensemble's candidates: a study's best COMPLETE trials whose stored outputs are usable, read from its store.

Candidates are the COMPLETE trials, best validation accuracy first (ties: lower trial number), whose weights
can be opened and whose `outputs.safetensors` loads, carries the study's split sha256, has the study's classes
and the best candidate's labels. A trial that fails any of these is passed over with a warning naming it and
why, and the next one is tried. No model is re-run: the outputs are what each trial stored when it finished.

A cross-validated study's (`[data] folds`) candidate is a trial with all K fold models: its validation outputs
are out-of-fold (every train+val image predicted by the fold model that never saw it, in pool order), its test
outputs the uniform average of its K fold models' softmaxes; the fold outputs must carry the study's folds.

What the ensemble fits on (`fit_part`): the calibration split's outputs where the study cut one, else the
out-of-fold or validation outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from hpsearch import keys
from hpsearch.ensemble._combine import Outputs, fold_average_log_probs, member_log_probs
from hpsearch.errors import EnsembleError
from hpsearch.record import read_study_record, read_trial_record
from hpsearch.store import TrialOutputs, load_outputs, ranked_trials

if TYPE_CHECKING:
    import optuna

    from hpsearch.store import ArtifactStore


@dataclass(frozen=True)
class Candidate:
    """A usable trial: its rank data and its stored outputs."""

    trial: int
    params: Mapping[str, Any]
    val_accuracy: float
    weights_artifact: str  # "" for a cross-validated trial, whose weights are `fold_weights`
    outputs: TrialOutputs
    fold_weights: tuple[str, ...] = ()  # a cross-validated trial's fold models, fold 0 first


@dataclass(frozen=True)
class Selection:
    candidates: tuple[Candidate, ...]  # best validation accuracy first
    skipped: tuple[str, ...]  # one warning per trial passed over, naming it and why


def select_candidates(study: optuna.Study, store: ArtifactStore, top_k: int,
                      pin: Callable[[str], None] | None = None) -> Selection:
    """The top_k usable trials, best validation accuracy first (ties: lower trial number).

    A trial whose weights are missing, or whose outputs are missing, unreadable, from another split or shaped
    unlike the study's classes, is passed over with a warning in `skipped`, and the next one is tried. With
    `pin`, each trial's weights are pinned before they are checked (hpsearch.pins): running workers then keep
    what was found.
    """
    chosen: list[Candidate] = []
    skipped: list[str] = []
    for trial in ranked_trials(study):
        if len(chosen) >= top_k:
            break
        candidate, problem = trial_candidate(study, store, trial, chosen[0] if chosen else None, pin)
        if candidate is None:
            skipped.append(f"trial {trial.number} skipped: {problem}")
            continue
        chosen.append(candidate)
    return Selection(tuple(chosen), tuple(skipped))


def trial_candidate(study: optuna.Study, store: ArtifactStore, trial: optuna.trial.FrozenTrial,
                    first: Candidate | None = None,
                    pin: Callable[[str], None] | None = None) -> tuple[Candidate | None, str | None]:
    """One COMPLETE trial as a candidate, or (None, why not): its weights and outputs usable, of the study's
    split and classes (and, with `first`, lined up with it)."""
    record = read_study_record(study)
    trial_record = read_trial_record(trial)
    weights = [str(r["weights_artifact"]) for r in trial_record.folds] or (
        [trial_record.weights] if trial_record.weights else [])
    for artifact in weights if pin is not None else ():
        pin(artifact)
    problem, outputs = (_load(store, trial) if record.folds_sha256 is None
                        else fold_outputs(store, trial, record.folds_sha256, record.n_folds))
    if outputs is not None:
        problem = _mismatch(outputs, record.require_split_sha256(), len(record.classes or ()) or None,
                            first.outputs if first else None)
    if problem is not None or outputs is None:
        return None, problem
    # Its accuracy, whatever metric ranked it (a study of loss or macro-F1 ranks by that, through ranked_trials).
    accuracy = trial.user_attrs.get("val_accuracy", trial.value)
    return Candidate(trial.number, dict(trial.params), float(accuracy or 0.0), trial_record.weights or "", outputs,
                     tuple(weights) if record.folds_sha256 is not None else ()), None


def _load(store: ArtifactStore, trial: optuna.trial.FrozenTrial) -> tuple[str | None, TrialOutputs | None]:
    record = read_trial_record(trial)
    for attr, artifact in ((keys.OUTPUTS, record.outputs), (keys.WEIGHTS, record.weights)):
        if artifact is None:
            return f"it has no {attr} user attr", None
    try:
        store.open_reader(str(record.weights)).close()  # a member must be exportable
    except Exception as err:
        return f"its weights artifact {record.weights} cannot be opened ({type(err).__name__})", None
    try:
        return None, load_outputs(store, str(record.outputs))
    except Exception as err:  # a missing or corrupt file skips this trial, whatever the store raised
        name = type(err).__name__
        return f"its outputs artifact {record.outputs} cannot be read ({name}: {err})", None


def fold_outputs(store: ArtifactStore, trial: optuna.trial.FrozenTrial, folds_sha: str,
                n_folds: int) -> tuple[str | None, TrialOutputs | None]:
    """A cross-validated trial's outputs: out-of-fold validation (pool order) and its fold-averaged test."""
    records = read_trial_record(trial).folds
    if [int(r["fold"]) for r in records] != list(range(n_folds)):
        return f"it has {len(records)} of the study's {n_folds} folds", None
    folds: list[TrialOutputs] = []
    for record in records:
        for attr in ("weights_artifact", "outputs_artifact"):
            try:
                store.open_reader(str(record[attr])).close()  # a member must be exportable
            except Exception as err:
                return f"fold {record['fold']}'s {attr} {record[attr]} cannot be opened ({type(err).__name__})", None
        try:
            outputs = load_outputs(store, str(record["outputs_artifact"]))
        except Exception as err:  # a corrupt file skips this trial, whatever the store raised
            return f"fold {record['fold']}'s outputs cannot be read ({type(err).__name__}: {err})", None
        if outputs.folds_sha256 != folds_sha or outputs.fold != record["fold"] or outputs.val_index is None:
            return f"fold {record['fold']}'s outputs are not from the study's folds {folds_sha[:12]}", None
        if outputs.split_sha256 != (folds[0].split_sha256 if folds else outputs.split_sha256):
            return "its fold outputs are from different splits", None
        folds.append(outputs)
    index = torch.cat([o.val_index for o in folds])  # type: ignore[misc]
    order = torch.argsort(index)
    if not bool((index[order][1:] > index[order][:-1]).all()):
        return "its folds' validation images overlap", None
    oof = torch.cat([torch.log_softmax(o.val_logits.double(), dim=-1) for o in folds])[order]
    test = torch.from_numpy(fold_average_log_probs([o.test_logits.double().numpy() for o in folds]))
    return None, TrialOutputs(oof, test, folds[0].split_sha256, torch.cat([o.val_labels for o in folds])[order],
                              folds[0].test_labels, index[order], folds_sha)


def _mismatch(outputs: TrialOutputs, sha: str, n_classes: int | None, first: TrialOutputs | None) -> str | None:
    if outputs.split_sha256 != sha:
        return f"its outputs are from split {outputs.split_sha256[:12] or '(none)'}, not the study's {sha[:12]}"
    if n_classes is not None and outputs.val_logits.shape[-1] != n_classes:
        return f"its outputs have {outputs.val_logits.shape[-1]} classes, the study {n_classes}"
    if first is not None and not (outputs.val_labels.equal(first.val_labels)
                                  and outputs.test_labels.equal(first.test_labels)):
        return "its stored labels differ from the best candidate's"
    if first is not None and outputs.val_index is not None and not outputs.val_index.equal(first.val_index):
        return "its out-of-fold images differ from the best candidate's"
    if first is not None and not _same(outputs.calibration_labels, first.calibration_labels):
        return "its stored calibration labels differ from the best candidate's"
    return None


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.equal(b))


FitPart = Literal["calibration", "validation", "out-of-fold"]


def fit_part(outputs: TrialOutputs) -> FitPart:
    """Which outputs an ensemble fits on: the calibration split's where the study has one (nothing else chose on
    it), else the out-of-fold outputs of a cross-validated study, else validation's."""
    if outputs.calibration_logits is not None:
        return "calibration"
    return "out-of-fold" if outputs.val_index is not None else "validation"


def fit_outputs(outputs: TrialOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (or log-probabilities) and labels of `fit_part(outputs)`."""
    if outputs.calibration_logits is not None and outputs.calibration_labels is not None:
        return outputs.calibration_logits, outputs.calibration_labels
    return outputs.val_logits, outputs.val_labels


def stack_outputs(candidates: Sequence[Candidate]) -> Outputs:
    """The candidates' outputs as log-probabilities, checked to line up sample by sample."""
    if len(candidates) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 usable candidates, got {len(candidates)}")
    first = candidates[0].outputs
    for c in candidates[1:]:
        o = c.outputs
        if o.split_sha256 != first.split_sha256 or o.val_logits.shape != first.val_logits.shape \
                or o.test_logits.shape != first.test_logits.shape or not o.val_labels.equal(first.val_labels) \
                or not o.test_labels.equal(first.test_labels) \
                or not _same(o.calibration_labels, first.calibration_labels):
            raise EnsembleError(f"trial {c.trial}'s outputs do not line up with trial {candidates[0].trial}'s "
                                "(split, shape or labels differ)")
    return Outputs(
        fit=member_log_probs([fit_outputs(c.outputs)[0].double().numpy() for c in candidates]),
        test=member_log_probs([c.outputs.test_logits.double().numpy() for c in candidates]),
        y_fit=fit_outputs(first)[1].numpy().astype(np.int64),
        y_test=first.test_labels.numpy().astype(np.int64),
    )
