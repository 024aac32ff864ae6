"""Pruners compared on the digits study: epochs spent and the best validation accuracy found.

    .venv/bin/python bench/pruning.py [--n-trials 6] [--seeds 0,1,2] [--pruners none,median,hyperband]

For each pruner and seed, runs `studies/digits.toml` with that `[study] pruner` and `seed` (same sampler, same
budget of finished trials) in this process on a fresh SQLite file, exactly as `hpsearch run` does, and prints
the epochs the trials trained in all (a pruned trial stops early), the best validation accuracy, and the wall
time. The last lines: per pruner, the mean over seeds.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import optuna

STUDY = Path(__file__).parents[1] / "studies" / "digits.toml"


def variant(folder: Path, pruner: str, seed: int, n_trials: int) -> Path:
    text = STUDY.read_text()
    text = re.sub(r'(?m)^pruner = "[^"]*"', f'pruner = "{pruner}"', text)
    text = re.sub(r"(?m)^seed = \d+", f"seed = {seed}", text)
    text = re.sub(r"(?m)^n_trials = \d+", f"n_trials = {n_trials}", text)
    text = re.sub(r'(?m)^name = "[^"]*"', f'name = "digits-{pruner}-{seed}"', text)
    path = folder / f"digits-{pruner}-{seed}.toml"
    path.write_text(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=6)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--pruners", default="none,median,hyperband")
    args = parser.parse_args()

    from hpsearch.search import open_run, run_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="hpsearch-pruning-"))
    results: dict[str, list[tuple[int, float, float]]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for pruner in args.pruners.split(","):
            path = variant(work, pruner, seed, args.n_trials)
            start = time.perf_counter()
            run = open_run(str(path), storage=f"sqlite:///{work / f'{path.stem}.db'}",
                           artifacts=str(work / f"artifacts-{path.stem}"), device="cpu", n_trials=args.n_trials)
            run_trials(run.study, run.objective(), run.n_trials)
            wall = time.perf_counter() - start
            trials = run.study.trials
            epochs = sum(len(t.intermediate_values) for t in trials)
            best = max((t.value for t in trials if t.value is not None), default=float("nan"))
            pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
            results.setdefault(pruner, []).append((epochs, best, wall))
            print(f"seed {seed} {pruner:>9}: {len(trials)} trials ({pruned} pruned), {epochs} epochs, best val "
                  f"{best:.4f}, {wall:.0f} s", flush=True)
    for pruner, rows in results.items():
        print(f"mean {pruner:>9}: {statistics.mean(r[0] for r in rows):.1f} epochs, best val "
              f"{statistics.mean(r[1] for r in rows):.4f}, {statistics.mean(r[2] for r in rows):.0f} s "
              f"over {len(rows)} seeds")


if __name__ == "__main__":
    main()
