"""What `hpsearch ensemble` ships, judged on the test split, over seeds: the shipped combination's test NLL (with
its temperature) and accuracy against the best single trial's and uniform soft voting's, and the temperature's
effect on test NLL.

    .venv/bin/python bench/ensemble_honesty.py [--study studies/digits.toml] [--seeds 0,1,2] [--n-trials N] [--keep DIR]

For each seed, writes a copy of the study file with that `[study] seed` (and its own name), runs `hpsearch run` on
a fresh SQLite file and artifact folder, then `hpsearch ensemble --no-export`, exactly as a user would, and reads
the ensemble.json it wrote. Prints one line per seed and, per column, the mean and the spread (min to max).

`Δ single` and `Δ soft` are the shipped combination's test NLL minus the best single trial's and uniform soft
voting's (each at the T it ships), per image, averaged, with the standard error of that mean (`SE`): a
difference within about two SE is one the 359 test images cannot tell from noise.

With `--also-on-validation`, each seed's same stored outputs are combined a second time as a study without a
calibration part would combine them (weights, T and the choice fitted on the validation outputs): a paired
comparison on the same trials, in the columns `val-fit NLL` and `val-fit acc`, with `val-fit method`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def variant(study: Path, folder: Path, seed: int) -> tuple[Path, str]:
    text = study.read_text()
    name = re.search(r'(?m)^name = "([^"]*)"', text)
    named = f"{name.group(1) if name else 'study'}-s{seed}"
    text = re.sub(r"(?m)^seed = \d+", f"seed = {seed}", text)
    text = re.sub(r'(?m)^name = "[^"]*"', f'name = "{named}"', text)
    path = folder / f"{named}.toml"
    path.write_text(text)
    return path, named


def hpsearch(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hpsearch", *args], check=True, stdout=subprocess.DEVNULL)


def study_candidates(storage: str, artifacts: Path, name: str, result: dict) -> list:
    """The candidates `hpsearch ensemble` combined (the study's top k, read back from its store)."""
    import optuna

    from hpsearch.ensemble._candidates import select_candidates
    from hpsearch.store import open_artifact_store, open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    store = open_artifact_store(artifacts, create=False)
    return list(select_candidates(study, store, top_k=len(result["candidates"])).candidates)


def fitted_on_validation(candidates: list) -> dict[str, float | str]:
    """What `auto` ships from the same trials' outputs with their calibration outputs set aside."""
    import dataclasses

    from hpsearch.ensemble._fit import build_ensemble

    plain = [dataclasses.replace(c, outputs=dataclasses.replace(c.outputs, calibration_logits=None,
                                                                calibration_labels=None)) for c in candidates]
    result = build_ensemble(plain, arch="resnet18")
    row = result.row(result.method)
    return {"val-fit method": result.method, "val-fit NLL": row.nll_scaled, "val-fit acc": row.accuracy}


def paired_differences(candidates: list, result: dict) -> dict[str, float | str]:
    """Shipped minus best single and minus uniform soft voting: test NLL per image, mean and standard error."""
    import numpy as np

    from hpsearch.ensemble._candidates import stack_outputs
    from hpsearch.ensemble._combine import mixture_log_probs, scale

    data = stack_outputs(candidates)
    trials = [c.trial for c in candidates]
    rows = {r["method"]: r for r in result["metrics"]}

    def nll_per_image(key: str) -> np.ndarray:
        weights = np.zeros(len(trials))
        for trial, weight in zip(rows[key]["trials"], rows[key]["weights"], strict=True):
            weights[trials.index(trial)] = weight
        log_probs = scale(mixture_log_probs(data.test, weights), rows[key]["temperature"] or 1.0)
        return -log_probs[np.arange(len(data.y_test)), data.y_test]

    shipped, out = nll_per_image(result["method"]), {}
    for other in ("single", "soft"):
        diff = shipped - nll_per_image(other)
        out[f"Δ {other}"] = float(diff.mean())
        out[f"Δ {other} SE"] = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    return out


def one_seed(study: Path, folder: Path, seed: int, n_trials: int | None,
             also_on_validation: bool = False) -> dict[str, float | str]:
    path, name = variant(study, folder, seed)
    common = ["--storage", f"sqlite:///{folder / (name + '.db')}", "--artifacts", str(folder / f"artifacts-{name}")]
    start = time.perf_counter()
    hpsearch("run", str(path), *common, *(["--n-trials", str(n_trials)] if n_trials else []))
    ran = time.perf_counter() - start
    out = folder / f"ens-{name}"
    hpsearch("ensemble", str(path), *common, "--out", str(out), "--no-export")
    result = json.loads((out / "ensemble.json").read_text())
    rows = {r["method"]: r for r in result["metrics"]}
    shipped = rows[result["method"]]
    candidates = study_candidates(common[1], Path(common[3]), name, result)
    paired = fitted_on_validation(candidates) if also_on_validation else {}
    return paired | paired_differences(candidates, result) | {
        "method": result["method"], "T": shipped["temperature"] or 1.0, "T fitted": shipped["fitted_temperature"],
        "NLL T=1": shipped["test_nll"], "NLL shipped": shipped["test_nll_scaled"], "acc": shipped["test_accuracy"],
        "single NLL": rows["single"]["test_nll_scaled"], "single acc": rows["single"]["test_accuracy"],
        "soft NLL": rows["soft"]["test_nll_scaled"], "soft acc": rows["soft"]["test_accuracy"],
        "weighted NLL": rows["weighted"]["test_nll_scaled"], "weighted acc": rows["weighted"]["test_accuracy"],
        "run s": ran,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=ROOT / "studies" / "digits.toml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n-trials", type=int, default=None, help="fewer finished trials than the file's n_trials")
    parser.add_argument("--also-on-validation", action="store_true",
                        help="also combine each seed's outputs as a study without a calibration part would")
    parser.add_argument("--keep", type=Path, default=None,
                        help="run in this folder and keep its studies (a rerun resumes them), not a temporary one")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    folder = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="hpsearch-honesty-")
    with folder as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            row = one_seed(args.study.resolve(), Path(tmp), seed, args.n_trials, args.also_on_validation)
            results.append(row)
            print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in row.items()), flush=True)
    for key in results[0]:
        values = [r[key] for r in results if isinstance(r[key], float)]
        if values:
            print(f"{key}: mean {statistics.mean(values):.4f} (min {min(values):.4f}, max {max(values):.4f})")


if __name__ == "__main__":
    main()
