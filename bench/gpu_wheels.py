"""Download, here, the wheels a GPU machine lacks to run hpsearch and `bench/gpu_check.sh`, for its Python 3.12 on
manylinux x86-64, into a folder that travels with the working tree (default `.whl`, ignored by git).

    .venv/bin/python bench/gpu_wheels.py [--dest .whl]

What such a machine already has (torch, torchvision, numpy, pandas, scipy, scikit-learn, matplotlib, pillow,
rich, safetensors, grpcio, protobuf, pytest and pytest-xdist: the device notes list its image) is left out:
only what `pyproject.toml` needs beyond it, each at the version installed here (the versions the tests pass
with; unpinned where this environment lacks it). gpu_check.sh installs them with `pip install --no-index
--find-links` and hpsearch itself with `--no-deps`, so the machine's own torch stays. Prints each wheel and the
folder's size: the device tool carries at most 64 MiB with the working tree.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

# pyproject's dependencies that the GPU image lacks, and what they need that it lacks too.
MISSING = [
    "optuna", "alembic", "Mako", "colorlog", "SQLAlchemy",  # Optuna and its RDB storage
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",  # the study schema
    "optuna-dashboard", "bottle",  # `hpsearch dashboard`
    "psycopg", "psycopg-binary",  # postgresql:// storages
]
# pip matches a manylinux tag exactly: every tag a wheel of these may carry.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64"]


def pinned(name: str) -> str:
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(__file__).parents[1] / ".whl")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(args.dest),
               *(pinned(name) for name in MISSING)]
    done = subprocess.run(command)
    if done.returncode != 0:
        print(f"error: pip download failed (exit {done.returncode}); is the package registry reachable?",
              file=sys.stderr)
        return 2
    wheels = sorted(args.dest.glob("*.whl"))
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    total = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
