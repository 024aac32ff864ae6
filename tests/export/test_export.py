"""The exported ensemble: its manifest and member files, weights deleted while it is written, and the staged folder
it is written through. Loading it and the `predict`/`select` commands are in tests/predict/test_predict.py.

The study is real (created by `search.open_study` on real digits, so its recorded preprocessing is the one
trials use) but not trained: each member is a randomly initialised ResNet-18 whose head is fitted in closed
form (ridge regression on its features), which is accurate enough to make predictions meaningful, in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpsearch.cli._main import main
from hpsearch.errors import EnsembleError
from hpsearch.export import RESULT_FILE, staged_dir
from hpsearch.predict import MANIFEST, SUMS
from hpsearch.store import open_storage
from tests.support import N_MEMBERS, Exported, member_state

# ------------------------------------------------------------------------------------------ the folder


def test_manifest_records_everything_a_stranger_needs(exported: Exported) -> None:
    manifest = json.loads((exported.folder / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["classes"] == [str(c) for c in range(10)]
    p = manifest["preprocessing"]
    assert p["image_size"] == 32 and p["channels"] == "RGB" and p["resize"]["interpolation"] == "bilinear"
    assert p["value_range"] == [0.0, 1.0] and "shorter side" in p["resize"]["policy"]
    assert p["mean"] == pytest.approx(list(exported.pre.mean)) and p["std"] == pytest.approx(list(exported.pre.std))
    assert p["mean"] != pytest.approx([0.485, 0.456, 0.406])  # from scratch: the training split's own stats
    assert manifest["combine"]["method"] == "soft" and manifest["study"] == "tiny"
    assert manifest["storage"] == exported.url
    assert [r["method"] for r in manifest["metrics"]] == ["single", "hard", "soft", "weighted"]
    members = manifest["members"]
    assert sorted(m["trial"] for m in members) == [0, 1] and sum(m["weight"] for m in members) == pytest.approx(1.0)
    for m in members:
        assert m["arch"] == "resnet18" and m["num_classes"] == 10 and "lr" in m["hyperparameters"]
        assert (exported.folder / m["file"]).name == f"member-{m['trial']}.safetensors"
    sums = (exported.folder / SUMS).read_text()
    assert MANIFEST in sums and all(m["file"] in sums for m in members)
    assert not list(exported.folder.glob("*.pt")) and not list(exported.folder.glob("*.pkl"))


def test_the_model_card_says_what_it_is_and_its_code_reproduces_the_export(exported: Exported,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import hpsearch

    card = (exported.folder / "README.md").read_text()
    manifest = json.loads((exported.folder / MANIFEST).read_text())
    assert card.startswith("# tiny: soft (2 members)")
    assert "10 classes, in output order: `0`, `1`" in card and str(manifest["preprocessing"]["mean"]) in card
    assert "## Held-out metrics" in card and "never for a fit or a choice" in card
    assert "## Which data fitted what" in card and "- temperature: " in card
    assert "README.md" in (exported.folder / SUMS).read_text()  # `sha256sum -c` covers the card too
    # The card's plain-torchvision lines, run as a stranger would in the folder, give load_ensemble's probabilities.
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    images = exported.pre(exported.pool_images[:16])
    monkeypatch.chdir(exported.folder)
    scope: dict[str, object] = {"x": images}
    with torch.no_grad():
        exec(code, scope)  # the card's own code: running it is the point
        expected = hpsearch.load_ensemble(exported.folder)(images)
    assert torch.allclose(scope["probs"].float(), expected, atol=1e-5)


def test_export_trial_writes_one_trial_the_same_way(exported: Exported, tmp_path: Path, capsys) -> None:
    import hpsearch

    common = [str(exported.tmp / "tiny.toml"), "--storage", exported.url, "--artifacts", str(exported.store)]
    out = tmp_path / "one"
    assert main(["export", *common, "--trial", "1", "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["combine"]["method"] == "single" and [m["trial"] for m in manifest["members"]] == [1]
    assert manifest["fitting"]["choice"] == "asked for with --method single" and (out / "README.md").is_file()
    t = manifest["combine"]["temperature"]
    model = hpsearch.load_ensemble(out)
    images = exported.pre(exported.pool_images[:8])
    with torch.no_grad():
        alone = model.members[0](images).double().softmax(-1)
        assert torch.allclose(model(images).double(), (alone.log() / t).softmax(-1), atol=1e-5)
    capsys.readouterr()
    assert main(["export", *common, "--trial", "7", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "--trial 7" in err and "does not exist" in err and "Traceback" not in err


def test_member_loads_strict_into_plain_torchvision(exported: Exported) -> None:
    from torchvision import models

    model = models.get_model("resnet18", num_classes=10)
    model.load_state_dict(load_file(str(exported.folder / "member-1.safetensors")), strict=True)
    stored = member_state(exported, 1)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())


def test_weights_deleted_during_an_export_are_one_line(exported: Exported, tmp_path: Path, monkeypatch,
                                                       capsys) -> None:
    """The last window of the keep_weights race (a worker that read the pins just before the export set them):
    one line naming the trial and what to do, exit 2, and the pins released."""
    import optuna

    import hpsearch.export._ensemble_command
    from hpsearch.store import pinned

    store = shutil.copytree(exported.store, tmp_path / "store")
    study = optuna.load_study(study_name="tiny", storage=open_storage(exported.url))
    doomed = store / study.trials[0].user_attrs["weights_artifact"]

    def worker_deletes(point: str) -> None:
        assert point == "ensemble" and len(pinned(study.user_attrs)) == N_MEMBERS
        doomed.unlink()

    monkeypatch.setattr(hpsearch.export._ensemble_command, "hold_at", worker_deletes)
    rc = main(["ensemble", str(exported.tmp / "tiny.toml"), "--storage", exported.url, "--artifacts", str(store),
               "--out", str(tmp_path / "ens"), "--method", "soft"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "trial 0's weights were deleted (keep_weights of a running worker) while this ensemble was exported; " \
           "run `hpsearch ensemble` again" in err.replace("\n", " ")
    assert "Traceback" not in err
    assert not (tmp_path / "ens").exists(), "no half-written export"
    assert not pinned(study.user_attrs)


# ----------------------------------------------------------------------------------- the staged folder


def test_staged_dir_replaces_an_old_ensemble_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "ens"
    with staged_dir(target) as folder:
        (folder / RESULT_FILE).write_text("1")
    with staged_dir(target) as folder:
        (folder / RESULT_FILE).write_text("2")
    assert (target / RESULT_FILE).read_text() == "2"
    with pytest.raises(RuntimeError), staged_dir(target) as folder:
        (folder / RESULT_FILE).write_text("3")
        raise RuntimeError("boom")
    assert (target / RESULT_FILE).read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens"]


def test_staged_dir_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(EnsembleError, match="not an ensemble folder"), staged_dir(tmp_path / "mine"):
        pass
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
