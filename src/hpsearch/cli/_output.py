"""Where the command writes: `out` (stdout: tables, CSV, JSON) and `console` (stderr: progress, notes, errors)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

console = Console(stderr=True)
out = Console()


def print_error(line: str) -> None:
    """One `error: ...` line on stderr; `line` is plain text, never rich markup (a message naming "[study] name"
    must not be eaten as markup)."""
    console.print(f"[red]error[/]: {_escape(line)}", highlight=False, soft_wrap=True)


def print_unwrapped(renderable: Any) -> None:
    """Print at the renderable's natural width when stdout is no terminal (a pipe or file is not 80 columns)."""
    if out.is_terminal:
        out.print(renderable)
        return
    from rich.measure import Measurement

    width = Measurement.get(out, out.options.update_width(10_000), renderable).maximum
    Console(width=max(out.width, width), file=out.file).print(renderable)


def print_cache(cfg: Any) -> None:
    """The study's decoded-image cache, when its dataset has one: where, and how large."""
    if not cfg.data.cached:
        return  # nothing to show, and no torch import: watching a study stays cheap
    from hpsearch.data import cache_state

    state = cache_state(cfg.data)
    if state is not None:
        path, size = state
        built = f"{size / 2**20:.1f} MiB" if size is not None else "not built yet: the first run decodes it"
        out.print(f"data cache: {path} ({built}; deleting it is safe, it is rebuilt on demand)", highlight=False,
                  soft_wrap=True)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
