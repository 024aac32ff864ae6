"""The default study's wall time, split into training and everything else.

    .venv/bin/python bench/overhead.py [STUDY.toml] [--n-trials 5] [--device cpu|cuda]

Runs the study (default `studies/digits.toml`) in this process on a fresh SQLite file and artifact folder,
exactly as `hpsearch run` does (`open_run` + `run_trials`), and times:

- start-up: reading the file, opening the storage and the store, loading the data, creating the study;
- per trial, training: the epochs' own seconds (each epoch's optimizer steps and validation pass, as
  `train_trial` measures them), and the rest of the trial's wall time (the sampler's suggestion, storage
  calls, reports, checkpoints, the best epoch's fp32 outputs, uploading weights and outputs, callbacks).

Prints one line per trial and the totals: training seconds, non-training seconds and their share of the wall.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", default=str(Path(__file__).parents[1] / "studies" / "digits.toml"))
    parser.add_argument("--n-trials", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()

    from hpsearch.search import open_run, run_trials

    work = Path(tempfile.mkdtemp(prefix="hpsearch-overhead-"))
    wall_start = time.perf_counter()
    run = open_run(args.study, storage=f"sqlite:///{work / 'study.db'}", artifacts=str(work / "artifacts"),
                   device=args.device, n_trials=args.n_trials)
    startup = time.perf_counter() - wall_start
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    epochs: dict[int, float] = {}
    walls: dict[int, float] = {}
    started: dict[int, float] = {}

    def on_epoch(trial: optuna.Trial | FrozenTrial, metrics: object) -> None:
        epochs[trial.number] = epochs.get(trial.number, 0.0) + metrics.seconds  # type: ignore[attr-defined]
        started.setdefault(trial.number, time.perf_counter())

    def on_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        assert trial.datetime_start is not None and trial.datetime_complete is not None
        walls[trial.number] = (trial.datetime_complete - trial.datetime_start).total_seconds()

    loop_start = time.perf_counter()
    run_trials(run.study, run.objective(on_epoch=on_epoch), run.n_trials, callbacks=[on_trial])
    loop = time.perf_counter() - loop_start
    wall = time.perf_counter() - wall_start
    training = sum(epochs.values())
    for number in sorted(walls):
        trained = epochs.get(number, 0.0)
        print(f"trial {number}: wall {walls[number]:6.2f} s, training {trained:6.2f} s, other "
              f"{walls[number] - trained:5.2f} s ({(walls[number] - trained) / walls[number]:.1%})")
    between = loop - sum(walls.values())  # the sampler's ask and callbacks outside the trials' own clocks
    other = wall - training
    print(f"start-up {startup:.2f} s; between trials {between:.2f} s; trials {sum(walls.values()):.2f} s")
    print(f"total wall {wall:.2f} s: training {training:.2f} s, everything else {other:.2f} s ({other / wall:.1%})")


if __name__ == "__main__":
    main()
