"""Where the command writes: `out` (stdout: tables, CSV, JSON) and `console` (stderr: progress, notes, errors)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

from hpsearch.units import size_text

console = Console(stderr=True)
out = Console()
_errors = Console(stderr=True)  # error lines print even under -q, which silences `console`
VERBOSITY_ENV = "HPSEARCH_VERBOSITY"  # -q/-v of the `run --workers N` that started this worker
_UNLIMITED = 100_000  # columns to measure a renderable's natural width in


def set_verbosity(verbosity: int, *, optuna: bool) -> None:
    """-q (-1): only errors and the command's result (stdout); 0: also progress and notes; -v (1): also Optuna's
    own log lines ("A new study created ...", "Trial 3 finished ..."), which otherwise repeat ours.
    `optuna`: whether the command uses Optuna at all (predict and select do not: no 1 s import for them).

    A worker that `run -q/-v --workers N` started hears the flag through the environment it inherits."""
    if not verbosity:
        verbosity = {"-1": -1, "1": 1}.get(os.environ.get(VERBOSITY_ENV, ""), 0)
    console.quiet = verbosity < 0
    if optuna:
        import optuna as _optuna

        _optuna.logging.set_verbosity(_optuna.logging.INFO if verbosity > 0 else _optuna.logging.ERROR)


def print_error(line: str) -> None:
    """One `error: ...` line on stderr; `line` is plain text, never rich markup (a message naming "[study] name"
    must not be eaten as markup)."""
    _errors.print(f"[red]error[/]: {_escape(line)}", highlight=False, soft_wrap=True)


def show(renderable: Any, **options: Any) -> None:
    """Print a result on stdout, whole: on a terminal at its width; into a pipe or a file (no terminal, no width
    of its own) at the renderable's natural width, so that no table cell is cut (`rmspr…`) nor line wrapped."""
    if out.is_terminal:
        out.print(renderable, **options)
        return
    from rich.measure import Measurement

    width = Measurement.get(out, out.options.update_width(_UNLIMITED), renderable).maximum
    Console(width=max(out.width, width), file=out.file, no_color=out.no_color).print(renderable, **options)


def print_json_object(data: dict[str, Any]) -> None:
    """`--json`: the command's one object on stdout, plain (no colour, no wrapping), one line per key."""
    sys.stdout.write(json.dumps(data, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def cache_object(cfg: Any) -> dict[str, Any] | None:
    """The study's decoded-image cache, when its dataset has one: its path and size in bytes (None: not built)."""
    if not cfg.data.cached:
        return None  # nothing to show, and no torch import: watching a study stays cheap
    from hpsearch.data import cache_state

    state = cache_state(cfg.data)
    return None if state is None else {"path": str(state[0]), "bytes": state[1]}


def print_cache(cfg: Any) -> None:
    """The study's decoded-image cache, when its dataset has one: where, and how large."""
    cache = cache_object(cfg)
    if cache is not None:
        size = cache["bytes"]
        built = size_text(size) if size is not None else "not built yet: the first run decodes it"
        show(f"data cache: {cache['path']} ({built}; deleting it is safe, it is rebuilt on demand)", highlight=False)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
