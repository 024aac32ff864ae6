"""The command line: the arguments, the two sides' work folders, every step in order, and the summary."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import __doc__ as DESCRIPTION
from .compare import Verdict, compare, report_step, store_state, store_untouched
from .normalise import Normaliser
from .session import cross_validated_steps, input_files, single_split_steps, soup_steps, write_inputs
from .sides import SIDES, Side, check_import, run_step


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.compare_outputs",
                                     description=DESCRIPTION.splitlines()[0] if DESCRIPTION else None)
    parser.add_argument("--old", type=Path, required=True, help="the source tree before (holds hpsearch/)")
    parser.add_argument("--new", type=Path, required=True, help="the source tree after (holds hpsearch/)")
    parser.add_argument("--workdir", type=Path, help="an empty or new folder to work in (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (default: delete it)")
    return parser.parse_args(argv)


def make_sides(args: argparse.Namespace) -> tuple[list[Side], Path]:
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="hpsearch-compare-"))).absolute()
    work.mkdir(parents=True, exist_ok=True)
    sides = [Side(name, src.absolute(), work / name) for name, src in zip(SIDES, (args.old, args.new), strict=True)]
    files = input_files()
    for side in sides:
        write_inputs(side.root, files)
    return sides, work


def normaliser_for(sides: Sequence[Side]) -> Normaliser:
    places = {str(s.root): "<WORK>" for s in sides} | {str(s.src): "<SRC>" for s in sides}
    places |= {str(s.root.resolve()): "<WORK>" for s in sides} | {str(s.src.resolve()): "<SRC>" for s in sides}
    return Normaliser(sorted(places.items(), key=lambda item: -len(item[0])))


def run_all(sides: Sequence[Side]) -> Iterator[Verdict]:
    norm = normaliser_for(sides)
    before: dict[str, dict[str, str]] = {}
    for step in [*single_split_steps(), *cross_validated_steps(), *soup_steps()]:
        if step.study_from is not None and step.study_from not in before:
            before[step.study_from] = store_state(sides[0].root, step.study_from)
        outcomes, seconds = run_step(step, sides, norm)
        yield Verdict(step.name, tuple(o.code for o in outcomes), seconds, compare(*outcomes))
    yield store_untouched(sides, before)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        print(f"error: --workdir {args.workdir} is not empty", file=sys.stderr)
        return 2
    start = time.perf_counter()
    sides, work = make_sides(args)
    try:
        with ThreadPoolExecutor(len(sides)) as pool:
            problems = [p for p in pool.map(check_import, sides) if p is not None]
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 2
        print("steps: A-* a fresh `run` on each side; B-* both sides on copies of the old side's study; CV-* the "
              "cross-validated study; S-* the soup study", flush=True)
        verdicts: list[Verdict] = []
        for verdict in run_all(sides):
            report_step(verdict)
            verdicts.append(verdict)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return summarise(verdicts, time.perf_counter() - start)


def summarise(verdicts: Sequence[Verdict], seconds: float) -> int:
    differing = [v.step for v in verdicts if v.differences]
    print(f"\n{len(verdicts) - len(differing)} of {len(verdicts)} steps SAME in {seconds:.0f} s", end="")
    print(f"; DIFF: {', '.join(differing)}" if differing else "")
    return 1 if differing else 0
