"""What the tests share besides fixtures (those are in conftest.py): tiny study files, the `hpsearch` command in
a fresh process, the storages and artifact stores tests run against, the processes the process-level tests start
and kill, and the small real studies and exports the ensemble, export and predict tests build without training.

Test modules import these as `from tests.support import ...`; no test module imports another's helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState
from PIL import Image
from torch import nn

import hpsearch

if TYPE_CHECKING:
    from hpsearch.config import DataSection
    from hpsearch.preprocess import Preprocess

PG_ADMIN_URL = os.environ.get("HPSEARCH_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

# Every storage backend tests run against; PostgreSQL is the real server on 127.0.0.1:5432.
STORAGES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
# ... and, for what a worker does through the storage API, the same through a real `hpsearch storage-proxy`
# process in front of a fresh PostgreSQL database (its heartbeat grace is 3 s, like the kill tests' studies).
PROXIED = pytest.param("grpc", marks=pytest.mark.postgres)
STORAGES_AND_PROXY = [*STORAGES, PROXIED]
PROXY_GRACE_S = 3


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_postgres() -> None:
    """Skip (fail under CI) when the PostgreSQL server is not reachable."""
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN_URL)
    try:
        with admin.connect():
            pass
    except sa.exc.OperationalError as err:
        _unreachable(err)
    finally:
        admin.dispose()


def _unreachable(err: Exception) -> None:
    reason = f"PostgreSQL at {PG_ADMIN_URL} is not reachable ({str(err).splitlines()[0]}); start it (see .ci/run)"
    if os.environ.get("CI"):
        pytest.fail(reason)  # CI must run the PostgreSQL tests, never skip them
    pytest.skip(reason)


def postgres_database() -> Iterator[str]:
    import sqlalchemy as sa

    db = f"hpsearch_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{db}"'))
    except sa.exc.OperationalError as err:
        _unreachable(err)
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{db}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()


class Proxy:
    """A running `hpsearch storage-proxy` process; `restart()` stops it (SIGTERM) and starts it on its port."""

    def __init__(self, database: str, log: Path, grace: int, pool_size: int) -> None:
        self.database, self.log, self.port = database, log, free_port()
        self.argv = [sys.executable, "-m", "hpsearch", "storage-proxy", "--port", str(self.port),
                     "--heartbeat-grace", str(grace), "--pool-size", str(pool_size)]
        self.url = f"grpc://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            # The database URL travels in the environment, as the README tells operators to pass it.
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                            env=cli_env(HPSEARCH_STORAGE=self.database), start_new_session=True)
        deadline = time.monotonic() + 60
        while not _listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"storage proxy did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def storage_proxy(database: str, log: Path, *, grace: int = PROXY_GRACE_S, pool_size: int = 4) -> Iterator[Proxy]:
    proxy = Proxy(database, log, grace, pool_size)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# Every kind of artifact store: a folder, and S3 (moto's S3 server over HTTP, reached through boto3 exactly as
# a worker reaches AWS or MinIO: credentials and endpoint from the environment).
ARTIFACT_STORES = ["folder", "s3"]


def fit_head(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int) -> None:
    """Fit a ResNet's head in closed form (ridge regression of one-hot labels on its features): trained-
    enough members for ensemble tests, without training."""
    fc = model.fc
    model.fc = nn.Identity()
    with torch.no_grad():
        f = model(x).double()
        f1 = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], dim=1)
        target = nn.functional.one_hot(y, classes).double() * 10 - 5
        w = torch.linalg.solve(f1.T @ f1 + 1e-2 * torch.eye(f1.shape[1], dtype=f.dtype), f1.T @ target)
        fc.weight.copy_(w[:-1].T.float())
        fc.bias.copy_(w[-1].float())
    model.fc = fc


@contextlib.contextmanager
def dashboard_http(url: str, artifacts: Path | str) -> Iterator[Callable[[str], tuple[int, bytes]]]:
    """optuna-dashboard (its WSGI app, as `hpsearch dashboard` serves it) on a real local port, in a thread;
    yields get(path) -> (HTTP status, body)."""
    import threading
    import urllib.error
    import urllib.request
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from optuna_dashboard import wsgi

    from hpsearch.store import open_artifact_store, open_storage

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    app = wsgi(open_storage(url, reader=True), artifact_store=open_artifact_store(artifacts, create=False))
    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(base + path, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.read()

    try:
        yield get
    finally:
        server.shutdown()
        server.server_close()


def s3_keys(bucket: str, prefix: str = "") -> dict[str, int]:
    """Key -> size of every object under `prefix` in the test S3 server's `bucket`."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"]: obj["Size"] for page in pages for obj in page.get("Contents", [])}


def dashboard_artifacts(get: Callable[[str], tuple[int, bytes]], study_id: int) -> dict[int, set[str]]:
    """Trial number -> the artifact ids the dashboard lists for it (its study API, as the web page reads it)."""
    import json

    status, body = get(f"/api/studies/{study_id}?after=0")
    assert status == 200, body
    return {t["number"]: {a["artifact_id"] for a in t["artifacts"]} for t in json.loads(body)["trials"]}


# ------------------------------------------------------------------ processes a test starts and kills


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def process_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPSEARCH_")}
    env["HPSEARCH_CACHE_DIR"] = os.environ["HPSEARCH_CACHE_DIR"]  # the test run's own (conftest)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Procs:
    """Starts processes in their own process group, logs to files, kills what is left at teardown."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], name: str, **env: str) -> subprocess.Popen[bytes]:
        with open(self.folder / f"{name}.out", "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env={**process_env(), **env},
                                    cwd=self.folder, start_new_session=True)
        proc.name = name  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def output(self, proc: subprocess.Popen[bytes], tail: int = 4000) -> str:
        text = (self.folder / f"{proc.name}.out").read_text(errors="replace")  # type: ignore[attr-defined]
        return text[-tail:]

    def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{proc.name} did not exit within {timeout:.0f} s:\n{self.output(proc)}")  # type: ignore[attr-defined]

    def kill_all(self) -> None:
        for proc in self.started:
            # The process and every worker it started (its own session); only while one of them is left.
            if proc.poll() is None or session_members(proc.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def hpsearch_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpsearch", *args]


def trials_of(url: str, name: str) -> list[FrozenTrial]:
    """The study's trials as another process sees them now ([] while the study does not exist yet)."""
    storage = hpsearch.open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return []
    finally:
        hpsearch.store._storage.close_storage(storage)


def states_of(trials: list[FrozenTrial]) -> dict[str, int]:
    return dict(Counter(t.state.name for t in trials))


def session_members(sid: int) -> list[int]:
    """Pids in session `sid` (the run and everything it started; Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def held_trials(url: str, name: str, n: int, proc: subprocess.Popen[bytes], procs: Procs) -> list[FrozenTrial]:
    """Wait until `n` trials are RUNNING and held after their first epoch's checkpoint (never a new trial's
    retry); the held trials."""

    def held() -> list[FrozenTrial]:
        if proc.poll() is not None:
            pytest.fail(f"{proc.name} exited early ({proc.returncode}):\n{procs.output(proc)}")  # type: ignore[attr-defined]
        running = [t for t in trials_of(url, name) if t.state == TrialState.RUNNING and "worker" in t.user_attrs
                   and t.user_attrs.get("checkpoint_epoch") == 1 and "failed_trial" not in t.system_attrs]
        return running if len(running) >= n else []

    return wait_until(f"{n} trial(s) held after epoch 1", held, timeout=240, every=0.2)


# ------------------------------------------------------------------------------ image folders


def solid_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A real, valid PNG of a few tens of KiB whose header declares side x side pixels (1-bit grey, all black):
    a decompression bomb (20,000 x 20,000 = 400 megapixels, 1.2 GB as RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    rows = (b"\x00" * (1 + (side + 7) // 8)) * 1000  # filter byte 0, then the row's packed bits
    body = b"".join(packer.compress(rows) for _ in range(side // 1000)) + packer.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


COLOURS = {"cat": (200, 30, 30), "dog": (20, 180, 40), "eel": (10, 20, 230)}


def colour_folder(root: Path, parts: dict[str, int], size: tuple[int, int] = (20, 12)) -> Path:
    """root/<part>/<class>/<i>.png, each class a solid colour (its content is checked after decoding)."""
    for part, per_class in parts.items():
        for name, colour in COLOURS.items():
            for i in range(per_class):
                solid_png(root / part / name / f"{i}.png", colour, size)
    return root


# ---------------------------------------------------------------- an export the export and predict tests read

N_MEMBERS = 2


@dataclass(frozen=True)
class Exported:
    folder: Path
    url: str
    store: Path
    pool_images: torch.Tensor  # uint8 test images of the pool, split order
    test_labels: torch.Tensor
    pre: Preprocess
    tmp: Path


def build_export(tmp: Path) -> Exported:
    """A real study on real digits (search.open_study), not trained: N_MEMBERS randomly initialised ResNet-18s
    whose heads are fitted in closed form, exported by `hpsearch ensemble --method soft` into tmp/ens."""
    from torchvision import models

    from hpsearch.cli._main import main
    from hpsearch.config import read_study_file
    from hpsearch.preprocess import Preprocess
    from hpsearch.search._objective import suggest
    from hpsearch.search._study import open_study, prepare
    from hpsearch.store import StudyArtifacts, TrialOutputs, open_artifact_store, open_storage, upload_trial_artifacts

    path = write_study(tmp / "tiny.toml", tiny_tables("tiny", data={"subset": 300}))
    cfg = read_study_file(path)
    url, store_dir = f"sqlite:///{tmp / 'study.db'}", tmp / "artifacts"
    prepared = prepare(cfg)
    storage = open_storage(url)
    study = open_study(cfg, storage, prepared, store_dir)
    attrs = study.user_attrs["preprocess"]
    pre = Preprocess(attrs["image_size"], tuple(attrs["mean"]), tuple(attrs["std"]))
    pool, split = prepared.pool, prepared.split
    images = {k: pre(pool.images[torch.from_numpy(getattr(split, k))]) for k in ("train", "val", "test")}
    labels = {k: pool.labels[torch.from_numpy(getattr(split, k))] for k in ("train", "val", "test")}
    files = StudyArtifacts(open_artifact_store(store_dir), storage, study.study_name, str(store_dir))
    for seed in range(N_MEMBERS):
        trial = study.ask()
        suggest(trial, cfg.space)
        torch.manual_seed(seed)
        model = models.get_model("resnet18", num_classes=10).eval()
        fit_head(model, images["train"], labels["train"], 10)
        with torch.no_grad():
            val, test = model(images["val"]), model(images["test"])
        outputs = TrialOutputs(val, test, split.sha256(), labels["val"], labels["test"])
        upload_trial_artifacts(files, trial, {k: v.contiguous() for k, v in model.state_dict().items()}, outputs,
                               {"arch": "resnet18"})
        study.tell(trial, float((val.argmax(1) == labels["val"]).float().mean()))
    out = tmp / "ens"
    rc = main(["ensemble", str(path), "--storage", url, "--artifacts", str(store_dir), "--out", str(out),
               "--method", "soft"])
    assert rc == 0
    test_idx = torch.from_numpy(split.test)
    return Exported(out, url, store_dir, pool.images[test_idx], pool.labels[test_idx], pre, tmp)


def member_state(ex: Exported, trial: int) -> dict[str, torch.Tensor]:
    """The weights the study stored for `trial` of an export's study."""
    from hpsearch.store import load_trial_weights, open_artifact_store, open_storage

    study = optuna.load_study(study_name="tiny", storage=open_storage(ex.url))
    return load_trial_weights(open_artifact_store(ex.store), study.trials[trial])


# ------------------------------------------------- a lab: real studies of one fine-tuned model and perturbations
# The soup and TTA tests' studies are real (search.open_study on real digits, with a local "pretrained" weights file)
# and their trials start from that file; instead of training, each trial is the fine-tuned model moved by a known
# perturbation of its head, so what averaging or a test-time view does is known in advance.


State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Lab:
    tmp: Path
    init: Path  # the shared "pretrained" weights file
    url: str
    store: Path
    base: State  # the fine-tuned model every perturbed trial is built around
    pre: Preprocess
    test_images: torch.Tensor  # uint8, split order
    test_x: torch.Tensor  # preprocessed


def perturbed(base: State, sigma: float, seed: int, sign: float = 1.0) -> State:
    state = {k: v.clone() for k, v in base.items()}
    noise = torch.randn(state["fc.weight"].shape, generator=torch.Generator().manual_seed(seed))
    state["fc.weight"] += sign * sigma * float(base["fc.weight"].std()) * noise
    return state


def lab_study_file(tmp: Path, name: str, weights: str) -> Path:
    return write_study(tmp / f"{name}.toml", tiny_tables(name, data={"subset": 300}, model={"weights": weights}))


def lab_study(lab: Lab, name: str, states: Sequence[State], weights: str | None = None,
                init_tags: Sequence[str | None] | None = None, archs: Sequence[str] | None = None) -> Path:
    """A real study whose trials carry `states` as their weights, outputs computed from them."""
    from torchvision import models

    from hpsearch.config import read_study_file
    from hpsearch.keys import INIT_WEIGHTS as ATTR_INIT_WEIGHTS
    from hpsearch.model import init_weights_tag
    from hpsearch.search._objective import suggest
    from hpsearch.search._study import open_study, prepare
    from hpsearch.store import StudyArtifacts, TrialOutputs, open_artifact_store, open_storage, upload_trial_artifacts

    path = lab_study_file(lab.tmp, name, weights or str(lab.init))
    cfg = read_study_file(path)
    prepared = prepare(cfg)
    storage = open_storage(lab.url)
    study = open_study(cfg, storage, prepared, lab.store)
    pool, split = prepared.pool, prepared.split
    x = {k: lab.pre(pool.images[torch.from_numpy(getattr(split, k))]) for k in ("val", "test")}
    y = {k: pool.labels[torch.from_numpy(getattr(split, k))] for k in ("val", "test")}
    files = StudyArtifacts(open_artifact_store(lab.store), storage, study.study_name, str(lab.store))
    for i, state in enumerate(states):
        trial = study.ask()
        suggest(trial, cfg.space)
        tag = init_tags[i] if init_tags is not None else init_weights_tag(cfg.model)
        if tag is not None:
            trial.set_user_attr(ATTR_INIT_WEIGHTS, tag)
        model = models.get_model(archs[i] if archs else "resnet18", num_classes=10)
        model.load_state_dict(state)
        with torch.no_grad():
            val, test = model.eval()(x["val"]), model(x["test"])
        upload_trial_artifacts(files, trial, state, TrialOutputs(val, test, split.sha256(), y["val"], y["test"]),
                               {"arch": "resnet18"})
        study.tell(trial, float((val.argmax(1) == y["val"]).float().mean()))
    return path


def make_lab(tmp: Path) -> Lab:
    """A "pretrained" ResNet-18 weights file in tmp, and the model fine-tuned from it (head fitted in closed form)."""
    from safetensors.torch import save_file
    from torchvision import models

    from hpsearch.config import read_study_file
    from hpsearch.model import build_model
    from hpsearch.preprocess import Preprocess
    from hpsearch.search._study import prepare

    torch.manual_seed(0)
    init = tmp / "init.safetensors"
    save_file(models.resnet18().state_dict(), str(init))  # a "pretrained" ImageNet-shaped checkpoint
    cfg = read_study_file(lab_study_file(tmp, "probe", str(init)))
    prepared = prepare(cfg)
    pre = Preprocess(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # pretrained: ImageNet statistics
    pool, split = prepared.pool, prepared.split
    model = build_model(cfg.model, 10, 32).eval()  # backbone from the file, new head
    train = torch.from_numpy(split.train)
    fit_head(model, pre(pool.images[train]), pool.labels[train], 10)
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    test_images = pool.images[torch.from_numpy(split.test)]
    return Lab(tmp, init, f"sqlite:///{tmp / 'study.db'}", tmp / "artifacts", base, pre, test_images,
               pre(test_images))


def lab_ensemble(lab: Lab, path: Path, out: Path, *extra: str) -> int:
    """`hpsearch ensemble` (in this process) of a lab study."""
    from hpsearch.cli._main import main

    return main(["ensemble", str(path), "--storage", lab.url, "--artifacts", str(lab.store), "--out", str(out),
                 "--device", "cpu", *extra])


def imagefolder_section(root: Path, tmp_path: Path, **extra: object) -> DataSection:
    """An imagefolder [data] section over `root`, 16 px, its cache in tmp_path/cache."""
    from hpsearch.config import DataSection

    fields: dict[str, object] = {"dataset": "imagefolder", "root": str(root), "image_size": 16, "augment": [],
                                 "cache_dir": str(tmp_path / "cache"), **extra}
    return DataSection.model_validate(fields)
