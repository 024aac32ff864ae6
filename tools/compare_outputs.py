"""Prove that a refactor of hpsearch changed no behaviour: the same CLI session on two source trees, compared.

Run it from the repository root with the project's virtual environment (about 6-8 minutes on 2 cores):

    .venv/bin/python tools/compare_outputs.py --old /work/baseline/src --new /work/main/src [--workdir DIR] [--keep]

Each side runs `python -c "from hpsearch.cli import main; ..."` with its own tree first on PYTHONPATH (checked: the
import must resolve inside that tree), one thread, fixed hash seed, 200 columns, no colour, no GPU. Both sides run
each step at the same time (one core each), in `WORKDIR/old` and `WORKDIR/new` with the same relative paths, on
three tiny digits studies written here (ResNet-18, 32 px): `tiny` (from scratch, 2 epochs, 4 trials, median
pruner), `tiny-cv` (3 folds, 2 trials, 1 epoch, Wilcoxon pruner) and `tiny-soup` (3 trials from one seeded
weights file, frozen backbone, so `ensemble --method soup` really averages instead of refusing):

- A-* steps, a fresh run: each side runs `run` on its own new database and artifact store. Compared: exit code,
  stdout (the top-trials table with its `sec` column masked), stderr, and the study itself (every trial's state,
  values, params, intermediate values, user and system attrs; each stored artifact by content).
- B-* steps, the same inputs: the old side's A-run study is copied into each command's folder (database copied,
  artifact files hard-linked; a last step checks that no command changed a shared file in place), then both
  sides run `status`, `check`, `run` (of the finished study), `ensemble` with every `--method` and with `--onnx`,
  `predict` and `select` on the old side's export (digit PNGs and one unreadable file), and `report` without
  and with `--ensemble`; CV-* and S-* do the same for the other two studies. Compared: exit code, stdout,
  stderr, and every file in the command's folder by relative path and content, the database too (dumped
  through Optuna).

Only what legitimately varies between two runs is normalised: the two work folders and source trees (one
placeholder each), timestamps, elapsed times, the host name with a pid, and what Part A's training measures
(trial durations, host memory, epoch seconds). Bytes that hold the same content compare as that content: PNGs
(files, and report.html's inline images) by pixels, safetensors files by sorted header and tensor bytes (the
writer orders its metadata at random), ensemble.onnx without the source paths and Python module names torch.onnx
records per node, artifacts by content rather than by their random ids, and a file's sha256 named in another
file by that file's compared content. Anything else that differs is reported with a unified diff. Exit 0: every
step is the same; 1: some step differs; 2: the harness could not run (a tree that does not import from itself,
a work folder in use).
"""

from __future__ import annotations

import argparse
import base64
import difflib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIDES = ("old", "new")  # equal lengths: paths printed by either side wrap alike
COMMAND_TIMEOUT_S = 900
DIFF_LINES = 40  # per differing item
STEP_LINES = 200  # per step
LINE_CHARS = 240  # a longer diff line is cut

STUDY = """[study]
name = "{name}"
n_trials = {n_trials}
sampler = "tpe"
pruner = "{pruner}"
pruner_startup_trials = 1
pruner_warmup_epochs = 0
seed = 0

[data]
dataset = "digits"
image_size = 32
augment = ["crop"]
subset = {subset}
folds = {folds}

[model]
arch = "resnet18"
weights = "{weights}"
freeze = "{freeze}"

[train]
epochs = {epochs}
batch_size = 64
checkpoint_every = 0

[space]
lr = [1e-4, 1e-2]
optimizer = ["adam", "rmsprop"]
scheduler = ["step", "exponential", "plateau"]
dropout = [0.0, 0.5]

[space.step]
step_size = [1, 2]

[ensemble]
top_k = 3
"""
SINGLE = {"subset": 0, "folds": 0, "weights": "none", "freeze": "none"}
STUDIES = {  # the brief's study; its cross-validated twin; one whose trials share their start, so soups are made
    "tiny.toml": STUDY.format(name="tiny", n_trials=4, pruner="median", epochs=2, **SINGLE),
    "tiny-cv.toml": STUDY.format(name="tiny-cv", n_trials=2, pruner="wilcoxon", epochs=1,
                                 **(SINGLE | {"subset": 600, "folds": 3})),
    "tiny-soup.toml": STUDY.format(name="tiny-soup", n_trials=3, pruner="none", epochs=1,
                                   **(SINGLE | {"subset": 600, "weights": "init.safetensors", "freeze": "backbone"})),
}
INIT_WEIGHTS = "init.safetensors"  # a seeded random ResNet-18: every trial of tiny-soup starts from it
POOL = "pool"  # digit PNGs for predict and select, and one unreadable file
POOL_IMAGES = 12
CLI = "import sys; from hpsearch.cli import main; sys.exit(main())"


# ------------------------------------------------------------------------------------------------- the steps


@dataclass(frozen=True)
class Step:
    """One CLI command run by both sides in `WORKDIR/<side>/<name>`; `{dir}` in args is that folder (relative)."""

    name: str
    args: tuple[str, ...]
    study_from: str | None = None  # copy this step's study.db and artifacts (from the old side) into {dir}
    inputs: tuple[tuple[str, str], ...] = ()  # (old side's path, path in {dir}) copied in first
    fresh_run: bool = False  # Part A: trial durations and host memory are measured, not computed


def _db(folder: str = "{dir}") -> tuple[str, ...]:
    return ("--storage", f"sqlite:///{folder}/study.db")


def _store() -> tuple[str, ...]:
    return (*_db(), "--artifacts", "{dir}/artifacts")


def single_split_steps() -> list[Step]:
    study, fresh = "tiny.toml", "A-run"
    export = (("B-ensemble-weighted/out", "export"),)
    return [
        Step(fresh, ("run", study, *_store()), fresh_run=True),
        Step("B-status", ("status", study, *_store()), study_from=fresh),
        Step("B-check", ("check", study, *_db()), study_from=fresh),
        Step("B-run-finished", ("run", study, *_store()), study_from=fresh),
        *(Step(f"B-ensemble-{m}", ("ensemble", study, *_store(), "--method", m, "--out", "{dir}/out"), study_from=fresh)
          for m in ("weighted", "soft", "hard", "soup")),
        Step("B-ensemble-onnx", ("ensemble", study, *_store(), "--onnx", "--out", "{dir}/out"), study_from=fresh),
        Step("B-predict", ("predict", "{dir}/export", POOL), inputs=export),
        Step("B-select", ("select", "{dir}/export", POOL, "--n", "3", "--out", "{dir}/selected.csv"), inputs=export),
        Step("B-report", ("report", study, *_store(), "--out", "{dir}/out"), study_from=fresh),
        Step("B-report-ensemble", ("report", study, *_store(), "--out", "{dir}/out", "--ensemble", "{dir}/export"),
             inputs=export, study_from=fresh),
    ]


def cross_validated_steps() -> list[Step]:
    study, fresh = "tiny-cv.toml", "CV-A-run"
    export = (("CV-B-ensemble-weighted/out", "export"),)
    return [
        Step(fresh, ("run", study, *_store()), fresh_run=True),
        Step("CV-B-status", ("status", study, *_store()), study_from=fresh),
        Step("CV-B-ensemble-weighted", ("ensemble", study, *_store(), "--out", "{dir}/out"), study_from=fresh),
        Step("CV-B-ensemble-soup", ("ensemble", study, *_store(), "--method", "soup", "--out", "{dir}/out"),
             study_from=fresh),
        Step("CV-B-predict", ("predict", "{dir}/export", POOL), inputs=export),
        Step("CV-B-report-ensemble", ("report", study, *_store(), "--out", "{dir}/out", "--ensemble",
                                      "{dir}/export"), inputs=export, study_from=fresh),
    ]


def soup_steps() -> list[Step]:
    study, fresh = "tiny-soup.toml", "S-A-run"
    return [
        Step(fresh, ("run", study, *_store()), fresh_run=True),
        Step("S-B-ensemble-soup", ("ensemble", study, *_store(), "--method", "soup", "--out", "{dir}/out"),
             study_from=fresh),
    ]


# ---------------------------------------------------------------------------------------------- the sides


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


def input_files() -> dict[str, bytes]:
    """The study files, the soup study's starting weights and the image pool: written once, copied to each side."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image
    from safetensors.torch import save
    from sklearn.datasets import load_digits

    files = {name: text.encode("utf-8") for name, text in STUDIES.items()}
    torch.manual_seed(0)
    files[INIT_WEIGHTS] = save(torchvision.models.resnet18(num_classes=10).state_dict())
    digits = load_digits()
    for i in range(POOL_IMAGES):  # the dataset's last images, 8x8 of 0-16, as 32x32 grey PNGs
        index = len(digits.images) - 1 - i
        pixels = (digits.images[index] * 255 / 16).round().astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((32, 32), Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files[f"{POOL}/digit-{i:02d}-label-{digits.target[index]}.png"] = buffer.getvalue()
    files[f"{POOL}/unreadable.png"] = b"this is no PNG\n"  # predict and select name it, skip it, exit 3
    return files


def write_inputs(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


# ----------------------------------------------------------------------------------------------- running


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


# ------------------------------------------------------------------------------------------ normalisation


TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2}| UTC)?")
ELAPSED = re.compile(r"(?<![\d:])\d+:\d{2}:\d{2}(?![\d:])")  # rich's progress columns, H:MM:SS
DURATION = re.compile(r"\b(in|took|after) \d+(?:\.\d+)? ?(?:ms|s|min)\b")
PNG_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")
SHA256 = re.compile(r"\b[0-9a-f]{64}\b")
UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
TEXT_SUFFIXES = {".json", ".csv", ".md", ".html", ".txt", ".toml"}
TEXT_NAMES = {"SHA256SUMS"}
TABLE_RULE = set("┏┓┗┛┡┩└┘┌┐├┤━─┳┻╇┴┬┼╋ ")
ONNX_PROVENANCE = {"namespace", "pkg.torch.onnx.class_hierarchy", "pkg.torch.onnx.stack_trace"}
VOLATILE_TRIAL_ATTRS = {"memory_at_start"}  # the host's resident memory when the trial started: measured


@dataclass
class Normaliser:
    """Narrow text rules, plus the names a file's bytes go by (its sha256, its artifact id) mapped to its
    content as compared, filled in per folder as its files are read."""

    places: list[tuple[str, str]]  # (absolute path, placeholder), longest first
    hashes: dict[str, str] = field(default_factory=dict)  # raw sha256 -> content token
    artifacts: dict[str, str] = field(default_factory=dict)  # artifact id -> content token

    def text(self, text: str) -> str:
        for path, placeholder in self.places:
            text = text.replace(path, placeholder)
        text = PNG_URI.sub(lambda m: f"data:image/png;pixels={png_digest(base64.b64decode(m.group(1)))}", text)
        text = TIMESTAMP.sub("<TIME>", text)
        text = ELAPSED.sub("<ELAPSED>", text)
        text = DURATION.sub(lambda m: f"{m.group(1)} <DURATION>", text)
        text = re.sub(rf"\b{re.escape(socket.gethostname())}:\d+\b", "<HOST>:<PID>", text)
        text = SHA256.sub(lambda m: self.hashes.get(m.group(0), m.group(0)), text)
        return UUID.sub(lambda m: self.artifacts.get(m.group(0), m.group(0)), text)


def mask_table_column(text: str, header: str) -> str:
    """Rich tables cell by cell, padding dropped, with the cells under `header` masked: the `sec` column of a
    fresh run's trials is how long they took (it may widen the table, hence no padding)."""
    lines, index = [], None
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)]
        if len(cells) > 2 and "┃" in line:
            index = cells.index(header) if header in cells else None
        elif len(cells) > 2 and index is not None and index < len(cells):
            cells[index] = "<masked>"
        if len(cells) > 2:
            lines.append(" | ".join(cells))
        else:
            lines.append("<rule>" if line.strip() and set(line) <= TABLE_RULE else line.strip())
    return "\n".join(lines) + "\n"


def short(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def png_digest(data: bytes) -> str:
    """A PNG by its pixels (matplotlib's metadata chunks carry its version and may carry dates)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return f"{image.mode}-{image.width}x{image.height}-{short(image.tobytes())}"


def safetensors_digest(data: bytes) -> str | None:
    """A safetensors file by its header (keys sorted: the writer orders its metadata at random) and tensor bytes."""
    if len(data) < 10 or data[8:9] != b"{":
        return None
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + size])
    except (ValueError, UnicodeDecodeError):
        return None
    return f"header-{short(json.dumps(header, sort_keys=True).encode())}-data-{short(data[8 + size:])}"


_BINARY_CACHE: dict[tuple[int, int, int, int], tuple[str, str]] = {}


def binary_fingerprint(path: Path) -> tuple[str, str]:
    """(raw sha256, what is compared), cached per inode and mtime (hard-linked stores are read once)."""
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _BINARY_CACHE:
        data = path.read_bytes()
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            compared = f"png {png_digest(data)}"
        elif path.suffix == ".onnx":
            compared = f"onnx {onnx_digest(data)}"
        else:
            tensors = safetensors_digest(data)
            compared = f"safetensors {tensors}" if tensors else f"bytes {short(data)}"
        _BINARY_CACHE[key] = (hashlib.sha256(data).hexdigest(), compared)
    return _BINARY_CACHE[key]


def onnx_digest(data: bytes) -> str:
    """An ONNX model without its nodes' provenance: torch.onnx records, per node, the Python module path of each
    traced class and a stack trace of source files and line numbers, which move with a refactor. Ops,
    attributes, weights, names and the fx node text stay compared."""
    import onnx

    model = onnx.load_from_string(data)
    for node in [*model.graph.node, *(n for function in model.functions for n in function.node)]:
        kept = [prop for prop in node.metadata_props if prop.key not in ONNX_PROVENANCE]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return f"graph-{short(model.SerializeToString(deterministic=True))}"


def dump_studies(db: Path) -> str:
    """Every study in a SQLite file as JSON: attrs, and per trial its state, values, params, intermediate values
    and attrs. Left out: start/end times (trial durations show in the reports that print them)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    try:
        studies = [{
            "name": s.study_name, "directions": [d.name for d in s.directions],
            "user_attrs": storage.get_study_user_attrs(s._study_id),
            "system_attrs": storage.get_study_system_attrs(s._study_id),
            "trials": [_trial_record(t) for t in storage.get_all_trials(s._study_id, deepcopy=False)],
        } for s in storage.get_all_studies()]
    finally:
        storage.remove_session()
        storage.engine.dispose()
    return json.dumps(studies, indent=1, sort_keys=True, default=repr) + "\n"


def _trial_record(trial: Any) -> dict[str, Any]:
    return {"number": trial.number, "state": trial.state.name, "values": trial.values, "params": trial.params,
            "distributions": {k: repr(v) for k, v in trial.distributions.items()},
            "intermediate_values": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
            "user_attrs": drop_measured(trial.user_attrs), "system_attrs": trial.system_attrs}


def drop_measured(value: Any, parent: str = "") -> Any:
    """Trial attrs without what a run measures rather than computes: the host memory at the trial's start, and
    the seconds of each epoch in a fold's `history`."""
    if isinstance(value, dict):
        return {k: drop_measured(v, k) for k, v in value.items()
                if k not in VOLATILE_TRIAL_ATTRS and not (parent == "history" and k == "seconds")}
    if isinstance(value, list):
        return [drop_measured(v, parent) for v in value]
    return value


def fingerprint_tree(folder: Path, norm: Normaliser) -> dict[str, str]:
    """Every file under `folder`: relative path -> normalised text, or a line naming its content."""
    norm = Normaliser(norm.places)  # this folder's hashes and artifact ids only
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(("-journal", "-wal", "-shm")))
    texts: dict[str, str] = {}
    text_hashes: dict[str, str] = {}
    found: dict[str, str] = {}
    stores: dict[str, list[str]] = {}  # artifact store folder -> its files' contents (their ids are random)
    for path in paths:
        rel = path.relative_to(folder).as_posix()
        if path.suffix == ".db":
            texts[rel] = dump_studies(path)
        elif path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES:
            texts[rel] = path.read_text(encoding="utf-8", errors="replace")
            text_hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            raw, compared = binary_fingerprint(path)
            norm.hashes[raw] = f"<sha256 of {compared}>"
            if UUID.fullmatch(path.name):
                norm.artifacts[path.name] = f"<artifact {compared}>"
                stores.setdefault(f"{path.parent.relative_to(folder).as_posix()}/* (by content)", []).append(compared)
            else:
                found[rel] = compared
    for _ in range(3):  # a text naming another text's sha256 (SHA256SUMS names manifest.json) needs two passes
        for rel, raw in text_hashes.items():
            norm.hashes[raw] = f"<sha256 of text {short(norm.text(texts[rel]).encode())}>"
    files = {norm.text(rel): f"{line}\n" for rel, line in found.items()}
    files |= {rel: "".join(f"{c}\n" for c in sorted(contents)) for rel, contents in stores.items()}
    for rel, text in texts.items():
        files[norm.text(rel)] = readable(rel, norm.text(text))
    return files


def readable(rel: str, text: str) -> str:
    """Normalised text laid out for diffs: a study dump re-sorted once artifact ids became contents, a page one
    tag per line (it is written as one line); nothing is dropped."""
    if rel.endswith(".db"):
        return json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n"
    return re.sub(r">(?=<)", ">\n", text) if rel.endswith(".html") else text


# ------------------------------------------------------------------------------------------- comparing


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


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
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


if __name__ == "__main__":
    sys.exit(main())
