"""Two sides' outcomes compared (exit code, stdout, stderr, files) into unified diffs, a step's verdict printed,
and the check that no command wrote a shared (hard-linked) store in place."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .fingerprint import binary_fingerprint
from .sides import Outcome, Side

DIFF_LINES = 40  # per differing item
STEP_LINES = 200  # per step
LINE_CHARS = 240  # a longer diff line is cut


def diff_lines(what: str, old: str, new: str) -> list[str]:
    lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(), f"old/{what}", f"new/{what}",
                                      lineterm="", n=1))
    cut = [line if len(line) <= LINE_CHARS else line[:LINE_CHARS] + " [...]" for line in lines[:DIFF_LINES]]
    return cut + ([f"... {len(lines) - DIFF_LINES} more diff lines"] if len(lines) > DIFF_LINES else [])


def compare(old: Outcome, new: Outcome) -> list[str]:
    """The differences between two outcomes as printable lines (at most STEP_LINES); empty when the same."""
    out: list[str] = []
    if old.code != new.code:
        out.append(f"exit code: old {old.code}, new {new.code}")
    for what, before, after in (("stdout", old.stdout, new.stdout), ("stderr", old.stderr, new.stderr)):
        if before != after:
            out += diff_lines(what, before, after)
    for rel in sorted(set(old.files) | set(new.files)):
        if rel not in old.files or rel not in new.files:
            out.append(f"file {rel}: only in {'new' if rel not in old.files else 'old'}")
        elif old.files[rel] != new.files[rel]:
            out += diff_lines(rel, old.files[rel], new.files[rel])
    return out[:STEP_LINES] + ([f"... {len(out) - STEP_LINES} more lines of differences"]
                               if len(out) > STEP_LINES else [])


@dataclass(frozen=True)
class Verdict:
    step: str
    codes: tuple[int, ...]
    seconds: float
    differences: list[str]


def report_step(verdict: Verdict) -> None:
    state = "DIFF" if verdict.differences else "SAME"
    print(f"{state}  {verdict.step:<26} exit {'/'.join(map(str, verdict.codes)):<6} {verdict.seconds:6.1f} s",
          flush=True)
    for line in verdict.differences:
        print(f"      {line}")


def store_untouched(sides: Sequence[Side], before: dict[str, dict[str, str]]) -> Verdict:
    """The shared (hard-linked) stores hold the same bytes as before Part B: no command wrote one in place."""
    differences = []
    for step, fingerprints in before.items():
        if store_state(sides[0].root, step) != fingerprints:
            differences.append(f"{step}/artifacts changed while Part B read hard-linked copies of it")
    return Verdict("B-store-untouched", (), 0.0, differences)


def store_state(root: Path, step: str) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): binary_fingerprint(p)[0]
            for p in sorted((root / step / "artifacts").rglob("*")) if p.is_file()}
