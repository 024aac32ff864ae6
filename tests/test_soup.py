"""Greedy model soups (`hpsearch ensemble --method soup`) and test-time augmentation (`predict --tta`).

The studies are real (created by `search.open_study` on real digits, with a local "pretrained" weights file:
a ResNet-18 state dict written to tmp) and their trials start from that file. Instead of training, each trial
is the same fine-tuned model (backbone from the file, head fitted in closed form) moved by a known
perturbation of its head, so the validation outcome of averaging is known in advance:

- trials A = base + d and B = base - d average exactly to base, which beats both (the soup is kept);
- trial C = base + a large perturbation ruins any average it joins (greedy leaves it out);
- a study of base and C only: nothing can join base, the soup is base alone, it is not kept.

One slow test runs real 1-epoch trials from the file through `hpsearch run` and checks the decision follows
the validation numbers the soup reports.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import fit_head, tiny_tables, write_study
from hpsearch.cli._main import main
from hpsearch.config import read_study_file
from hpsearch.ensemble._soup import SoupError, SoupStep, average_states, check_same_start, greedy_soup, soup_decision
from hpsearch.errors import TTAError
from hpsearch.keys import INIT_WEIGHTS as ATTR_INIT_WEIGHTS
from hpsearch.model import build_model, init_weights_tag
from hpsearch.predict import MANIFEST, SUMS, load_ensemble, sha256_file
from hpsearch.predict._tta import crop_shifts, manifest_augment, shift, tta_views
from hpsearch.preprocess import Preprocess, decode_image
from hpsearch.search._objective import suggest
from hpsearch.search._study import open_study, prepare
from hpsearch.store import StudyArtifacts, TrialOutputs, open_artifact_store, open_storage, upload_trial_artifacts

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Lab:
    tmp: Path
    init: Path  # the shared "pretrained" weights file
    url: str
    store: Path
    base: State  # the fine-tuned model every perturbed trial is built around
    pre: Preprocess
    test_images: torch.Tensor  # uint8, split order
    test_x: torch.Tensor  # preprocessed


def _perturbed(base: State, sigma: float, seed: int, sign: float = 1.0) -> State:
    state = {k: v.clone() for k, v in base.items()}
    noise = torch.randn(state["fc.weight"].shape, generator=torch.Generator().manual_seed(seed))
    state["fc.weight"] += sign * sigma * float(base["fc.weight"].std()) * noise
    return state


def _study_file(tmp: Path, name: str, weights: str) -> Path:
    return write_study(tmp / f"{name}.toml", tiny_tables(name, data={"subset": 300}, model={"weights": weights}))


def _make_study(lab: Lab, name: str, states: Sequence[State], weights: str | None = None,
                init_tags: Sequence[str | None] | None = None, archs: Sequence[str] | None = None) -> Path:
    """A real study whose trials carry `states` as their weights, outputs computed from them."""
    from torchvision import models

    path = _study_file(lab.tmp, name, weights or str(lab.init))
    cfg = read_study_file(path)
    prepared = prepare(cfg)
    storage = open_storage(lab.url)
    study = open_study(cfg, storage, prepared, lab.store)
    pool, split = prepared.pool, prepared.split
    x = {k: lab.pre(pool.images[torch.from_numpy(getattr(split, k))]) for k in ("val", "test")}
    y = {k: pool.labels[torch.from_numpy(getattr(split, k))] for k in ("val", "test")}
    files = StudyArtifacts(open_artifact_store(lab.store), storage, study.study_name, str(lab.store))
    for i, state in enumerate(states):
        trial = study.ask()
        suggest(trial, cfg.space)
        tag = init_tags[i] if init_tags is not None else init_weights_tag(cfg.model)
        if tag is not None:
            trial.set_user_attr(ATTR_INIT_WEIGHTS, tag)
        model = models.get_model(archs[i] if archs else "resnet18", num_classes=10)
        model.load_state_dict(state)
        with torch.no_grad():
            val, test = model.eval()(x["val"]), model(x["test"])
        upload_trial_artifacts(files, trial, state, TrialOutputs(val, test, split.sha256(), y["val"], y["test"]),
                               {"arch": "resnet18"})
        study.tell(trial, float((val.argmax(1) == y["val"]).float().mean()))
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    from torchvision import models

    tmp = tmp_path_factory.mktemp("soup")
    torch.manual_seed(0)
    init = tmp / "init.safetensors"
    save_file(models.resnet18().state_dict(), str(init))  # a "pretrained" ImageNet-shaped checkpoint
    cfg = read_study_file(_study_file(tmp, "probe", str(init)))
    prepared = prepare(cfg)
    pre = Preprocess(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # pretrained: ImageNet statistics
    pool, split = prepared.pool, prepared.split
    model = build_model(cfg.model, 10, 32).eval()  # backbone from the file, new head
    train = torch.from_numpy(split.train)
    fit_head(model, pre(pool.images[train]), pool.labels[train], 10)
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    test_images = pool.images[torch.from_numpy(split.test)]
    return Lab(tmp, init, f"sqlite:///{tmp / 'study.db'}", tmp / "artifacts", base, pre, test_images,
               pre(test_images))


def _ensemble(lab: Lab, path: Path, out: Path, *extra: str) -> int:
    return main(["ensemble", str(path), "--storage", lab.url, "--artifacts", str(lab.store), "--out", str(out),
                 "--device", "cpu", *extra])


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
    a, b = _perturbed(lab.base, 0.2, seed=1), _perturbed(lab.base, 0.2, seed=1, sign=-1.0)
    c = _perturbed(lab.base, 3.0, seed=2)
    path = _make_study(lab, "soup-kept", [a, b, c])
    out = tmp_path / "ens"
    assert _ensemble(lab, path, out, "--method", "soup", "--top-k", "3") == 0
    result = json.loads((out / "ensemble.json").read_text())
    soup = result["soup"]
    assert result["method"] == "soup" and soup["kept"] is True
    assert sorted(soup["ingredients"]) == [0, 1]  # A and B; C ruins the average and stays out
    assert [s["added"] for s in soup["steps"]] == [True, True, False]
    rows = {r["method"]: r for r in result["metrics"]}
    assert list(rows) == ["single", "hard", "soft", "weighted", "soup"]
    # The decision follows validation: the soup beats the best single trial there (re-run and stored agree).
    assert rows["soup"]["val_accuracy"] > rows["single"]["val_accuracy"]
    assert rows["soup"]["val_accuracy"] == pytest.approx(soup["steps"][1]["val_accuracy"])
    assert rows["single"]["val_accuracy"] == pytest.approx(soup["steps"][0]["val_accuracy"])
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
    path = _make_study(lab, "soup-refused", [lab.base, _perturbed(lab.base, 3.0, seed=2)])
    out = tmp_path / "ens"
    assert _ensemble(lab, path, out, "--method", "soup") == 0
    stdout = capsys.readouterr().out
    assert "greedy soup (#0) [not kept]" in stdout and "greedy soup not kept" in stdout
    result = json.loads((out / "ensemble.json").read_text())
    assert result["method"] == "weighted" and result["soup"]["kept"] is False
    assert result["soup"]["ingredients"] == [0]
    assert [r["method"] for r in result["metrics"]][-1] == "soup"
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["combine"]["method"] == "weighted"
    assert all(m["file"].startswith("member-") for m in manifest["members"])


def test_random_initialisations_are_refused(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _make_study(lab, "soup-none", [lab.base, _perturbed(lab.base, 0.1, seed=3)], weights="none")
    out = tmp_path / "ens"
    assert _ensemble(lab, path, out, "--method", "soup") == 2
    err = capsys.readouterr().err
    assert "model.weights = none" in err and "meaningless" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_another_architecture_is_refused(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchvision import models

    other = {k: v.contiguous() for k, v in models.resnet34(num_classes=10).state_dict().items()}
    path = _make_study(lab, "soup-arch", [lab.base, other], archs=["resnet18", "resnet34"])
    assert _ensemble(lab, path, tmp_path / "ens", "--method", "soup") == 2
    err = capsys.readouterr().err
    assert "another architecture" in err and "Traceback" not in err


def test_trials_that_recorded_other_starting_weights_are_refused(lab: Lab, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = _make_study(lab, "soup-start", [lab.base, lab.base], init_tags=["file sha256:aa", "file sha256:bb"])
    assert _ensemble(lab, path, tmp_path / "ens", "--method", "soup") == 2
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
    assert rows["soup"]["val_accuracy"] == pytest.approx(last["val_accuracy"])
    acc = base["val_accuracy"]
    for step in soup["steps"][1:]:  # a trial joined exactly when the soup's validation accuracy did not drop
        assert step["added"] is (step["val_accuracy"] >= acc)
        acc = step["val_accuracy"] if step["added"] else acc


# ---------------------------------------------------------------------------------------------------- TTA


def _asymmetric(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.arange(n * 3 * size * size, dtype=torch.float32).reshape(n, 3, size, size).sin()


def _contains(views: Sequence[torch.Tensor], x: torch.Tensor) -> bool:
    return any(torch.equal(v, x) for v in views)


def test_tta_without_flip_never_flips() -> None:
    x = _asymmetric()
    for augment in (["crop"], ["crop", "cutout"], ["cutout"], []):
        views = tta_views(x, augment)
        assert torch.equal(views[0], x)
        assert not _contains(views, x.flip(-1)), augment
        for view in views:  # no view is a mirror image of any shift of x either
            assert not any(torch.equal(view, shift(x, dy, dx).flip(-1)) for dy, dx in [(0, 0), *crop_shifts(16)])
    assert len(tta_views(x, ["crop"])) == 5 and len(tta_views(x, ["cutout"])) == 1


def test_tta_with_flip_mirrors_every_view() -> None:
    x = _asymmetric()
    assert len(tta_views(x, ["flip"])) == 2 and _contains(tta_views(x, ["flip"]), x.flip(-1))
    views = tta_views(x, ["crop", "flip"])
    assert len(views) == 10 and _contains(views, x.flip(-1))
    assert all(_contains(views, v.flip(-1)) for v in views)
    assert all(torch.equal(a, b) for a, b in zip(views, tta_views(x, ["flip", "crop"]), strict=True))  # fixed


def test_shift_moves_content_with_reflect_padding() -> None:
    x = _asymmetric(1, 8)
    assert crop_shifts(8) == [(-1, 0), (1, 0), (0, -1), (0, 1)] and crop_shifts(32)[1] == (2, 0)
    down = shift(x, 1, 0)
    assert torch.equal(down[..., 1:, :], x[..., :-1, :]) and torch.equal(down[..., 0, :], x[..., 1, :])
    right = shift(x, 0, -1)
    assert torch.equal(right[..., :, :-1], x[..., :, 1:])


def test_manifest_without_augment_is_refused_for_tta() -> None:
    assert manifest_augment({"preprocessing": {"augment": ["crop", "flip"]}}) == ("crop", "flip")
    with pytest.raises(TTAError, match="records no training augmentations"):
        manifest_augment({"preprocessing": {}})


def _pngs(lab: Lab, folder: Path, n: int = 12) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(lab.test_images[:n]):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def weighted_export(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = _make_study(lab, "tta", [lab.base, _perturbed(lab.base, 0.1, seed=4)])
    out = tmp_path_factory.mktemp("tta") / "ens"
    assert _ensemble(lab, path, out, "--method", "soft") == 0
    return out


def test_predict_tta_writes_the_csv(lab: Lab, weighted_export: Path, tmp_path: Path) -> None:
    manifest = json.loads((weighted_export / MANIFEST).read_text())
    assert manifest["preprocessing"]["augment"] == ["crop"]  # the study's own
    pngs = _pngs(lab, tmp_path / "pngs")
    plain, tta = tmp_path / "plain.csv", tmp_path / "tta.csv"
    assert main(["predict", str(weighted_export), str(tmp_path / "pngs"), "--out", str(plain)]) == 0
    assert main(["predict", str(weighted_export), str(tmp_path / "pngs"), "--tta", "--out", str(tta)]) == 0
    rows = list(csv.DictReader(io.StringIO(tta.read_text())))
    assert [r["path"] for r in rows] == [str(p) for p in pngs]
    for r in rows:
        assert sum(float(r[f"p_{c}"]) for c in range(10)) == pytest.approx(1.0, abs=1e-4)
    assert tta.read_text() != plain.read_text()  # the shifted views change the probabilities
    again = tmp_path / "again.csv"
    assert main(["predict", str(weighted_export), *map(str, pngs), "--tta", "--out", str(again)]) == 0
    assert again.read_text() == tta.read_text()  # deterministic
    # By hand: each member's softmax averaged over the 5 crop views, then the manifest's combination.
    ensemble = load_ensemble(weighted_export)
    x = ensemble.preprocess(torch.stack([decode_image(p, 32) for p in pngs]))  # what predict decodes
    with torch.no_grad():
        member = torch.stack([ensemble.member_probs(v) for v in tta_views(x, ["crop"])]).mean(0)
        expected = ensemble.combine(member)
    got = torch.tensor([[float(r[f"p_{c}"]) for c in range(10)] for r in rows], dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-5)


def test_predict_tta_on_an_export_without_augment_exits_2(lab: Lab, weighted_export: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "old"
    shutil.copytree(weighted_export, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["preprocessing"]["augment"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    sums = [line.split("  ") for line in (folder / SUMS).read_text().splitlines()]
    (folder / SUMS).write_text("".join(f"{sha256_file(folder / name)}  {name}\n" for _, name in sums))
    pngs = _pngs(lab, tmp_path / "pngs", 2)
    assert main(["predict", str(folder), *map(str, pngs), "--tta"]) == 2
    assert "records no training augmentations" in capsys.readouterr().err
    assert main(["predict", str(folder), *map(str, pngs)]) == 0  # without --tta the old export still works
