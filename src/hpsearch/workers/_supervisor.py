"""Starting, pinning and supervising worker processes on one machine.

Each worker is a real `hpsearch worker` process that opens the storage itself (a storage object never
crosses a process boundary). On the CPU the workers are forked from a preloaded forkserver (forkserver.py);
workers pinned to GPUs are fresh processes, so that no CUDA state can ever cross a fork.

The supervisor restarts a worker that dies, after a growing delay within a budget (workers/_restarts.py), fails
the trial it held at once (every trial records the worker that runs it) and queues one retry with the same
parameters through Optuna's `RetryHeartbeatStaleTrialCallback`. A worker frozen by SIGSTOP for FROZEN_LIMIT_S is
killed and dealt with as a dead one. SIGINT/SIGTERM stop every worker; their trials end FAIL, never
RUNNING, each with one queued retry that resumes from its checkpoint; a second signal during that shutdown is
recorded, never raised. A supervisor killed outright (kill -9) is noticed by its workers (`watch_supervisor`),
which stop as on SIGTERM; the forkserver and resource tracker then exit as their pipes close.
"""

from __future__ import annotations

import _thread
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import optuna

from hpsearch import keys
from hpsearch.errors import ExitCode, StorageUnavailableError, UsageError
from hpsearch.processes import is_stopped, process_state
from hpsearch.slurm import cpus_per_task
from hpsearch.store import fail_trials_of, finished_trials, pending, stop_generation, target_reached
from hpsearch.workers._forkserver import Launch, WorkerProcess, forkserver_launch, stop_forkserver
from hpsearch.workers._restarts import Backoff, RestartPolicy

STOP_GRACE_S = 30.0
SUPERVISOR_PID_ENV = "HPSEARCH_SUPERVISOR_PID"
GPU_SHARERS_ENV = "HPSEARCH_GPU_SHARERS"  # how many workers are pinned to this worker's GPU
SUPERVISOR_POLL_S = 1.0  # how often a worker looks whether its supervisor is still alive
# A worker stopped (SIGSTOP, state T) this long is killed and restarted: a frozen worker may hold SQLite's write
# lock, and the others' statements give up after the busy timeout (60 s), so well within it; a pause of the
# whole run (Ctrl-Z stops the supervisor too) is not counted, as the supervisor sees the stop only while it runs.
FROZEN_LIMIT_S = 30.0


def worker_env(index: int, n_workers: int, gpus: Sequence[int], per_gpu: int, storage: str | None = None
               ) -> dict[str, str]:
    """Pin worker `index` to one GPU (round-robin), and give it its share of the CPU's threads (GPU workers too:
    each feeds its GPU from the host). The storage URL travels in HPSEARCH_STORAGE, never in argv: any user on
    the machine can read a process's argv, with the password a URL may carry.

    `gpus` are indices among the GPUs this process sees: through its own CUDA_VISIBLE_DEVICES when it has one
    (with CUDA_VISIBLE_DEVICES=4,5, GPU 0 is physical 4; UUIDs and MIG ids are passed on as they are)."""
    env = dict(os.environ)
    if storage is not None:
        env["HPSEARCH_STORAGE"] = storage
    env["HPSEARCH_APP_NAME"] = f"hpsearch-worker-{index}"
    env[SUPERVISOR_PID_ENV] = str(os.getpid())  # a worker stops when this process dies (watch_supervisor)
    if gpus:
        def gpu_of(worker: int) -> int:
            return gpus[(worker // per_gpu) % len(gpus)]

        env["CUDA_VISIBLE_DEVICES"] = physical_gpu(gpu_of(index))
        # Its neighbours on that GPU (round-robin past the last GPU adds some): each keeps its share of the GPU's
        # free memory for resident data (hpsearch.data placement_for).
        env[GPU_SHARERS_ENV] = str(sum(gpu_of(w) == gpu_of(index) for w in range(n_workers)))
    # Inside a SLURM job the CPUs to share are the job's, not the node's (other jobs hold the rest).
    threads = max(1, (cpus_per_task() or os.cpu_count() or 1) // max(1, n_workers))
    env["HPSEARCH_THREADS"] = str(threads)
    return env


def _parent_visible() -> list[str] | None:
    """This process's CUDA_VISIBLE_DEVICES entries, None when it has none (every GPU is visible)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def physical_gpu(index: int) -> str:
    """What CUDA_VISIBLE_DEVICES must say for a child to see this process's GPU `index`."""
    visible = _parent_visible()
    if visible is None:
        return str(index)
    if not 0 <= index < len(visible):
        raise UsageError(f"--gpus {index}: this process sees {len(visible)} GPU(s) (CUDA_VISIBLE_DEVICES="
                         f"{os.environ['CUDA_VISIBLE_DEVICES']}); give indices 0..{len(visible) - 1}")
    return visible[index]


def visible_gpus() -> list[int]:
    """Indices of the GPUs this process sees (0..n-1, whatever CUDA_VISIBLE_DEVICES maps them to)."""
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:
        return []


def check_gpus(gpus: Sequence[int], device: str) -> None:
    """`run --gpus`, before any study or trial exists: every index must be a GPU CUDA sees here, and the study must
    train on a GPU; otherwise one line (never CPU trials run in silence, never a worker pinned to nothing)."""
    spec = ",".join(str(g) for g in gpus)
    if device == "cpu":
        raise UsageError(f"--gpus {spec}: the study trains on the cpu (--device or [train] device); drop --gpus, "
                         "or use --device cuda")
    seen = len(visible_gpus())
    if seen == 0:
        raise UsageError(f"--gpus {spec}: CUDA sees no GPU here ({_no_gpu_reason()}); drop --gpus to train on "
                         "the CPU")
    if any(not 0 <= g < seen for g in gpus):
        where = (f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
                 if "CUDA_VISIBLE_DEVICES" in os.environ else "")
        raise UsageError(f"--gpus {spec}: CUDA sees {seen} GPU(s) here{where}; give indices 0..{seen - 1}")


def _no_gpu_reason() -> str:
    import torch

    if not torch.backends.cuda.is_built():
        return f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch"
    return "no driver or no device: see nvidia-smi and CUDA_VISIBLE_DEVICES"


def popen(command: list[str], env: dict[str, str]) -> WorkerProcess:
    """A fresh process running `command` (in the supervisor's process group: Ctrl-C reaches it too)."""
    return subprocess.Popen(command, env=env, start_new_session=False)


@dataclass
class Worker:
    index: int
    command: list[str]  # what `launch` runs: a command line for `popen`, `hpsearch worker`'s arguments for a fork
    env: dict[str, str]
    launch: Launch = popen
    process: WorkerProcess | None = None
    restarts: int = 0  # in the run's whole life
    handled: bool = False  # its exit was dealt with (reaped, told) and it is not restarted: not again each poll
    backoff: Backoff = field(default_factory=Backoff)
    restart_at: float | None = None  # time.monotonic() of a restart it waits for (its backoff)
    started_at: float = 0.0  # time.monotonic() of its last start
    stopped_since: float | None = None  # when the supervisor first saw it stopped (SIGSTOP), this time

    def start(self) -> None:
        self.process = self.launch(self.command, self.env)
        self.handled = False
        self.restart_at = self.stopped_since = None
        self.started_at = time.monotonic()

    @property
    def tag(self) -> str:
        assert self.process is not None
        return keys.worker_tag(self.process.pid)


@dataclass
class Supervisor:
    """Runs N workers until `done()` says the study holds its trials; restarts and cleans up after them."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    workers: list[Worker]
    done: Callable[[], bool]
    on_event: Callable[[str], None] = print
    poll_s: float = 0.5
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    frozen_limit_s: float = FROZEN_LIMIT_S
    _stopping: bool = field(default=False, init=False)
    _full: bool = field(default=False, init=False)  # a worker found the artifact store full: stop them all

    def run(self) -> ExitCode:
        """OK when the study holds its trials, FAILURE_STREAK when workers gave up, BAD_INPUT on a full artifact
        store, INTERRUPTED when stopped."""
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for worker in self.workers:
                worker.backoff = Backoff(self.restart_policy)
                worker.start()
            return self._watch()
        finally:
            # Under this supervisor's handlers still: a second Ctrl-C or SIGTERM during the shutdown is recorded,
            # never raised, so every worker is waited for and the final FAIL sweep runs.
            try:
                self._shutdown()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _stop(self, signum: int, _frame: object) -> None:
        self._stopping = True

    def _watch(self) -> ExitCode:
        while not self._stopping:
            # Never blocks on one worker: a restart that waits out its delay is looked at again each poll, so the
            # others stay watched and a signal stops everything within a poll.
            active = 0
            for worker in self.workers:
                active += self._look_at(worker)
                if self._full:
                    return ExitCode.BAD_INPUT  # as a single-process run on a full store
            if active == 0:
                return ExitCode.OK if self._done() else ExitCode.FAILURE_STREAK
            time.sleep(self.poll_s)
        return ExitCode.INTERRUPTED

    def _look_at(self, worker: Worker) -> bool:
        """Deal with one worker's state at this poll; whether it is alive or waits for its restart."""
        now = time.monotonic()
        if worker.restart_at is not None:
            if now < worker.restart_at:
                return True
            if self._done():  # the study got its trials (or a stop) meanwhile
                worker.restart_at = None
                return False
            worker.start()
            return True
        assert worker.process is not None
        code = worker.process.poll()
        if code is None:
            self._unfreeze(worker, now)
            return True
        if code == 0 or worker.handled:
            return False  # a worker returns 0 once the study holds its trials
        self._reap(worker, code)
        worker.handled = True  # a restart below starts it anew
        if code == ExitCode.WORKER_FAILURE_STREAK:
            # It stopped on purpose (its trials kept failing): restarting would only burn more trials.
            self.on_event(f"worker {worker.index} stopped: its trials failed in a row")
            return False
        if code == ExitCode.WORKER_STORE_FULL:
            # Every worker writes to the same store: stop them all now (their trials are queued again).
            self.on_event(f"worker {worker.index} found the artifact store full; stopping every worker")
            self._full = True
            return False
        if self._done():
            return False
        why = ("its GPU context broke (a sticky device error)" if code == ExitCode.DEVICE_BROKEN
               else f"died of signal {-code}" if code < 0 else f"exited with {code}")
        delay = worker.backoff.next_delay(now - worker.started_at, now)
        if delay is None:
            self.on_event(f"worker {worker.index} {why}; not restarted: it was restarted {worker.backoff.in_window} "
                          f"times within {self.restart_policy.window_s / 60:.0f} min")
            return False
        worker.restarts += 1
        self.on_event(f"worker {worker.index} {why}; restarting it in {delay:g} s")
        worker.restart_at = now + delay
        return True

    def _unfreeze(self, worker: Worker, now: float) -> None:
        """Kill a worker that stays stopped (SIGSTOP) past frozen_limit_s; the next poll finds it dead, fails its
        trial with a queued retry and restarts it."""
        assert worker.process is not None
        if not is_stopped(worker.process.pid):
            worker.stopped_since = None
            return
        if worker.stopped_since is None:
            worker.stopped_since = now
        elif now - worker.stopped_since >= self.frozen_limit_s:
            self.on_event(f"worker {worker.index} (pid {worker.process.pid}) stayed stopped (SIGSTOP) for "
                          f"{now - worker.stopped_since:.0f} s; killed it: its trial is retried, the worker "
                          "restarted")
            worker.process.kill()  # SIGKILL ends a stopped process too
            worker.stopped_since = None

    def _done(self) -> bool:
        try:
            return self.done()
        except StorageUnavailableError as err:  # the workers wait for the storage; so does the supervisor
            self.on_event(f"{err}; the workers wait for it")
            return False

    def _reap(self, worker: Worker, code: int) -> None:
        cause = f"signal {-code}" if code < 0 else f"exit code {code}"
        try:
            failed = fail_trials_of(self.storage, self.study, worker.tag, f"worker {worker.tag} died ({cause})")
        except StorageUnavailableError as err:
            # Its trial stays RUNNING until its heartbeat goes stale; then a worker fails it and queues its retry.
            self.on_event(f"worker {worker.index} died ({cause}) while {err}; its trial is retried once its "
                          "heartbeat goes stale")
            return
        for number in failed:
            self.on_event(f"trial {number} FAIL: its worker died ({cause}); queued a retry with the same params")

    def _shutdown(self) -> None:
        live = [w for w in self.workers if w.process is not None and w.process.poll() is None]
        for worker in live:
            assert worker.process is not None
            worker.process.send_signal(signal.SIGTERM)
            if is_stopped(worker.process.pid):  # a frozen worker handles its SIGTERM (ends its trial) once resumed
                worker.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in live:
            assert worker.process is not None
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        # Whatever a stopped worker could not mark itself ends FAIL here, never RUNNING.
        try:
            for worker in self.workers:
                if worker.process is not None:
                    fail_trials_of(self.storage, self.study, worker.tag, "stopped by a signal; queued for retry")
        except StorageUnavailableError as err:
            self.on_event(f"{err}: trials the workers left RUNNING are retried once their heartbeat goes stale")


def worker_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "hpsearch", "worker", *args]


# Why the main thread is interrupted when no signal came from outside (watch_supervisor), for the trial's reason.
_interrupted_because: list[str] = []


def install_stop_handler() -> None:
    """SIGTERM interrupts the trial like Ctrl-C (a KeyboardInterrupt naming the signal), so Optuna marks it FAIL
    and its retry is queued before the process exits (a worker, and a single-process `hpsearch run`)."""

    def stop(signum: int, _frame: object) -> None:
        # Once: a second signal (Ctrl-C reaches the whole group, then the supervisor's SIGTERM) must not
        # interrupt the clean-up that marks the trial FAIL.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt(_interrupted_because[0] if _interrupted_because else signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie its parent has not reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process holds the pid now
        return True
    return process_state(pid) in ("Z", "X")  # None without /proc (not Linux): os.kill said it exists


def watch_supervisor(every_s: float = SUPERVISOR_POLL_S) -> threading.Thread | None:
    """In a worker of `run --workers N`: a daemon thread that interrupts the main thread (as SIGTERM does, as
    `stop --now` does) once the supervisor named in HPSEARCH_SUPERVISOR_PID has died, even by kill -9: the
    running trial ends FAIL with a queued retry and the worker exits, never an orphan. Polling, not
    PR_SET_PDEATHSIG: a forked worker's parent is the forkserver, not the supervisor. None outside a
    supervised worker (another machine's `hpsearch worker`)."""
    raw = os.environ.get(SUPERVISOR_PID_ENV, "")
    if not raw.isdigit():
        return None
    pid = int(raw)

    def watch() -> None:
        while not _gone(pid):
            time.sleep(every_s)
        _interrupted_because.append(f"its supervisor (pid {pid}) died")
        _thread.interrupt_main(signal.SIGTERM)

    thread = threading.Thread(target=watch, name="hpsearch-supervisor-watch", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class WorkerJob:
    """What `run_workers` needs of a prepared run, torch-free: the supervisor never imports torch (its study's
    preparation ran in a child, hpsearch.cli._prepare)."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    url: str  # the resolved storage URL: each worker opens it itself
    study_file: str
    artifacts: str
    n_trials: int
    target: float | None
    gpus: Sequence[int] = ()  # the GPUs the workers are pinned to (checked by `check_gpus`); none: CPU workers
    overrides: Sequence[str] = ()  # `--set` over the study file: the workers read it as `run` did


def run_workers(job: WorkerJob, n_workers: int, *, per_gpu: int = 1, timeout: float | None = None,
                on_event: Callable[[str], None] = print) -> ExitCode:
    """`run --workers N` (and `run --gpus`, even with one worker): N `hpsearch worker` processes on this study,
    pinned round-robin to `job.gpus` (none: CPU workers forked from the forkserver), supervised until the study
    holds its trials."""
    pinned = list(job.gpus)
    passed = [job.study_file, "--artifacts", job.artifacts, "--n-trials", str(job.n_trials),
              "--device", "cuda" if pinned else "cpu"]
    for override in job.overrides:  # the workers read the study as `run` did, or their resume check refuses it
        passed += ["--set", override]
    if timeout:
        passed += ["--timeout", str(timeout)]
    # GPU workers are fresh processes: nothing CUDA may have touched in a forkserver crosses into them.
    launch = popen if pinned else forkserver_launch()
    args = [[*passed, "--worker-index", str(i)] for i in range(n_workers)]
    workers = [Worker(i, worker_command(args[i]) if pinned else args[i],
                      worker_env(i, n_workers, pinned, per_gpu, storage=job.url), launch)
               for i in range(n_workers)]
    seen = stop_generation(job.study.user_attrs)  # the stop requests made before this start do not apply

    def done() -> bool:
        # The budget, the target or `hpsearch stop`: a worker that returned 0 for any of them is not restarted.
        return (finished_trials(job.study) >= job.n_trials
                or target_reached(job.study, job.target) is not None
                or pending(job.study.user_attrs, seen) is not None)

    try:
        return Supervisor(job.study, job.storage, workers, done=done, on_event=on_event).run()
    finally:
        if not pinned:
            stop_forkserver()
