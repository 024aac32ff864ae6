"""The `hpsearch` command as a user runs it: real processes, real storages, Optuna's own CLI and the dashboard
reading what `hpsearch run` wrote."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest

from hpsearch import __version__
from hpsearch.store import open_storage
from tests.support import (
    STORAGES,
    bomb_png,
    cli_env,
    colour_folder,
    free_port,
    postgres_database,
    run_cli,
    tiny_tables,
    write_study,
)

BIN = Path(sys.executable).parent
STUDY = "clitiny"


# ------------------------------------------------------------------------------------ no study needed


def test_version_from_the_installed_script(tmp_path):
    script = BIN / "hpsearch"
    assert script.is_file(), f"{script} is missing: is the package installed (pip install -e .)?"
    done = subprocess.run([str(script), "--version"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"hpsearch {__version__}"


@pytest.mark.parametrize("command, options", [
    ([], ["run", "check", "status", "dashboard", "report"]),
    (["run"], ["STUDY.toml", "--storage", "--n-trials", "--timeout", "--workers", "--device", "--artifacts"]),
    (["check"], ["STUDY.toml", "--storage"]),
    (["status"], ["STUDY.toml", "--storage", "--artifacts", "--top-k"]),
    (["dashboard"], ["--storage", "--artifacts", "--host", "--port", "--allow-remote"]),
])
def test_help(command, options, tmp_path):
    done = run_cli(*command, "--help", cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: hpsearch {' '.join(command)}".rstrip())
    for option in options:
        assert option in done.stdout, f"{option} missing from `hpsearch {' '.join(command)} --help`"
    assert done.stderr == ""


def test_dashboard_refuses_a_remote_host_without_allow_remote(tmp_path):
    done = run_cli("dashboard", "--host", "0.0.0.0", "--port", str(free_port()), cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--host 0.0.0.0" in lines[0] and "--allow-remote" in lines[0] and "authentication" in lines[0]
    assert done.stdout == ""


@dataclass
class Dashboard:
    """A real `hpsearch dashboard` process on a free port; `log` holds its stderr (the URL line, the requests)."""

    port: int
    log: Path
    proc: subprocess.Popen[str]

    def request(self, path: str, host: str | None = None, **headers: str) -> tuple[int, dict[str, str], bytes]:
        """One real HTTP GET to 127.0.0.1:PORT with this Host header (default: 127.0.0.1:PORT)."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path, headers={"Host": f"127.0.0.1:{self.port}" if host is None else host, **headers})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


@contextmanager
def dashboard(tmp_path: Path, *args: str) -> Iterator[Dashboard]:
    """`hpsearch dashboard ARGS` on an empty SQLite storage, answering within 60 s; stopped by Ctrl-C (exit 0)."""
    open_storage(f"sqlite:///{tmp_path / 'dash.db'}")  # the dashboard only reads a storage, never creates one
    port = free_port()
    log = tmp_path / "dashboard.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "hpsearch", "dashboard", "--storage",
                                 f"sqlite:///{tmp_path / 'dash.db'}", "--port", str(port), *args],
                                cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=err, text=True)
    running = Dashboard(port, log, proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"dashboard exited {proc.returncode}: {log.read_text()}"
            try:
                running.request("/api/studies")
                break
            except OSError:
                assert time.monotonic() < deadline, "dashboard did not answer within 60 s"
                time.sleep(0.25)
        yield running
    finally:
        time.sleep(0.5)  # wsgiref swallows a Ctrl-C that lands while it answers (see the test below)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("dashboard did not stop on Ctrl-C within 30 s")
    assert proc.returncode == 0, log.read_text()


def test_dashboard_answers_only_requests_for_its_own_address(tmp_path):
    """DNS rebinding: a page from attacker.example, its name pointed at 127.0.0.1, sends Host attacker.example."""
    with dashboard(tmp_path) as dash:
        for host in (f"127.0.0.1:{dash.port}", f"localhost:{dash.port}", f"LOCALHOST:{dash.port}"):
            status, _, body = dash.request("/api/studies", host)
            assert status == 200 and json.loads(body) == {"study_summaries": []}, (host, status, body)
        for host in (f"attacker.example:{dash.port}", "attacker.example", f"127.0.0.1:{dash.port + 1}",
                     f"127.0.0.1.attacker.example:{dash.port}", ""):
            status, _, body = dash.request("/api/studies", host)
            assert status == 403 and b"study_summaries" not in body, (host, status, body)
        # The right Host, but sent by another site's page (its Origin): no cross-site request either.
        status, _, _ = dash.request("/api/studies", Origin="http://attacker.example")
        assert status == 403
        assert dash.request("/api/studies", Origin=f"http://127.0.0.1:{dash.port}")[0] == 200
    text = dash.log.read_text()
    assert f"optuna-dashboard on http://127.0.0.1:{dash.port}/ for sqlite:///" in text, text
    assert "token=" not in text and "Traceback" not in text, text


def test_dashboard_with_allow_remote_needs_the_token_it_printed(tmp_path):
    with dashboard(tmp_path, "--host", "0.0.0.0", "--allow-remote") as dash:
        printed = re.search(rf"optuna-dashboard on http://0\.0\.0\.0:{dash.port}/\?token=([\w-]+) for ",
                            dash.log.read_text())
        assert printed, dash.log.read_text()
        token = printed[1]
        assert len(token) >= 32
        # Without it, or with another, nothing is answered.
        for path, headers in [("/api/studies", {}), ("/api/studies?token=wrong", {}),
                              ("/api/studies", {"Cookie": f"hpsearch_dashboard_{dash.port}=wrong"}),
                              ("/api/studies", {"Authorization": "Bearer wrong"})]:
            status, _, body = dash.request(path, **headers)
            assert status == 401 and b"study_summaries" not in body and b"token=" in body, (path, headers, status)
        # The printed URL's token sets a cookie and sends the browser on without it in its address bar.
        status, headers, _ = dash.request(f"/dashboard?token={token}&x=1", host="10.0.0.5:8080")
        assert status == 303 and headers["Location"] == "/dashboard?x=1", (status, headers)
        cookie = headers["Set-Cookie"].split(";")[0]
        assert cookie == f"hpsearch_dashboard_{dash.port}={token}" and "HttpOnly" in headers["Set-Cookie"]
        for extra in ({"Cookie": cookie}, {"Authorization": f"Bearer {token}"}):
            status, _, body = dash.request("/api/studies", host="10.0.0.5:8080", **extra)
            assert status == 200 and json.loads(body) == {"study_summaries": []}, (extra, status, body)
    text = dash.log.read_text()
    assert text.count(token) == 1, f"the token is printed once, in the URL; the request log masks it:\n{text}"


def test_status_of_a_study_that_does_not_exist_exits_2(tmp_path):
    study = write_study(tmp_path / "ghost.toml", tiny_tables("ghost"))
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    open_storage(url)  # a storage holding other studies, or none: not this one
    done = run_cli("status", str(study), "--storage", url, cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert "study 'ghost' does not exist" in done.stderr and "hpsearch run" in done.stderr
    assert "Traceback" not in done.stderr


def test_status_shows_who_runs_what_and_why_trials_failed(tmp_path):
    """What a user with workers on several machines asks `status`: which trial runs where, how far it got,
    and which trials failed, why, and whether a retry took over."""
    url = f"sqlite:///{tmp_path / 'watch.db'}"
    study_path = write_study(tmp_path / "watch.toml", tiny_tables("watch", train={"epochs": 5}))
    study = optuna.create_study(study_name="watch", storage=open_storage(url), direction="maximize")
    dead = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    dead.set_user_attr("fail_reason", "its worker gpu-box-2:4242 died (signal 9) [supervisor]")
    study.tell(dead, state=optuna.trial.TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, study.trials[0])
    retry = study.ask()  # the queued retry, now running on another machine
    retry.set_user_attr("worker", "gpu-box-3:777")
    retry.set_user_attr("device", "cuda:1")
    retry.set_user_attr("resumed_from", {"trial": 0, "epochs_done": 1})
    retry.report(0.5, 1)
    retry.report(0.625, 2)
    crashed = study.ask()
    crashed.set_user_attr("fail_reason", "ValueError: broken batch")
    study.tell(crashed, state=optuna.trial.TrialState.FAIL)

    done = run_cli("status", str(study_path), "--storage", url, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in done.stdout.splitlines() if re.match(r"^│\s*\d+\s*│", line)}
    running = rows["1"]
    assert running[:4] == ["gpu-box-3:777", "cuda:1", "3/5", "0.6250"], done.stdout
    assert re.fullmatch(r"\d+m\d\ds", running[4]) and running[5] == "trial 0, epoch 1", done.stdout
    assert rows["0"] == ["trial 1", "its worker gpu-box-2:4242 died (signal 9) [supervisor]"], done.stdout
    assert rows["2"] == ["", "ValueError: broken batch"], done.stdout


def test_run_with_an_unusable_storage_exits_2_before_training(tmp_path):
    study = write_study(tmp_path / "t.toml", tiny_tables("t"))
    done = run_cli("run", str(study), "--storage", f"sqlite:///{tmp_path / 'missing' / 'x.db'}", cwd=tmp_path,
                    timeout=120)
    assert done.returncode == 2
    assert "does not exist; create it first" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.slow
def test_run_resumes_only_the_file_the_study_was_created_with(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = run_cli("run", str(write_study(tmp_path / "t.toml", tiny_tables("t", study={"n_trials": 1}))),
                    "--storage", url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr

    # Another model and more epochs under the same [study] name: refused before any trial, naming the first key.
    other = write_study(tmp_path / "other.toml", tiny_tables("t", model={"arch": "resnet34"}, train={"epochs": 2}))
    done = run_cli("run", str(other), "--storage", url, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].endswith(f"{other}: study 't' was created with model.arch = 'resnet18'; this file says "
                              "'resnet34': use another [study] name, or the original file"), done.stderr
    assert "Traceback" not in done.stderr and "trial 1" not in done.stderr
    epochs = write_study(tmp_path / "epochs.toml", tiny_tables("t", train={"epochs": 2}))
    done = run_cli("run", str(epochs), "--storage", url, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "train.epochs = 1; this file says 2" in done.stderr, done.stderr
    assert len(optuna.load_study(study_name="t", storage=url).trials) == 1

    # Only the budget changed: the study resumes and runs its second trial.
    more = write_study(tmp_path / "more.toml", tiny_tables("t", study={"n_trials": 2}))
    done = run_cli("run", str(more), "--storage", url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "trial 1 COMPLETE" in done.stderr
    assert len(optuna.load_study(study_name="t", storage=url).trials) == 2


@pytest.mark.parametrize("hostile", ["bomb", "link"])
def test_run_on_a_folder_with_a_bomb_or_a_link_out_exits_2_naming_it(tmp_path, hostile):
    root = colour_folder(tmp_path / "ds", {"train": 3})
    if hostile == "bomb":
        bad = bomb_png(root / "train" / "dog" / "bomb.png")  # 48 KiB declaring 20,000 x 20,000
    else:
        bad = root / "train" / "everything"
        bad.symlink_to("/")  # a class folder linked to /: refused, never crawled
    study = write_study(tmp_path / "t.toml", tiny_tables("t", data={
        "dataset": "imagefolder", "root": str(root), "image_size": 16, "subset": 0, "cache_dir": str(tmp_path / "c")}))
    done = run_cli("run", str(study), "--storage", f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"{bad}:" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------------------- one run per storage


@dataclass(frozen=True)
class Ran:
    folder: Path
    study: Path
    url: str
    artifacts: Path
    run: subprocess.CompletedProcess[str]


@dataclass
class _Runs:
    built: dict[str, Ran] = field(default_factory=dict)
    databases: list[Iterator[str]] = field(default_factory=list)  # each drops its database when exhausted


@pytest.fixture(scope="session")
def _runs() -> Iterator[_Runs]:
    """The runs below, built at most once per storage kind for the whole test run, whatever order the tests
    come in (a module fixture with params is torn down and built again when other tests run between)."""
    runs = _Runs()
    yield runs
    for urls in runs.databases:
        for _ in urls:
            pass


@pytest.fixture(params=STORAGES)
def ran(request: pytest.FixtureRequest, _runs: _Runs, tmp_path_factory: pytest.TempPathFactory) -> Ran:
    """`hpsearch run` on a tiny two-trial study, once per storage kind; the tests below only read what it left."""
    kind = request.param
    if kind not in _runs.built:
        folder = tmp_path_factory.mktemp(f"cli-{kind}")
        study = write_study(folder / f"{STUDY}.toml", tiny_tables(STUDY, ensemble={"top_k": 3}))
        urls = iter([f"sqlite:///{folder / 'study.db'}"]) if kind == "sqlite" else postgres_database()
        url = next(urls)
        _runs.databases.append(urls)
        run = run_cli("run", str(study), "--storage", url, "--artifacts", str(folder / "store"), cwd=folder)
        _runs.built[kind] = Ran(folder, study, url, folder / "store", run)
    return _runs.built[kind]


@pytest.mark.slow
def test_run_finishes_the_study_and_prints_each_trial(ran):
    assert ran.run.returncode == 0, ran.run.stderr
    assert f"study {STUDY} on" in ran.run.stderr and "0/2 finished" in ran.run.stderr
    assert "trial 0 COMPLETE" in ran.run.stderr and "trial 1 COMPLETE" in ran.run.stderr
    assert "Traceback" not in ran.run.stderr
    assert f"top 2 trials of '{STUDY}'" in ran.run.stdout
    tail = " ".join(ran.run.stderr.split())  # it ends by saying where the results are and what reads them
    assert f"weights and outputs in {ran.artifacts} next: hpsearch status {ran.study}" in tail, tail
    # Nothing lands in the working directory: the storage and the store are where they were told to be.
    assert not (ran.folder / "hpsearch.db").exists() and not (ran.folder / "artifacts").exists()
    assert len([p for p in ran.artifacts.iterdir() if p.is_file()]) == 4


@pytest.mark.slow
def test_status_prints_counts_best_and_the_top_table(ran):
    # The storage comes from HPSEARCH_STORAGE here, as in a shell that exported it.
    done = run_cli("status", str(ran.study), cwd=ran.folder, timeout=120, HPSEARCH_STORAGE=ran.url)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    header = next(line for line in text.splitlines() if "COMPLETE" in line and "PRUNED" in line)
    assert [h.strip() for h in header.strip("┃│ ").split("┃")][:3] == ["COMPLETE", "PRUNED", "FAIL"]
    assert re.search(r"│\s*2\s*│\s*0\s*│\s*0\s*│", text), text
    study = optuna.load_study(study_name=STUDY, storage=open_storage(ran.url))
    best = study.best_trial
    assert f"best: trial {best.number} val_accuracy={best.value:.4f}" in text
    assert f"artifacts: {ran.artifacts}" in text  # the store the study recorded, not ./artifacts
    assert f"top 2 trials of '{STUDY}'" in text
    rows = [line for line in text.splitlines() if re.match(r"^│\s*[01]\s*│", line)]
    assert sorted(int(r.split("│")[1]) for r in rows) == [0, 1]


@pytest.mark.slow
def test_the_commands_that_read_a_study_import_no_torch(ran):
    """`status` of a digits study (and the dashboard's module) import no torch, scipy or scikit-learn (torch alone
    is about 3 CPU-seconds to import): watching a study stays cheap beside the workers that train it."""
    probe = (
        "import sys\n"
        "from hpsearch.cli._main import main\n"
        "from hpsearch.monitor._dashboard import artifacts_for\n"
        f"code = main(['status', {str(ran.study)!r}, '--storage', {ran.url!r}])\n"
        "loaded = sorted(m for m in ('torch', 'torchvision', 'scipy', 'sklearn') if m in sys.modules)\n"
        "print('LOADED', loaded)\n"
        "raise SystemExit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ran.folder, env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "COMPLETE" in done.stdout
    assert "LOADED []" in done.stdout, done.stdout[-500:]


@pytest.mark.slow
def test_optuna_cli_lists_the_trials_with_their_params(ran):
    done = subprocess.run([str(BIN / "optuna"), "trials", "--study-name", STUDY, "--storage", ran.url, "-f", "json"],
                          cwd=ran.folder, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    trials = json.loads(done.stdout)
    assert [t["number"] for t in trials] == [0, 1]
    for t in trials:
        assert t["state"] == "COMPLETE"
        assert {"lr", "optimizer", "scheduler", "dropout"} <= set(t["params"])
        assert set(t["value"]) == {"val_accuracy"}
        assert {"weights_artifact", "outputs_artifact", "seed", "best_epoch"} <= set(t["user_attrs"])


@pytest.mark.slow
def test_dashboard_serves_the_study_and_its_artifacts(ran):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hpsearch", "dashboard", str(ran.study), "--storage", ran.url,
                             "--port", str(port)], cwd=ran.folder, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        listed = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"dashboard exited {proc.returncode}: {proc.communicate()[1]}"
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=5) as response:
                    listed = json.load(response)
                break
            except OSError:
                time.sleep(0.25)
        assert listed is not None, "dashboard did not answer within 90 s"
        assert [s["study_name"] for s in listed["study_summaries"]] == [STUDY]

        storage = open_storage(ran.url)
        study_id = storage.get_study_id_from_name(STUDY)
        trial = optuna.load_study(study_name=STUDY, storage=storage).trials[1]
        for key in ("outputs_artifact", "weights_artifact"):
            artifact_id = trial.user_attrs[key]
            url = f"{base}/artifacts/{study_id}/{trial._trial_id}/{artifact_id}"
            with urllib.request.urlopen(url, timeout=60) as response:
                assert response.status == 200
                body = response.read()
            assert body == (ran.artifacts / artifact_id).read_bytes()

        # An id the trial does not own is not served, even though the file exists in the store.
        other = optuna.load_study(study_name=STUDY, storage=storage).trials[0].user_attrs["outputs_artifact"]
        for artifact_id in (str(uuid.uuid4()), other):
            with pytest.raises(urllib.error.HTTPError) as raised:
                urllib.request.urlopen(f"{base}/artifacts/{study_id}/{trial._trial_id}/{artifact_id}", timeout=30)
            assert raised.value.code == 404
            assert raised.value.read() == b"Not Found"
            raised.value.close()
    finally:
        # wsgiref swallows a Ctrl-C that lands while it is still answering a request (a user presses it
        # again); let the last answer finish so that one Ctrl-C must be enough.
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("dashboard did not stop on Ctrl-C within 30 s")
    assert proc.returncode == 0, err
    assert f"optuna-dashboard on http://127.0.0.1:{port}/" in err and f"artifacts: {ran.artifacts}" in err
    assert "Traceback" not in err
