"""One finished trial's line, as `run` and `status` print it."""

from __future__ import annotations

import optuna
from rich.console import Console

from hpsearch.monitor import describe_trial


def test_a_failure_reason_with_brackets_prints_as_written():
    # Reasons are free text; rich markup must neither eat "[study]" nor choke on "[/mnt/x]".
    trial = optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL,
        params={"lr": 1e-3, "optimizer": "adam", "scheduler": "none", "dropout": 0.1},
        distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
                       "optimizer": optuna.distributions.CategoricalDistribution(["adam"]),
                       "scheduler": optuna.distributions.CategoricalDistribution(["none"]),
                       "dropout": optuna.distributions.FloatDistribution(0.0, 0.5)},
        user_attrs={"fail_reason": "OSError: store [/mnt/artifacts] gone; see [study] artifacts"},
    )
    console = Console(record=True, width=300)
    console.print(describe_trial(trial))
    assert "OSError: store [/mnt/artifacts] gone; see [study] artifacts" in console.export_text()


def test_a_trial_of_a_searched_arch_names_it_in_its_line_and_the_table():
    from hpsearch.monitor import trials_frame

    dist = {"arch": optuna.distributions.CategoricalDistribution(["resnet18", "timm:test_convnext"]),
            "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    trials = [optuna.trial.create_trial(value=0.5, params={"arch": arch, "lr": 1e-3}, distributions=dist)
              for arch in ("timm:test_convnext", "resnet18")]
    assert describe_trial(trials[0]).endswith("(timm:test_convnext ? lr=1.00e-03 ? dropout=nan)")
    assert trials_frame(trials)["arch"].tolist() == ["timm:test_convnext", "resnet18"]
    plain = optuna.trial.create_trial(value=0.5, params={"lr": 1e-3}, distributions={"lr": dist["lr"]})
    assert "arch" not in trials_frame([plain]).columns and "(? lr=" in describe_trial(plain)
