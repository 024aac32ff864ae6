"""`suggest`: every parameter of the space is drawn and recorded in the trial, a branch's only with its scheduler,
and what the trial trains with is what it recorded (the regularizers too: one such trial runs through the
objective and stores the moving average's weights with their outputs). Trials asked of a real SQLite study."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from hpsearch.config import parse_study, read_study_file
from hpsearch.model import build_model
from hpsearch.search._objective import suggest
from hpsearch.search._run import run_trials
from hpsearch.store import load_trial_outputs, load_trial_weights, open_artifact_store
from hpsearch.train import Hyperparams, predict_logits
from tests.search.test_search import start

STUDIES = Path(__file__).resolve().parents[2] / "studies"


def test_every_searched_parameter_is_recorded_in_the_trial(tmp_path: Path) -> None:
    cfg = read_study_file(STUDIES / "digits-recipes.toml")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction=cfg.study.direction,
                                sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        hp = suggest(trial, cfg.space)
        study.tell(trial, 0.5)
        recorded = study.trials[-1].params
        expected = {p.name for p in cfg.space.parameters() if p.when in (None, recorded["scheduler"])}
        assert set(recorded) == expected
        # The trial trains with what it recorded (and a retry rebuilds the same from its params).
        assert all(getattr(hp, name) == value for name, value in recorded.items())
        assert Hyperparams.from_params(recorded) == hp
        assert recorded["batch_size"] in cfg.space.batch_size
        seen.add(recorded["scheduler"])
    assert seen == set(cfg.space.scheduler)


def test_a_study_file_without_the_new_keys_draws_what_it_always_drew(tmp_path: Path) -> None:
    cfg = read_study_file(STUDIES / "digits.toml")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", sampler=optuna.samplers.RandomSampler(0))
    for _ in range(8):
        trial = study.ask()
        hp = suggest(trial, cfg.space)
        names = set(trial.params)
        assert {"lr", "optimizer", "scheduler", "dropout"} <= names
        assert names - {"lr", "optimizer", "scheduler", "dropout"} <= {
            "step_size", "step_gamma", "exp_gamma", "plateau_factor", "plateau_patience"}
        assert (hp.warmup_epochs, hp.head_lr_mult, hp.label_smoothing, hp.batch_size) == (0.0, 1.0, None, None)
        assert (hp.mixing, hp.augment_strength, hp.ema) == ("none", 0.0, False)
        study.tell(trial, 0.5)


def test_the_regularizers_are_drawn_recorded_and_trained_with(tmp_path: Path) -> None:
    space = {"mixing": ["none", "mixup", "cutmix"], "mix_alpha": [0.2, 1.0], "augment_strength": [0.0, 0.5],
             "ema": [False, True]}
    cfg = parse_study({"study": {"name": "r"}, "space": space})
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", sampler=optuna.samplers.RandomSampler(2))
    seen: dict[str, set[object]] = {"mixing": set(), "ema": set()}
    for _ in range(16):
        trial = study.ask()
        hp = suggest(trial, cfg.space)
        study.tell(trial, 0.5)
        recorded = study.trials[-1].params  # read back from the storage
        assert set(space) <= set(recorded)
        assert Hyperparams.from_params(recorded) == hp
        assert (hp.mixing, hp.mix_alpha, hp.augment_strength, hp.ema) == tuple(recorded[k] for k in space)
        assert 0.2 <= hp.mix_alpha <= 1.0 and 0.0 <= hp.augment_strength <= 0.5 and isinstance(hp.ema, bool)
        seen["mixing"].add(hp.mixing)
        seen["ema"].add(hp.ema)
    assert seen == {"mixing": {"none", "mixup", "cutmix"}, "ema": {False, True}}


@pytest.mark.slow
@pytest.mark.inprocess
def test_a_trial_with_every_regularizer_stores_the_averaged_weights_and_their_outputs(study_file, tmp_path):
    path = study_file("regularized", data={"subset": 200}, train={"ema_decay": 0.8},
                      space={"scheduler": ["none"], "mixing": ["cutmix"], "mix_alpha": [0.5, 1.0],
                             "augment_strength": [0.3, 0.6], "ema": [True]})
    cfg, prepared, study, objective = start(path, f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "artifacts")

    run_trials(study, objective, 1)

    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert (trial.params["mixing"], trial.params["ema"]) == ("cutmix", True)
    assert 0.3 <= trial.params["augment_strength"] <= 0.6 and 0.5 <= trial.params["mix_alpha"] <= 1.0
    # The stored weights (the moving average's) give the stored validation outputs.
    store = open_artifact_store(tmp_path / "artifacts")
    model = build_model(cfg.model, prepared.pool.num_classes, cfg.data.image_size)
    model.load_state_dict(load_trial_weights(store, trial))
    outputs = load_trial_outputs(store, trial)
    again = predict_logits(model, objective.data.val, objective.data.preprocess, 512)
    torch.testing.assert_close(again, outputs.val_logits)
