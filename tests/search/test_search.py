"""The search itself, through its public functions, on real storages: what a finished study holds, resuming,
refusing a changed space, and the three ways a trial can end other than COMPLETE (diverged, pruned, crashed)."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
import torch
import torchvision
from optuna.artifacts import FileSystemArtifactStore, download_artifact
from optuna.trial import TrialState
from safetensors import safe_open
from safetensors.torch import load_file

from hpsearch import keys
from hpsearch.cli._main import main
from hpsearch.config import ConfigError, StudyConfig, parse_study, read_study_file
from hpsearch.errors import StudyRecordError
from hpsearch.search._callbacks import StopAfterFailures
from hpsearch.search._objective import Objective, Prepared
from hpsearch.search._run import run_trials
from hpsearch.search._study import config_change, open_study, prepare
from hpsearch.store import (
    StudyArtifacts,
    best_trial,
    finished_trials,
    load_trial_outputs,
    load_trial_weights,
    open_artifact_store,
    open_storage,
    redact,
)
from hpsearch.train import predict_logits
from tests.support import STORAGES_AND_PROXY, dashboard_artifacts, dashboard_http, tiny_tables

CPU = torch.device("cpu")
BRANCH_PARAMS = {
    "step": {"step_size", "step_gamma"},
    "exponential": {"exp_gamma"},
    "plateau": {"plateau_factor", "plateau_patience"},
    "none": set(),
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These models are tiny: one thread is as fast as two, and does not spin-wait when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def start(path: Path, url: str, artifacts: Path) -> tuple[StudyConfig, Prepared, optuna.Study, Objective]:
    """What one `hpsearch run` process does before its first trial."""
    cfg = read_study_file(path)
    prepared = prepare(cfg)
    storage = open_storage(url)
    study = open_study(cfg, storage, prepared, artifacts)
    files = StudyArtifacts(open_artifact_store(artifacts), storage, study.study_name, str(artifacts))
    return cfg, prepared, study, Objective(cfg, prepared, CPU, files)


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials(deepcopy=False)]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


# ------------------------------------------------------------------------------------ a whole study


@pytest.mark.slow
@pytest.mark.inprocess
def test_tiny_study_end_to_end_then_resume(storage_url, study_file, tmp_path, capsys):
    path = study_file("tiny", study={"seed": 7})
    artifacts = tmp_path / "artifacts"
    _, prepared, study, objective = start(path, storage_url, artifacts)

    guard = run_trials(study, objective, 2)

    assert not guard.tripped
    study = optuna.load_study(study_name="tiny", storage=open_storage(storage_url))  # what a reader sees
    assert states(study) == [TrialState.COMPLETE] * 2
    assert study.metric_names == ["val_accuracy"]
    assert study.user_attrs["split_sha256"] == prepared.split.sha256()
    assert study.user_attrs["split_sizes"] == prepared.split.sizes()
    assert study.user_attrs["artifacts_dir"] == str(artifacts)
    assert study.user_attrs["space"]["lr"] == [1e-3, 3e-3]
    assert not [key for key in study.user_attrs if "test" in key.lower()]

    store = FileSystemArtifactStore(str(artifacts))
    with dashboard_http(storage_url, artifacts) as get:  # what the dashboard lists for each trial
        listed = dashboard_artifacts(get, open_storage(storage_url).get_study_id_from_name("tiny"))
    sizes = prepared.split.sizes()
    val_labels = prepared.pool.labels[torch.as_tensor(prepared.split.val)]
    for trial in study.trials:
        p = trial.params
        assert set(p) == {"lr", "optimizer", "scheduler", "dropout"} | BRANCH_PARAMS[p["scheduler"]]
        assert 1e-3 <= p["lr"] <= 3e-3 and 0.0 <= p["dropout"] <= 0.3
        assert p["optimizer"] in ("adam", "rmsprop") and p["scheduler"] in ("step", "exponential", "plateau")

        attrs = trial.user_attrs
        assert attrs["seed"] == 7 + trial.number
        assert attrs["best_epoch"] == 0
        assert not [key for key in attrs if "test" in key.lower()], attrs
        # One epoch: one intermediate value, and it is the validation accuracy, not anything else.
        assert list(trial.intermediate_values) == [0]
        assert trial.intermediate_values[0] == pytest.approx(trial.value)

        # Both files are listed for the trial in the dashboard ...
        assert listed[trial.number] == {attrs["weights_artifact"], attrs["outputs_artifact"]}

        # ... and download to exactly the bytes in the store.
        weights_path = tmp_path / f"weights-{trial.number}.safetensors"
        download_artifact(artifact_store=store, artifact_id=attrs["weights_artifact"], file_path=str(weights_path))
        assert weights_path.read_bytes() == (artifacts / attrs["weights_artifact"]).read_bytes()
        with safe_open(str(weights_path), framework="pt") as f:
            assert f.metadata() == {"arch": "resnet18", "num_classes": "10", "trial": str(trial.number)}

        weights = load_trial_weights(store, trial)
        assert weights.keys() == load_file(str(weights_path)).keys()
        model = torchvision.models.get_model("resnet18", num_classes=10)
        model.load_state_dict(weights, strict=True)
        outputs = load_trial_outputs(store, trial)
        assert outputs.split_sha256 == study.user_attrs["split_sha256"]
        assert tuple(outputs.val_logits.shape) == (sizes["val"], 10)
        assert tuple(outputs.test_logits.shape) == (sizes["test"], 10)
        calibration = torch.as_tensor(prepared.split.calibration)  # only the ensemble reads its outputs
        assert outputs.calibration_logits is not None and tuple(outputs.calibration_logits.shape) == (
            sizes["calibration"], 10) and sizes["calibration"] > 0
        assert torch.equal(outputs.calibration_labels, prepared.pool.labels[calibration])
        assert torch.isfinite(outputs.test_logits).all()
        assert torch.equal(outputs.val_labels, val_labels)
        assert torch.equal(outputs.test_labels, prepared.pool.labels[torch.as_tensor(prepared.split.test)])
        # Test outputs are stored for the ensemble's report, but no test metric is recorded anywhere.
        test_accuracy = accuracy(outputs.test_logits, outputs.test_labels)
        if test_accuracy != pytest.approx(trial.value):
            numbers = [v for v in [*attrs.values(), *trial.intermediate_values.values()] if isinstance(v, float)]
            assert test_accuracy not in numbers
        # The stored value is the accuracy of the stored validation logits ...
        assert accuracy(outputs.val_logits, val_labels) == pytest.approx(trial.value)
        # ... and the stored weights reproduce those logits in a plain torchvision model.
        logits = predict_logits(model, objective.data.val, objective.data.preprocess, 512)
        torch.testing.assert_close(logits, outputs.val_logits, rtol=1e-4, atol=1e-4)

    # Resume: a later `hpsearch run` with a larger budget runs only the missing trial. No --artifacts: the
    # store the study recorded is used.
    before = {t.number: (t.datetime_complete, t.value, t.params) for t in study.trials}
    capsys.readouterr()
    assert main(["run", str(path), "--storage", storage_url, "--n-trials", "3"]) == 0
    assert "trial 2 COMPLETE" in capsys.readouterr().err
    study = optuna.load_study(study_name="tiny", storage=open_storage(storage_url))
    assert states(study) == [TrialState.COMPLETE] * 3
    assert {t.number: (t.datetime_complete, t.value, t.params) for t in study.trials[:2]} == before
    new = study.trials[2]
    assert new.user_attrs["seed"] == 7 + 2
    assert new.params != study.trials[0].params and new.params != study.trials[1].params
    assert (artifacts / new.user_attrs["weights_artifact"]).is_file()
    assert load_trial_outputs(store, new).split_sha256 == prepared.split.sha256()

    # Already done: neither the CLI nor the library starts another trial.
    assert main(["run", str(path), "--storage", storage_url, "--n-trials", "3"]) == 0
    _, _, study, objective = start(path, storage_url, artifacts)
    assert not run_trials(study, objective, 3).tripped
    assert not run_trials(study, objective, 2).tripped
    assert len(study.trials) == 3 and finished_trials(study) == 3


@pytest.mark.parametrize("storage_url", STORAGES_AND_PROXY, indirect=True)
def test_resume_refuses_a_changed_space(storage_url, study_file, tmp_path, capsys):
    cfg = read_study_file(study_file("tiny"))
    prepared = prepare(cfg)
    artifacts = tmp_path / "artifacts"
    open_study(cfg, open_storage(storage_url), prepared, artifacts)

    changed = read_study_file(study_file("tiny", space={"lr": [1e-4, 3e-3]}))
    with pytest.raises(ConfigError) as raised:
        open_study(changed, open_storage(storage_url), prepared, artifacts)
    message = str(raised.value)
    assert raised.value.field == "space"
    assert "space.lr" in message and "0.0001" in message
    assert "space.optimizer" not in message and "space.dropout" not in message
    assert "new [study] name" in message and "optuna delete-study --study-name tiny" in message
    assert redact(storage_url) in message
    assert "\n" not in message

    # The same refusal from the command line: exit code 2, the reason on stderr, no traceback.
    capsys.readouterr()
    assert main(["run", str(tmp_path / "tiny.toml"), "--storage", storage_url]) == 2
    err = capsys.readouterr().err
    assert "space.lr" in err and "new [study] name" in err and "Traceback" not in err

    # Nothing was overwritten: the original file still resumes, with its own recorded space.
    study = open_study(cfg, open_storage(storage_url), prepared, artifacts)
    assert study.user_attrs["space_fingerprint"] == cfg.space_fingerprint()
    assert study.user_attrs["space"]["lr"] == [1e-3, 3e-3]
    assert study.trials == []


def test_resume_refuses_a_changed_split_but_accepts_a_new_budget(study_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = read_study_file(study_file("tiny"))
    open_study(cfg, open_storage(url), prepare(cfg), tmp_path / "artifacts")

    more = read_study_file(study_file("tiny", study={"n_trials": 50}))
    open_study(more, open_storage(url), prepare(more), tmp_path / "artifacts")

    other = read_study_file(study_file("tiny", data={"subset": 200}))
    with pytest.raises(ConfigError) as raised:
        open_study(other, open_storage(url), prepare(other), tmp_path / "artifacts")
    assert raised.value.field == "data"
    assert "split differs" in str(raised.value)


def _dumped(**overrides: dict) -> dict:
    return parse_study(tiny_tables("tiny", **overrides)).model_dump(mode="json")


@pytest.mark.parametrize(("overrides", "key", "old", "new"), [
    ({"model": {"arch": "resnet34"}}, "model.arch", "resnet18", "resnet34"),
    ({"model": {"weights": "DEFAULT"}}, "model.weights", "none", "DEFAULT"),
    ({"train": {"epochs": 3}}, "train.epochs", 1, 3),
    ({"train": {"batch_size": 16}}, "train.batch_size", 32, 16),
    ({"train": {"label_smoothing": 0.1}}, "train.label_smoothing", 0.0, 0.1),
    ({"data": {"image_size": 64}}, "data.image_size", 32, 64),
    ({"data": {"augment": ["crop", "cutout"]}}, "data.augment", ["crop"], ["crop", "cutout"]),
    ({"study": {"seed": 3}}, "study.seed", 0, 3),
])
def test_config_change_names_the_first_differing_key(overrides, key, old, new):
    assert config_change(_dumped(), _dumped(**overrides)) == (key, old, new)
    # The first in the file's order: [data] before [model] before [train].
    both = _dumped(model={"arch": "resnet34"}, train={"epochs": 3}, data={"image_size": 64})
    assert config_change(_dumped(), both)[0] == "data.image_size"


def test_config_change_leaves_out_what_may_change_between_runs(tmp_path):
    changed = _dumped(
        study={"n_trials": 50, "storage": "sqlite:///elsewhere.db", "artifacts": str(tmp_path), "target": 0.9,
               "max_consecutive_failures": 2, "keep_weights": 0, "heartbeat_interval": 5, "heartbeat_grace": 50,
               "sampler": "tpe", "pruner": "median", "pruner_startup_trials": 1, "pruner_warmup_epochs": 0},
        data={"cache_dir": str(tmp_path), "placement": "stream", "device_memory_fraction": 0.3},
        train={"device": "cuda", "precision": "fp32", "eval_batch_size": 7, "checkpoint_every": 0, "compile": True},
        ensemble={"top_k": 4}, tracking={"log_dir": "elsewhere"},
        space={"step": {"gamma": [0.2, 0.3]}, "scheduler": ["exponential", "plateau"]},  # the fingerprint's job
    )
    assert config_change(_dumped(), changed) is None
    # A key one side does not record (an older or newer hpsearch) is not a change either.
    older = _dumped()
    del older["data"]["bad_images"], older["tracking"]
    assert config_change(older, _dumped()) is None
    assert config_change(older, _dumped(model={"freeze": "backbone"})) == ("model.freeze", "none", "backbone")


def test_resume_refuses_another_configuration_before_any_trial(study_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = read_study_file(study_file("tiny"))
    prepared = prepare(cfg)
    open_study(cfg, open_storage(url), prepared, tmp_path / "artifacts")

    other = read_study_file(study_file("tiny", model={"arch": "resnet34"}, train={"epochs": 2}))
    with pytest.raises(StudyRecordError) as raised:
        open_study(other, open_storage(url), prepared, tmp_path / "artifacts")
    assert str(raised.value) == (f"{tmp_path / 'tiny.toml'}: study 'tiny' was created with model.arch = 'resnet18'; "
                                 "this file says 'resnet34': use another [study] name, or the original file")
    with pytest.raises(StudyRecordError, match=r"train\.epochs = 1; this file says 2"):
        open_study(read_study_file(study_file("tiny", train={"epochs": 2})), open_storage(url), prepared,
                   tmp_path / "artifacts")

    # What may change between runs is accepted, and the recorded config stays the creator's.
    moved = read_study_file(study_file("tiny", study={"n_trials": 9, "target": 0.5}, train={"device": "auto"}))
    study = open_study(moved, open_storage(url), prepared, tmp_path / "elsewhere")
    assert study.user_attrs[keys.CONFIG]["study"]["n_trials"] == 2 and study.trials == []

    # A study that recorded no config (an older hpsearch) resumes as before.
    study.set_user_attr(keys.CONFIG, None)
    open_study(other, open_storage(url), prepared, tmp_path / "artifacts")


# ------------------------------------------------------------------------------- trials that go wrong


@pytest.mark.slow
@pytest.mark.inprocess
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_full_study_fails_its_stale_trials_before_it_returns(study_file, tmp_path):
    """A trial whose worker died unseen (its whole `run` killed) stays RUNNING; the next run, finding the study
    full, still fails it (stale heartbeat) and queues its retry before it returns."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    _, _, study, objective = start(study_file("stale", study={"n_trials": 1}), url, tmp_path / "artifacts")
    beating = open_storage(url, heartbeat_interval=1, heartbeat_grace=2)
    study = optuna.load_study(study_name=study.study_name, storage=beating)
    orphan = study.ask()
    beating.record_heartbeat(orphan._trial_id)  # its worker beat once, then died
    done = study.ask()
    study.tell(done, 0.5)
    time.sleep(3)  # past the grace

    assert not run_trials(study, objective, 1).tripped

    assert states(study) == [TrialState.FAIL, TrialState.COMPLETE, TrialState.WAITING]
    assert study.trials[2].system_attrs["failed_trial"] == orphan.number


@pytest.mark.slow
@pytest.mark.inprocess
def test_diverging_trial_is_pruned_and_the_study_goes_on(study_file, tmp_path):
    path = study_file("diverge", space={"lr": [1e-3, 1e6], "optimizer": ["sgd", "adam"]})
    _, _, study, objective = start(path, f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "artifacts")
    study.enqueue_trial({"lr": 1e5, "optimizer": "sgd"})
    study.enqueue_trial({"lr": 1e-3, "optimizer": "adam"})

    guard = run_trials(study, objective, 2)

    assert not guard.tripped
    diverged, fine = study.trials
    assert diverged.state == TrialState.PRUNED
    assert "non-finite" in diverged.user_attrs["pruned_reason"]
    assert "weights_artifact" not in diverged.user_attrs
    assert fine.state == TrialState.COMPLETE
    assert best_trial(study).number == 1
    assert finished_trials(study) == 2


@pytest.mark.slow
@pytest.mark.inprocess
def test_median_pruner_stops_a_hopeless_trial(study_file, tmp_path):
    path = study_file(
        "prune",
        study={"n_trials": 2, "pruner": "median", "pruner_startup_trials": 1, "pruner_warmup_epochs": 0},
        data={"subset": 400},
        train={"epochs": 2},
        space={"lr": [1e-7, 1e-2], "optimizer": ["adam", "sgd"], "scheduler": ["none"]},
    )
    _, _, study, objective = start(path, f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "artifacts")
    study.enqueue_trial({"lr": 1e-3, "optimizer": "adam", "dropout": 0.0})
    study.enqueue_trial({"lr": 1e-7, "optimizer": "sgd", "dropout": 0.0})

    run_trials(study, objective, 2)

    good, bad = study.trials
    assert good.state == TrialState.COMPLETE
    assert list(good.intermediate_values) == [0, 1]
    assert bad.state == TrialState.PRUNED
    # Stopped after its first epoch, below the good trial there.
    assert list(bad.intermediate_values) == [0]
    assert bad.intermediate_values[0] < good.intermediate_values[0]
    reason = bad.user_attrs["pruned_reason"]
    assert "pruned at epoch 1" in reason and "median" in reason
    assert "weights_artifact" not in bad.user_attrs and "outputs_artifact" not in bad.user_attrs


@pytest.mark.slow
@pytest.mark.inprocess
def test_crashing_trials_fail_with_a_reason_and_the_run_stops_after_a_streak(study_file, tmp_path):
    path = study_file("crash", study={"n_trials": 10, "max_consecutive_failures": 2})
    artifacts = tmp_path / "artifacts"
    _, _, study, objective = start(path, f"sqlite:///{tmp_path / 'study.db'}", artifacts)

    def lose_the_store(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # After the first trial the artifact folder disappears and a plain file takes its place (a
        # remounted or replaced volume): every following trial trains, then cannot store its weights.
        if trial.number == 0:
            artifacts.rename(tmp_path / "moved-away")
            artifacts.write_text("not a folder")

    guard = run_trials(study, objective, 10, callbacks=[lose_the_store])

    assert guard.tripped
    assert states(study) == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    for failed in study.trials[1:]:
        assert failed.user_attrs["fail_reason"].startswith("NotADirectoryError")
        assert "Traceback" in failed.user_attrs["fail_traceback"]
        assert "weights_artifact" not in failed.user_attrs

    # The finished trial survived; fix the store and the study resumes to its budget (FAIL does not count).
    artifacts.unlink()
    (tmp_path / "moved-away").rename(artifacts)
    load_trial_weights(FileSystemArtifactStore(str(artifacts)), study.trials[0])
    guard = run_trials(study, objective, 2)
    assert not guard.tripped
    assert states(study) == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]


def test_stop_after_failures_counts_only_failures_in_a_row():
    outcomes = ["fail", "ok", "fail", "fail", "ok", "fail", "fail", "fail", "ok"]

    def objective(trial: optuna.Trial) -> float:
        if outcomes[trial.number] == "fail":
            raise RuntimeError("broken")
        return 1.0

    guard = StopAfterFailures(3)
    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=len(outcomes), catch=(RuntimeError,), callbacks=[guard])
    assert guard.tripped
    assert len(study.trials) == 8  # stopped right after the third failure in a row, not after the first two pairs


def test_a_study_with_no_finished_trials_has_no_best(study_file, tmp_path):
    cfg = read_study_file(study_file("empty"))
    prepared = prepare(cfg)
    study = open_study(cfg, open_storage(f"sqlite:///{tmp_path / 'study.db'}"), prepared, tmp_path / "artifacts")
    assert best_trial(study) is None
    assert finished_trials(study) == 0


@pytest.mark.slow
@pytest.mark.inprocess
def test_keep_weights_bounds_the_artifact_store(study_file, tmp_path):
    """Weights outside the best K are deleted as the study runs; outputs stay; no checkpoint outlives its trial."""
    path = study_file("keep", study={"n_trials": 3, "keep_weights": 1}, train={"epochs": 2, "checkpoint_every": 1},
                      space={"lr": [1e-4, 1e-2]})
    url = f"sqlite:///{tmp_path / 'keep.db'}"
    artifacts = tmp_path / "artifacts"
    assert main(["run", str(path), "--storage", url, "--artifacts", str(artifacts)]) == 0
    study = optuna.load_study(study_name="keep", storage=url)
    complete = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: (-t.value, t.number))
    assert len(complete) == 3
    on_disk = {p.name for p in artifacts.iterdir()}
    assert complete[0].user_attrs["weights_artifact"] in on_disk, "the best trial keeps its weights"
    for loser in complete[1:]:
        assert loser.user_attrs["weights_artifact"] not in on_disk
    for trial in complete:
        assert trial.user_attrs["outputs_artifact"] in on_disk, "outputs are small and always kept"
        assert trial.user_attrs.get("checkpoint_artifact") not in on_disk, "checkpoints go with their trial"
        assert trial.user_attrs["checkpoint_epoch"] == 1, "a 2-epoch trial checkpoints after epoch 1"
    assert len(on_disk) == 1 + 3

    # The dashboard lists what is still there, no dead link: a loser shows its outputs only, and every listed
    # file downloads (a finished trial's attrs cannot change; the listing lives in the study's).
    study_id = open_storage(url).get_study_id_from_name("keep")
    with dashboard_http(url, artifacts) as get:
        listed = dashboard_artifacts(get, study_id)
        assert listed[complete[0].number] == {complete[0].user_attrs[k] for k in ("weights_artifact",
                                                                                   "outputs_artifact")}
        for loser in complete[1:]:
            assert listed[loser.number] == {loser.user_attrs["outputs_artifact"]}
        for trial in complete:
            for artifact_id in listed[trial.number]:
                status, body = get(f"/artifacts/{study_id}/{trial._trial_id}/{artifact_id}")
                assert status == 200 and body == (artifacts / artifact_id).read_bytes()
            # A deleted file's old link answers 404, never a server error.
            status, _ = get(f"/artifacts/{study_id}/{trial._trial_id}/{trial.user_attrs['weights_artifact']}")
            assert status == (200 if trial is complete[0] else 404)
