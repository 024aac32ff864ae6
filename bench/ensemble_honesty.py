"""What `hpsearch ensemble` ships, judged on the test split, over seeds: the shipped combination's test NLL (with
its temperature) and accuracy against the best single trial's and uniform soft voting's, and the temperature's
effect on test NLL.

    .venv/bin/python bench/ensemble_honesty.py [--study studies/digits.toml] [--seeds 0,1,2] [--n-trials N] [--keep DIR]

For each seed, writes a copy of the study file with that `[study] seed` (and its own name), runs `hpsearch run` on
a fresh SQLite file and artifact folder, then `hpsearch ensemble --no-export`, exactly as a user would, and reads
the ensemble.json it wrote. Prints one line per seed and, per column, the mean and the spread (min to max).
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


def one_seed(study: Path, folder: Path, seed: int, n_trials: int | None) -> dict[str, float | str]:
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
    return {
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
    parser.add_argument("--keep", type=Path, default=None,
                        help="run in this folder and keep its studies (a rerun resumes them), not a temporary one")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    folder = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="hpsearch-honesty-")
    with folder as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            row = one_seed(args.study.resolve(), Path(tmp), seed, args.n_trials)
            results.append(row)
            print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in row.items()), flush=True)
    for key in results[0]:
        values = [r[key] for r in results if isinstance(r[key], float)]
        if values:
            print(f"{key}: mean {statistics.mean(values):.4f} (min {min(values):.4f}, max {max(values):.4f})")


if __name__ == "__main__":
    main()
