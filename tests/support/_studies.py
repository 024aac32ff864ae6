"""Tiny study files, and the `hpsearch` command in a fresh process as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def write_study(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    """Write a study file; nested dicts become sub-tables ([space.step])."""
    lines: list[str] = []

    def emit(name: str, table: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        # None leaves a key out (an override that removes one of tiny_tables' defaults).
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict | None))
        lines.append("")
        for key, sub in subs.items():
            emit(f"{name}.{key}", sub)

    for name, table in tables.items():
        emit(name, table)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def tiny_tables(name: str = "tiny", **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A study that trains in seconds: 240 digits, 16 px, 1 epoch, a small ResNet-18."""
    tables: dict[str, dict[str, Any]] = {
        "study": {"name": name, "n_trials": 2, "sampler": "random", "pruner": "none", "seed": 0},
        "data": {"dataset": "digits", "image_size": 32, "subset": 240, "augment": ["crop"]},
        "model": {"arch": "resnet18", "weights": "none"},
        # A checkpoint at every epoch end (the default is by minutes): the kill tests resume them.
        "train": {"epochs": 1, "batch_size": 32, "device": "cpu", "checkpoint_every": 1},
        "space": {"lr": [1e-3, 3e-3], "optimizer": ["adam", "rmsprop"], "scheduler": ["step", "exponential",
                  "plateau"], "dropout": [0.0, 0.3]},
        "ensemble": {"top_k": 2},
    }
    for table, values in overrides.items():
        tables.setdefault(table, {}).update(values)
    return tables


def cli_env(**extra: str | None) -> dict[str, str]:
    """The user's environment without hpsearch settings of its own (HPSEARCH_STORAGE, HPSEARCH_ARTIFACTS, ...),
    a wide terminal so tables are not cut, and one CPU thread for torch; a None value removes that variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_") and k != "OPTUNA_STORAGE"}
    env.update(COLUMNS="200", PYTHONUNBUFFERED="1", HPSEARCH_THREADS="1",
               HPSEARCH_CACHE_DIR=os.environ["HPSEARCH_CACHE_DIR"])
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 300, **extra: str | None) -> subprocess.CompletedProcess[str]:
    """`hpsearch ARGS` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "hpsearch", *args], cwd=cwd, env=cli_env(**extra),
                          capture_output=True, text=True, timeout=timeout)
