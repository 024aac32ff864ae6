"""The ensemble fits and chooses on the calibration split's outputs, which nothing else chose on.

The members' outputs are drawn from a known law. Validation is where the search picked and ranked: there the
best-ranked trial looks far better than it is (its validation outputs are confident and right, as a trial's
are when validation picked its epoch and ranked it first by luck). On calibration and test it is one more
member like the others. Fitting on validation ships that trial alone; fitting on calibration does not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

from hpsearch.cli._main import main
from hpsearch.ensemble._candidates import Candidate
from hpsearch.ensemble._fit import build_ensemble, single_trial
from hpsearch.store import TrialOutputs
from tests.support import study_of_outputs

SHA = "d" * 64
CLASSES = 10


def _drawn(rng: np.random.Generator, n: int, margin: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits leaning `margin` to a latent class, and labels drawn from their softmax (calibrated)."""
    latent = rng.integers(0, CLASSES, n)
    z = rng.normal(size=(n, CLASSES))
    z[np.arange(n), latent] += margin
    p = np.exp(log_softmax(z, axis=1))
    return z, (p.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1).clip(0, CLASSES - 1)


def lucky_first(seed: int, *, calibration: bool, m: int = 6, n: int = 400, n_test: int = 3000) -> list[TrialOutputs]:
    """m equally good noisy members; the first one's validation outputs are confidently right (the optimism of
    the split that ranked it first), its calibration and test outputs are like everyone's."""
    rng = np.random.default_rng(seed)
    (zv, yv), (zc, yc), (zt, yt) = _drawn(rng, n), _drawn(rng, n), _drawn(rng, n_test)
    out = []
    for i in range(m):
        val = zv + rng.normal(size=zv.shape) * 1.5
        if i == 0:
            val = val + 12.0 * np.eye(CLASSES)[yv]
        noisy = [torch.tensor(z + rng.normal(size=z.shape) * 1.5, dtype=torch.float32) for z in (zc, zt)]
        out.append(TrialOutputs(torch.tensor(val, dtype=torch.float32), noisy[1], SHA, torch.tensor(yv),
                                torch.tensor(yt), calibration_logits=noisy[0] if calibration else None,
                                calibration_labels=torch.tensor(yc) if calibration else None))
    return out


def candidates(outputs: list[TrialOutputs]) -> list[Candidate]:
    return [Candidate(i, {}, 0.9 - 1e-3 * i, f"w{i}", o) for i, o in enumerate(outputs)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fitting_on_calibration_ships_no_lucky_trial_and_beats_it_on_test(seed: int) -> None:
    on_validation = build_ensemble(candidates(lucky_first(seed, calibration=False)), arch="resnet18")
    on_calibration = build_ensemble(candidates(lucky_first(seed, calibration=True)), arch="resnet18")
    # What validation's optimism does: the lucky trial alone, or a weighted ensemble all but made of it.
    assert on_validation.fit_part == "validation"
    assert on_validation.method == "single" or on_validation.weight_fit.weights[0] > 0.9
    assert on_calibration.fit_part == "calibration" and on_calibration.sizes["fit"] == 400
    said = [[n for n in r.notes if n.startswith("no calibration part")] for r in (on_validation, on_calibration)]
    assert len(said[0]) == 1 and not said[1]
    assert on_calibration.method in ("soft", "weighted")
    shipped = on_calibration.row(on_calibration.method)
    assert shipped.nll_scaled < on_calibration.row("single").nll_scaled - 0.05
    assert shipped.accuracy >= on_calibration.row("single").accuracy


def test_a_single_trial_export_fits_its_temperature_on_calibration() -> None:
    result = single_trial(candidates(lucky_first(0, calibration=True))[0], "resnet18")
    assert result.fit_part == "calibration" and result.sizes["fit"] == 400
    # Calibration shows the trial over-confident (its logits carry noise): a T above 1 ships and helps on test.
    row = result.row("single")
    assert result.temperature is not None and result.temperature > 1.2
    assert row.nll_scaled < row.nll - 0.05
    # Validation, where it looked sharp and right, would have fitted no such T.
    on_validation = single_trial(candidates(lucky_first(0, calibration=False))[0], "resnet18")
    assert on_validation.fit_part == "validation" and on_validation.temperature < 1.2


def test_calibration_outputs_round_trip_through_the_store_and_the_cli_records_what_fitted_what(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, url, store_dir = study_of_outputs(tmp_path, "cal", lucky_first(1, calibration=True), CLASSES)
    out = tmp_path / "ens"
    assert main(["ensemble", str(path), "--storage", url, "--artifacts", str(store_dir), "--out", str(out),
                 "--top-k", "6", "--no-export"]) == 0
    assert "cross-fitted on the 400 calibration images" in " ".join(capsys.readouterr().out.split())
    payload = json.loads((out / "ensemble.json").read_text())
    assert payload["method"] in ("soft", "weighted")
    fitting = payload["fitting"]
    assert "400 calibration outputs" in fitting["evidence"]
    assert fitting["selection"].endswith("validation outputs")
    assert "calibration" in (out / "report.md").read_text()


def test_a_calibration_part_with_few_mistakes_says_its_evidence_is_thin() -> None:
    """Members that get nearly every calibration image right leave `auto` little to choose by: a note says so,
    naming the count and the ways to more evidence; with plenty of mistakes it does not."""
    def sharp(o: TrialOutputs) -> TrialOutputs:  # confidently right on every calibration image
        assert o.calibration_logits is not None and o.calibration_labels is not None
        right = 30.0 * torch.nn.functional.one_hot(o.calibration_labels, CLASSES)
        return dataclasses.replace(o, calibration_logits=o.calibration_logits + right)

    thin = build_ensemble(candidates([sharp(o) for o in lucky_first(0, calibration=True)]), arch="resnet18")
    warning = [n for n in thin.notes if n.startswith("thin evidence")]
    assert len(warning) == 1 and "400 calibration images on which the best trial makes 0 mistakes" in warning[0]
    assert "calibration_fraction" in warning[0] and "[data] folds" in warning[0]
    ample = build_ensemble(candidates(lucky_first(0, calibration=True)), arch="resnet18")
    assert not [n for n in ample.notes if n.startswith("thin evidence")]
