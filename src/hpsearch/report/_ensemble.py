"""`hpsearch report ... --ensemble DIR`: an exported ensemble's members, comparison and reliability in the report.

From its ensemble.json (export/_write.py's result_json): the members' weights, the test-split comparison table, and
a reliability diagram of the shipped combination before and after its temperature.

ensemble.json holds metrics, not outputs: the diagram recombines the members' stored test outputs with the
weights and T it records, through hpsearch.ensemble's combine math, so it shows exactly what the export ships.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial

from hpsearch.ensemble import (
    ECE_BINS,
    Candidate,
    expected_calibration_error,
    fold_outputs,
    member_log_probs,
    mixture_log_probs,
    scale,
    stack_outputs,
)
from hpsearch.errors import EnsembleError, ReportError
from hpsearch.export import RESULT_FILE
from hpsearch.record import read_study_record
from hpsearch.report import _plots as plots
from hpsearch.store import ArtifactStore, TrialOutputs, load_trial_outputs

WEIGHTS_FILE = "ensemble_weights.png"
RELIABILITY_FILE = "ensemble_reliability.png"
RELIABILITY_BINS = ECE_BINS  # the table's ECE and the diagram's bins are one computation (calibration_bins)
# The comparison's columns as ensemble.json names them, in the order a reader compares them.
COMPARISON = ("name", "trials", "weights", "fit_accuracy", "test_accuracy", "test_nll", "test_ece", "temperature",
              "test_nll_scaled", "test_ece_scaled")

Builder = tuple[str, str, Callable[[], Figure]]


def read_ensemble(folder: str | Path) -> dict[str, Any]:
    """DIR/ensemble.json as written by `hpsearch ensemble`; plain JSON, nothing executed."""
    path = Path(folder).expanduser() / RESULT_FILE
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"--ensemble {path.parent}: no {RESULT_FILE}; pass a folder written by "
                          "`hpsearch ensemble STUDY.toml --out DIR`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"--ensemble {path}: unreadable ({err})") from None
    if not isinstance(result, dict) or not isinstance(result.get("members"), list) \
            or not isinstance(result.get("metrics"), list):
        raise ReportError(f"--ensemble {path}: not an hpsearch ensemble.json (no members or metrics)")
    return result


def comparison_table(result: Mapping[str, Any]) -> pd.DataFrame:
    """One row per combination ensemble.json compares (best single, hard, soft, weighted, soup): the table
    `hpsearch ensemble` printed, its markers ([chosen], (bound), ...) included; from an older ensemble.json
    without it, the metrics."""
    table = result.get("table")
    if isinstance(table, dict) and isinstance(table.get("headers"), list) and isinstance(table.get("rows"), list):
        headers = [str(h) for h in table["headers"]]
        return pd.DataFrame([[str(c) for c in row] for row in table["rows"]], columns=headers)
    rows = [{column: row.get(column) for column in COMPARISON} for row in result["metrics"]]
    frame = pd.DataFrame(rows, columns=list(COMPARISON))
    frame["trials"] = [", ".join(map(str, t or ())) for t in frame["trials"]]
    frame["weights"] = [", ".join(f"{w:.3f}" for w in (ws or ())) for ws in frame["weights"]]
    return frame


def _stored_outputs(study: optuna.Study, store: ArtifactStore, trial: FrozenTrial) -> TrialOutputs:
    """A member's stored outputs (a cross-validated member's: out-of-fold val, fold-averaged test)."""
    record = read_study_record(study)
    if record.folds_sha256 is not None:
        problem, outputs = fold_outputs(store, trial, record.folds_sha256, record.n_folds)
        if outputs is None:
            raise plots.PlotSkipped(f"member trial {trial.number}'s fold outputs are unusable: {problem}")
        return outputs
    try:
        return load_trial_outputs(store, trial)
    except (ArtifactNotFound, FileNotFoundError, KeyError):
        raise plots.PlotSkipped(f"member trial {trial.number}'s outputs are not in the artifact store") from None


def _member_outputs(study: optuna.Study, store: ArtifactStore, members: list[Mapping[str, Any]]) -> list[Candidate]:
    """The members as candidates holding their stored outputs; PlotSkipped naming the first one missing."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    candidates = []
    for member in members:
        trial = trials.get(int(member["trial"]))
        if trial is None:
            raise plots.PlotSkipped(f"member trial {member['trial']} is not in study {study.study_name!r}")
        outputs = _stored_outputs(study, store, trial)
        candidates.append(Candidate(trial.number, trial.params, float(member.get("val_accuracy") or 0.0),
                                    str(member.get("weights_artifact", "")), outputs))
    return candidates


def reliability(result: Mapping[str, Any], study: optuna.Study, store: ArtifactStore) -> Figure:
    """The shipped combination's test outputs, binned, at T = 1 and at the recorded T."""
    method, temperature = result.get("method"), result.get("temperature")
    if method not in ("single", "soft", "weighted"):
        raise plots.PlotSkipped(f"method {method!r} ships no mixture of the members' stored probabilities")
    if temperature is None:
        raise plots.PlotSkipped("ensemble.json records no temperature")
    if result.get("split_sha256") != read_study_record(study).split_sha256:
        raise plots.PlotSkipped("the ensemble was built on another split than the study's")
    members = list(result["members"])
    candidates = _member_outputs(study, store, members)
    if len(candidates) == 1:  # the best single trial shipped alone
        outputs = candidates[0].outputs
        mixture = member_log_probs([outputs.test_logits.double().numpy()])[0]
        labels = outputs.test_labels.numpy()
    else:
        try:
            data = stack_outputs(candidates)
        except EnsembleError as err:  # outputs that do not line up
            raise plots.PlotSkipped(str(err)) from None
        mixture = mixture_log_probs(data.test, np.array([float(m["weight"]) for m in members]))
        labels = data.y_test
    panels = []
    for title, log_probs in ((f"before (T=1), {method}", mixture),
                             (f"after (T={float(temperature):.3g})", scale(mixture, float(temperature)))):
        probs = np.exp(log_probs)
        ece = expected_calibration_error(log_probs, labels, RELIABILITY_BINS)
        panels.append((f"{title}: ECE {ece:.4f}", probs.max(axis=1), probs.argmax(axis=1) == labels))
    return plots.reliability_diagram(panels, RELIABILITY_BINS)


def ensemble_builders(result: Mapping[str, Any], study: optuna.Study, store: ArtifactStore) -> list[Builder]:
    """(file name, caption, builder) of the ensemble's figures, in the page's order."""
    members = list(result["members"])
    return [
        (WEIGHTS_FILE, "Ensemble members' weights",
         lambda: plots.member_weights([int(m["trial"]) for m in members], [float(m["weight"]) for m in members],
                                      str(result.get("method")))),
        (RELIABILITY_FILE, f"Ensemble reliability on the test split, before and after its temperature "
         f"({RELIABILITY_BINS} bins, as the table's ECE)", lambda: reliability(result, study, store)),
    ]
