"""Greedy model soups (`hpsearch ensemble --method soup`); test-time augmentation is in tests/predict/test_tta.py.

The studies are real (created by `search.open_study` on real digits, with a local "pretrained" weights file:
a ResNet-18 state dict written to tmp) and their trials start from that file. Instead of training, each trial
is the same fine-tuned model (backbone from the file, head fitted in closed form) moved by a known
perturbation of its head (the `lab` fixture, tests/support/_lab.py), so the validation outcome of averaging is known
in advance:

- trials A = base + d and B = base - d average exactly to base, which beats both (the soup is kept);
- trial C = base + a large perturbation ruins any average it joins (greedy leaves it out);
- a study of base and C only: nothing can join base, the soup is base alone, it is not kept.

One slow test runs real 1-epoch trials from the file through `hpsearch run` and checks the decision follows
the validation numbers the soup reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hpsearch.archs import trial_arch
from hpsearch.cli._main import main
from hpsearch.ensemble._soup import (
    SoupError,
    SoupStep,
    average_states,
    check_one_arch,
    check_same_start,
    greedy_soup,
    soup_decision,
)
from hpsearch.keys import INIT_WEIGHTS as ATTR_INIT_WEIGHTS
from hpsearch.predict import MANIFEST, SUMS, load_ensemble, sha256_file
from hpsearch.store import open_storage
from tests.support import Lab, State, lab_ensemble, lab_study, perturbed, tiny_tables, write_study

# ------------------------------------------------------------------------------------------ pure parts


def test_average_states_is_the_mean_and_keeps_integer_buffers() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    avg = average_states([a, b])
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and avg["w"].dtype == torch.float32
    assert int(avg["n"]) == 3


def test_greedy_soup_adds_when_validation_accuracy_does_not_drop() -> None:
    states = {t: {"w": torch.tensor([float(t)])} for t in (1, 2, 3, 4)}
    # accuracy of a soup = 1 - |mean weight - 2| / 10: trial 3 pulls the mean away, 2 keeps it, 4 too far
    def evaluate(s: State) -> tuple[float, float]:
        return 1 - abs(float(s["w"]) - 2) / 10, 0.0

    ingredients, soup, steps = greedy_soup([2, 1, 3, 4], states.__getitem__, evaluate)
    # 2 alone: 1.0; +1 -> mean 1.5: 0.95 (drop, no); +3 -> 2.5: 0.95 (no); +4 -> 3: 0.9 (no)
    assert ingredients == [2] and [s.added for s in steps] == [True, False, False, False]
    ingredients, soup, steps = greedy_soup([1, 3, 2, 4], states.__getitem__, evaluate)
    # 1 alone: 0.9; +3 -> 2: 1.0 (yes); +2 -> 2: 1.0 (equal: yes); +4 -> 2.5: 0.95 (no)
    assert ingredients == [1, 3, 2] and float(soup["w"]) == pytest.approx(2.0)
    assert [s.added for s in steps] == [True, True, True, False]


def test_soup_decision_keeps_only_a_soup_that_beats_the_best_single() -> None:
    base = SoupStep(1, 0.8, 0.5, True)
    assert soup_decision([1], [base, SoupStep(2, 0.7, 0.6, False)])[0] is False
    assert soup_decision([1, 2], [base, SoupStep(2, 0.85, 0.6, True)])[0] is True
    assert soup_decision([1, 2], [base, SoupStep(2, 0.8, 0.4, True)])[0] is True  # same accuracy, lower NLL
    kept, reason = soup_decision([1, 2], [base, SoupStep(2, 0.8, 0.6, True)])
    assert kept is False and "does not beat" in reason


def test_trials_from_different_starting_weights_are_refused() -> None:
    check_same_start({1: "file sha256:aa", 2: "file sha256:aa", 3: None})
    with pytest.raises(SoupError, match="trial 1 started from file sha256:aa but trial 2 from ResNet18"):
        check_same_start({1: "file sha256:aa", 2: "ResNet18_Weights.IMAGENET1K_V1"})
    with pytest.raises(SoupError, match="random initialisation"):
        check_same_start({1: "none", 2: "none"})


# ---------------------------------------------------------------------------------------- real studies


def test_soup_that_beats_the_best_single_is_kept_and_exported_as_one_member(lab: Lab, tmp_path: Path) -> None:
    a, b = perturbed(lab.base, 0.2, seed=1), perturbed(lab.base, 0.2, seed=1, sign=-1.0)
    c = perturbed(lab.base, 3.0, seed=2)
    path = lab_study(lab, "soup-kept", [a, b, c])
    out = tmp_path / "ens"
    assert lab_ensemble(lab, path, out, "--method", "soup", "--top-k", "3") == 0
    result = json.loads((out / "ensemble.json").read_text())
    soup = result["soup"]
    assert result["method"] == "soup" and soup["kept"] is True
    assert sorted(soup["ingredients"]) == [0, 1]  # A and B; C ruins the average and stays out
    assert [s["added"] for s in soup["steps"]] == [True, True, False]
    rows = {r["method"]: r for r in result["metrics"]}
    assert list(rows) == ["single", "hard", "soft", "weighted", "soup"]
    # The decision follows validation: the soup beats the best single trial there, re-run. Its row, like every
    # row, is measured on the calibration split, which no decision used.
    assert soup["steps"][1]["val_accuracy"] > soup["steps"][0]["val_accuracy"]
    assert rows["soup"]["fit_accuracy"] >= rows["single"]["fit_accuracy"]
    assert "calibration outputs" in result["fitting"]["evidence"]
    assert rows["soup"]["test_accuracy"] is not None and rows["soup"]["test_nll"] is not None
    report = (out / "report.md").read_text()
    assert "greedy soup (#" in report and "## Greedy soup" in report and "Kept:" in report

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["combine"]["method"] == "soup" and len(manifest["members"]) == 1
    member = manifest["members"][0]
    assert member["file"] == "soup.safetensors" and sorted(member["soup"]["ingredients"]) == [0, 1]
    assert "soup.safetensors" in (out / SUMS).read_text()
    ensemble = load_ensemble(out)
    with torch.no_grad():
        got = ensemble(lab.test_x).double()
    from torchvision import models

    model = models.get_model("resnet18", num_classes=10)
    model.load_state_dict(average_states([a, b]))
    with torch.no_grad():
        expected = (model.eval()(lab.test_x).double() / (manifest["temperature"] or 1.0)).softmax(-1)
    assert torch.allclose(got, expected, atol=1e-5)


def test_soup_that_does_not_help_is_not_kept(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = lab_study(lab, "soup-refused", [lab.base, perturbed(lab.base, 3.0, seed=2)])
    out = tmp_path / "ens"
    assert lab_ensemble(lab, path, out, "--method", "soup") == 0
    stdout = capsys.readouterr().out
    assert "greedy soup (#0) [not kept]" in stdout and "greedy soup not kept" in stdout
    result = json.loads((out / "ensemble.json").read_text())
    # not kept: the export is what --method auto ships, chosen by its cross-fitted held-out NLL
    assert result["method"] in ("single", "soft", "weighted") and result["soup"]["kept"] is False
    assert result["soup"]["ingredients"] == [0]
    assert [r["method"] for r in result["metrics"]][-1] == "soup"
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["combine"]["method"] == result["method"]
    assert all(m["file"].startswith("member-") for m in manifest["members"])


def test_random_initialisations_are_refused(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = lab_study(lab, "soup-none", [lab.base, perturbed(lab.base, 0.1, seed=3)], weights="none")
    out = tmp_path / "ens"
    assert lab_ensemble(lab, path, out, "--method", "soup") == 2
    err = capsys.readouterr().err
    assert "model.weights = none" in err and "meaningless" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_another_architecture_is_refused(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchvision import models

    other = {k: v.contiguous() for k, v in models.resnet34(num_classes=10).state_dict().items()}
    path = lab_study(lab, "soup-arch", [lab.base, other], archs=["resnet18", "resnet34"])
    assert lab_ensemble(lab, path, tmp_path / "ens", "--method", "soup") == 2
    err = capsys.readouterr().err
    assert "another architecture" in err and "Traceback" not in err


def test_trials_that_recorded_other_starting_weights_are_refused(lab: Lab, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = lab_study(lab, "soup-start", [lab.base, lab.base], init_tags=["file sha256:aa", "file sha256:bb"])
    assert lab_ensemble(lab, path, tmp_path / "ens", "--method", "soup") == 2
    assert "started from file sha256:aa but trial 1 from file sha256:bb" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.inprocess
def test_real_trials_from_one_weights_file(lab: Lab, tmp_path: Path) -> None:
    """Real 1-epoch trials from the shared file through `hpsearch run`; the decision follows validation."""
    path = write_study(tmp_path / "real.toml", tiny_tables(
        "soup-real", study={"n_trials": 3}, data={"subset": 300},
        model={"weights": str(lab.init)}, space={"lr": [1e-4, 3e-4], "optimizer": ["adam"]}))
    url, store = f"sqlite:///{tmp_path / 'real.db'}", tmp_path / "artifacts"
    assert main(["run", str(path), "--storage", url, "--artifacts", str(store), "--device", "cpu"]) == 0
    import optuna

    study = optuna.load_study(study_name="soup-real", storage=open_storage(url))
    assert {t.user_attrs[ATTR_INIT_WEIGHTS] for t in study.trials} == {f"file sha256:{sha256_file(lab.init)}"}
    out = tmp_path / "ens"
    assert main(["ensemble", str(path), "--storage", url, "--artifacts", str(store), "--out", str(out),
                 "--method", "soup", "--top-k", "3", "--device", "cpu"]) == 0
    result = json.loads((out / "ensemble.json").read_text())
    soup, rows = result["soup"], {r["method"]: r for r in result["metrics"]}
    assert "soup" in rows and len(soup["steps"]) == 3
    last = next(s for s in reversed(soup["steps"]) if s["added"])
    base = soup["steps"][0]
    beats = len(soup["ingredients"]) > 1 and (last["val_accuracy"] > base["val_accuracy"] or (
        last["val_accuracy"] == base["val_accuracy"] and last["val_nll"] < base["val_nll"]))
    assert soup["kept"] is beats and result["method"] == ("soup" if beats else "weighted")
    assert rows["soup"]["fit_accuracy"] is not None and "calibration outputs" in result["fitting"]["evidence"]
    acc = base["val_accuracy"]
    for step in soup["steps"][1:]:  # a trial joined exactly when the soup's validation accuracy did not drop
        assert step["added"] is (step["val_accuracy"] >= acc)
        acc = step["val_accuracy"] if step["added"] else acc


# ---------------------------------------------------------------------------------------------------- TTA




def test_a_soup_refuses_trials_of_two_archs_in_one_line() -> None:
    # [space] arch draws one per trial (its parameter `arch`); a trial without one trained [model] arch.
    archs = {t: trial_arch("resnet18", params) for t, params in
             {3: {}, 5: {"arch": "resnet18"}, 7: {"arch": "timm:test_convnext"}}.items()}
    assert check_one_arch({3: archs[3], 5: archs[5]}) == "resnet18"
    with pytest.raises(SoupError) as info:
        check_one_arch(archs)
    text = str(info.value)
    assert "\n" not in text and "trial 3 trained resnet18 but trial 7 timm:test_convnext" in text
    assert "--method weighted, soft or hard" in text
