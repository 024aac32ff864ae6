"""A real single-node SLURM cluster for the process-level tests: munged, slurmctld and slurmd (Debian's slurm-wlm
and munge), started as root in the foreground with their own key, config, ports and state folders under a test
folder, so that nothing of a SLURM the machine may run is touched; every command of the cluster finds it through
SLURM_CONF. `proctrack/linuxproc` and `task/none` need no cgroups: it runs in a plain VM or container.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support._processes import wait_until
from tests.support._storages import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
START_S = 60.0  # from the daemons' start until the node is idle, on a loaded 2-core machine
DRAIN_S = 90.0  # from scancel of every job until none is left: a worker's SIGTERM clean-up, then KillWait (30 s)


@dataclass
class SlurmCluster:
    folder: Path
    env: dict[str, str]  # SLURM_CONF: what sbatch, squeue, scancel and the jobs need to find this cluster
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def command(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(list(argv), env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}\n{self.logs()}")
        return done

    def jobs(self) -> list[str]:
        """The cluster's jobs and array tasks now (squeue), as `1234_1` or `1234`."""
        return self.command("squeue", "--noheader", "--array", "--format=%i").stdout.split()

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}"
                         for log in sorted((self.folder / "log").glob("*")))

    def stop(self) -> None:
        """Cancel every job and wait until none is left (so that no job step outlives the test), then stop the
        daemons this cluster started."""
        # pytest.fail raises no Exception subclass: a drain that times out must not skip stopping the daemons.
        with contextlib.suppress(Exception, pytest.fail.Exception):
            if any(d.poll() is None for d in self.daemons):
                self.command("scancel", "--user", "root", check=False)
                wait_until("the cluster's jobs gone after scancel", lambda: not self.jobs(), timeout=DRAIN_S, every=1)
        for daemon in reversed(self.daemons):  # slurmd, slurmctld, then munged, which both authenticate with
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait(timeout=10)
        # A failed test can leave a job's process that SLURM lost track of (an orphan, reparented to init, that
        # proctrack/linuxproc no longer sees); each carries this cluster's SLURM_CONF in its environment.
        for pid in _carrying(f"SLURM_CONF={self.env['SLURM_CONF']}".encode()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _carrying(entry: bytes) -> list[int]:
    """The processes of this machine whose environment holds `entry` (NAME=value), this one excepted."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if entry in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
    return found


def slurm_missing() -> str | None:
    """Why no SLURM cluster can start here (a binary missing, not root), None when one can."""
    missing = [name for name in (*DAEMONS, "sbatch", "scancel", "squeue") if shutil.which(name) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge; .ci/run does)"
    if os.geteuid() != 0:
        return "the test cluster's daemons run as root"
    return None


def _node_line() -> str:
    """This machine as slurmd sees it (`slurmd -C`: its real CPUs, sockets, cores and memory), reachable on
    127.0.0.1: a node line slurmd accepts as it is."""
    shown = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True).stdout
    return shown.splitlines()[0] + " NodeAddr=127.0.0.1 State=UNKNOWN"


def _config(folder: Path, munge_socket: Path) -> str:
    host = socket.gethostname().split(".")[0]
    return "\n".join([
        "ClusterName=hpsearchtest",
        f"SlurmctldHost={host}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'log' / 'slurmd.log'}",
        # No cgroups: processes tracked by their parent pids, no task binding; what a plain VM allows.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",  # CPUs only: tasks that ask no --mem share the node's memory
        "MpiDefault=none",
        "SwitchType=switch/none",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "ReturnToService=2",
        "KillWait=30",  # SIGTERM to SIGKILL on scancel: the worker's trial ends FAIL well within it
        "SchedulerParameters=sched_interval=1",
        _node_line(),
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def start_cluster(folder: Path) -> SlurmCluster:
    """munged, slurmctld and slurmd under `folder`, until the node is idle; stop() ends them."""
    for sub in ("munge", "state", "spool", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))  # a fresh key: this cluster trusts no other munged
    key.chmod(0o400)
    (folder / "munge").chmod(0o755)  # the socket's folder: munged wants clients to reach it
    sock = folder / "munge" / "munge.socket"
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, sock))
    cluster = SlurmCluster(folder, {"SLURM_CONF": str(conf)})
    argvs = [
        ["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
         f"--log-file={folder / 'log' / 'munged.log'}", f"--pid-file={folder / 'munge' / 'munged.pid'}",
         f"--seed-file={folder / 'munge' / 'munged.seed'}"],
        ["slurmctld", "-D", "-i"],  # -i: no state of an earlier cluster to recover
        ["slurmd", "-D", "-N", socket.gethostname().split(".")[0]],
    ]
    try:
        for argv in argvs:
            with open(folder / "log" / f"{argv[0]}.out", "wb") as out:
                cluster.daemons.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                        env={**os.environ, **cluster.env}, start_new_session=True))
            if argv[0] == "munged":
                wait_until("munged's socket", sock.exists, timeout=START_S)

        def idle() -> bool:
            for daemon in cluster.daemons:
                if daemon.poll() is not None:
                    pytest.fail(f"{daemon.args[0]} exited {daemon.returncode}:\n{cluster.logs()}")
            shown = cluster.command("sinfo", "--noheader", "--format=%T", check=False)
            return shown.returncode == 0 and shown.stdout.strip() == "idle"

        wait_until("the SLURM node idle", idle, timeout=START_S, every=0.5)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def slurm_cluster(folder: Path) -> Iterator[SlurmCluster]:
    """A started cluster for a fixture: skipped where SLURM cannot run, failed in CI (CI=true), which installs it."""
    why = slurm_missing()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM test cluster: {why}")
        pytest.skip(f"SLURM test cluster: {why}")
    cluster = start_cluster(folder)
    try:
        yield cluster
    finally:
        cluster.stop()
