"""An ensemble's candidates: a study's best COMPLETE trials whose stored outputs are usable, read from its store.

Candidates are the COMPLETE trials, best validation accuracy first (ties: lower trial number), whose weights
can be opened and whose `outputs.safetensors` loads, carries the study's split sha256, has the study's classes
and the best candidate's labels. A trial that fails any of these is passed over with a warning naming it and
why, and the next one is tried. No model is re-run: the outputs are what each trial stored when it finished.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hpsearch import keys
from hpsearch.artifacts import TrialOutputs, load_trial_outputs
from hpsearch.combine import Outputs, member_log_probs
from hpsearch.errors import EnsembleError
from hpsearch.search import ranked_trials

if TYPE_CHECKING:
    import optuna

    from hpsearch.artifacts import ArtifactStore


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


def select_candidates(study: optuna.Study, store: ArtifactStore, top_k: int,
                      pin: Callable[[str], None] | None = None) -> Selection:
    """The top_k usable trials, best validation accuracy first (ties: lower trial number).

    A trial whose weights are missing, or whose outputs are missing, unreadable, from another split or shaped
    unlike the study's classes, is passed over with a warning in `skipped`, and the next one is tried. With
    `pin`, each trial's weights are pinned before they are checked (hpsearch.pins): running workers then keep
    what was found.
    """
    expected_sha = keys.split_sha256(study)
    if not expected_sha:
        raise EnsembleError(f"study {study.study_name!r} records no split_sha256; it was not created by hpsearch")
    n_classes = len(keys.classes(study)) or None
    chosen: list[Candidate] = []
    skipped: list[str] = []
    for trial in ranked_trials(study):
        if len(chosen) >= top_k:
            break
        if pin is not None and trial.user_attrs.get(keys.WEIGHTS):
            pin(str(trial.user_attrs[keys.WEIGHTS]))
        problem, outputs = _load(store, trial)
        if outputs is not None:
            problem = _mismatch(outputs, expected_sha, n_classes, chosen[0].outputs if chosen else None)
        if problem is not None or outputs is None:
            skipped.append(f"trial {trial.number} skipped: {problem}")
            continue
        chosen.append(Candidate(trial.number, dict(trial.params), float(trial.value or 0.0),
                                str(trial.user_attrs.get(keys.WEIGHTS, "")), outputs))
    return Selection(tuple(chosen), tuple(skipped))


def _load(store: ArtifactStore, trial: optuna.trial.FrozenTrial) -> tuple[str | None, TrialOutputs | None]:
    for attr in (keys.OUTPUTS, keys.WEIGHTS):
        if attr not in trial.user_attrs:
            return f"it has no {attr} user attr", None
    try:
        store.open_reader(trial.user_attrs[keys.WEIGHTS]).close()  # a member must be exportable
    except Exception as err:
        return f"its weights artifact {trial.user_attrs[keys.WEIGHTS]} cannot be opened ({type(err).__name__})", None
    try:
        return None, load_trial_outputs(store, trial)
    except Exception as err:  # a missing or corrupt file skips this trial, whatever the store raised
        name = type(err).__name__
        return f"its outputs artifact {trial.user_attrs[keys.OUTPUTS]} cannot be read ({name}: {err})", None


def _mismatch(outputs: TrialOutputs, sha: str, n_classes: int | None, first: TrialOutputs | None) -> str | None:
    if outputs.split_sha256 != sha:
        return f"its outputs are from split {outputs.split_sha256[:12] or '(none)'}, not the study's {sha[:12]}"
    if n_classes is not None and outputs.val_logits.shape[-1] != n_classes:
        return f"its outputs have {outputs.val_logits.shape[-1]} classes, the study {n_classes}"
    if first is not None and not (outputs.val_labels.equal(first.val_labels)
                                  and outputs.test_labels.equal(first.test_labels)):
        return "its stored labels differ from the best candidate's"
    return None


def stack_outputs(candidates: Sequence[Candidate]) -> Outputs:
    """The candidates' outputs as log-probabilities, checked to line up sample by sample."""
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
    return Outputs(
        val=member_log_probs([c.outputs.val_logits.double().numpy() for c in candidates]),
        test=member_log_probs([c.outputs.test_logits.double().numpy() for c in candidates]),
        y_val=first.val_labels.numpy().astype(np.int64),
        y_test=first.test_labels.numpy().astype(np.int64),
    )
