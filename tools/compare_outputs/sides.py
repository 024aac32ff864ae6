"""The two sides (a source tree each, run in its own work folder) and one step run on both at once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .fingerprint import fingerprint_tree
from .normalise import Normaliser, mask_table_column
from .session import Step

SIDES = ("old", "new")  # equal lengths: paths printed by either side wrap alike
COMMAND_TIMEOUT_S = 900


CLI = "import sys; from hpsearch.cli import main; sys.exit(main())"


@dataclass(frozen=True)
class Side:
    name: str
    src: Path
    root: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("HPSEARCH_", "FORCE_COLOR", "CLICOLOR", "AWS_"))}
        env.update({
            "PYTHONPATH": os.pathsep.join([str(self.src), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "PYTHONDONTWRITEBYTECODE": "1",  # nothing written into either source tree
            "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8", "TZ": "UTC",
            "HPSEARCH_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "COLUMNS": "200", "LINES": "50", "NO_COLOR": "1", "TERM": "dumb",
            "CUDA_VISIBLE_DEVICES": "",  # the CPU on any machine: its results are what both sides must share
            "HPSEARCH_CACHE_DIR": str(self.root / ".cache" / "hpsearch"),
            "MPLCONFIGDIR": str(self.root / ".cache" / "matplotlib"),
        })
        return env

    def logs(self) -> Path:
        return self.root / ".logs"


def check_import(side: Side) -> str | None:
    """None when `import hpsearch` on this side resolves inside its tree (and warms matplotlib's font cache,
    so no later step prints that it builds it); else the reason."""
    code = "import hpsearch, hpsearch.cli, matplotlib.font_manager; print(hpsearch.__file__)"
    done = subprocess.run([sys.executable, "-c", code], env=side.env(), cwd=side.root, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        return f"{side.name}: `{code}` failed:\n{done.stderr.strip()}"
    where = Path(done.stdout.strip().splitlines()[-1]).resolve()
    if not where.is_relative_to(side.src.resolve()):
        return f"{side.name}: hpsearch imports from {where}, not from {side.src} (PYTHONPATH lost to the install)"
    print(f"{side.name}: hpsearch from {where}")
    return None


@dataclass(frozen=True)
class Outcome:
    """What one side's command did: exit code, output, and its folder's files as compared."""

    code: int
    stdout: str
    stderr: str
    files: dict[str, str]


def clone_tree(source: Path, target: Path) -> None:
    """A copy whose files are hard links (the artifact store is large); folders are new, so an added, renamed or
    deleted file stays on its side. An in-place write would not: `store_untouched` checks there was none."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


def prepare(step: Step, side: Side, old: Side) -> Path:
    folder = side.root / step.name
    folder.mkdir()
    if step.study_from is not None:
        shutil.copy2(old.root / step.study_from / "study.db", folder / "study.db")
        clone_tree(old.root / step.study_from / "artifacts", folder / "artifacts")
    for source, target in step.inputs:
        clone_tree(old.root / source, folder / target)
    return folder


def launch(step: Step, side: Side) -> subprocess.Popen[bytes]:
    args = [a.replace("{dir}", step.name) for a in step.args]
    side.logs().mkdir(exist_ok=True)
    with open(side.logs() / f"{step.name}.out", "wb") as out, open(side.logs() / f"{step.name}.err", "wb") as err:
        return subprocess.Popen([sys.executable, "-c", CLI, *args], cwd=side.root, env=side.env(), stdout=out,
                                stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)


def wait(process: subprocess.Popen[bytes]) -> int:
    try:
        return process.wait(timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: only what this harness started
        process.wait()
        return -9


def run_step(step: Step, sides: Sequence[Side], norm: Normaliser) -> tuple[list[Outcome], float]:
    """Both sides at once (one thread each on their own core); their outcomes, normalised, and the wall time."""
    for side in sides:
        prepare(step, side, sides[0])
    start = time.perf_counter()
    processes = [launch(step, side) for side in sides]
    try:
        codes = [wait(p) for p in processes]
    finally:  # interrupted: stop what this step started (each command runs in its own session)
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    seconds = time.perf_counter() - start
    with ThreadPoolExecutor(len(sides)) as pool:
        outcomes = list(pool.map(collect, [step] * len(sides), sides, codes, [norm] * len(sides)))
    return outcomes, seconds


def collect(step: Step, side: Side, code: int, norm: Normaliser) -> Outcome:
    stdout = (side.logs() / f"{step.name}.out").read_text(encoding="utf-8", errors="replace")
    stderr = (side.logs() / f"{step.name}.err").read_text(encoding="utf-8", errors="replace")
    if step.fresh_run:
        stdout = mask_table_column(stdout, "sec")
    return Outcome(code, norm.text(stdout), norm.text(stderr), fingerprint_tree(side.root / step.name, norm))
