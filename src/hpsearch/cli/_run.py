"""`check`, `run` and `worker`: validating a study file and running its trials, here or in worker processes.

Each command reads the study file before it imports torch: a bad file is refused at once, not after torch and
torchvision are imported.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from hpsearch.cli._output import (
    VERBOSITY_ENV,
    cache_object,
    console,
    print_cache,
    print_error,
    print_json_object,
    show,
)
from hpsearch.errors import DeviceBrokenError, ExitCode, StoreFullError

if TYPE_CHECKING:
    from hpsearch.config import StudyConfig
    from hpsearch.search import Run


def _read_file_first(args: argparse.Namespace) -> StudyConfig:
    from hpsearch.config import read_study_file

    return read_study_file(args.study, args.set)


def cmd_check(args: argparse.Namespace) -> ExitCode:
    cfg = _read_file_first(args)

    from rich.json import JSON
    from rich.markup import escape

    from hpsearch.model import check_study_model
    from hpsearch.store import redact, resolve_storage_url

    check_study_model(cfg)
    url = resolve_storage_url(args.storage, cfg.study.storage)
    config = cfg.model_dump(mode="json")
    if args.json:
        print_json_object({"study_file": args.study, "valid": True, "study": cfg.study.name,
                           "storage": redact(url), "data_cache": cache_object(cfg), "config": config,
                           "objective": f"val_{cfg.study.metric}", "direction": cfg.study.direction,
                           "search_space": [asdict(p) for p in cfg.space.parameters()]})
        return ExitCode.OK
    show(f"[bold]{escape(args.study)}[/] is valid")
    show(f"storage: {redact(url)}", highlight=False)
    print_cache(cfg)
    show(JSON.from_data(config))
    _print_space(cfg)
    return ExitCode.OK


def _print_space(cfg: StudyConfig) -> None:
    """The space as each trial searches it: every Optuna parameter, its range or choices, and when it is drawn."""
    show(f"objective: val_{cfg.study.metric} ({cfg.study.direction})", markup=False, highlight=False)
    show("search space (the Optuna parameters a trial records):", markup=False, highlight=False)
    for param in cfg.space.parameters():
        when = f"  (scheduler = {param.when})" if param.when else ""
        show(f"  {param.name:<18} {param.describe()}{when}", markup=False, highlight=False)
    if cfg.train.lr_scaling == "linear":
        base = cfg.train.base_batch_size or cfg.train.batch_size
        show(f"lr scaling: linear, a trial trains at lr * batch_size / {base}", markup=False, highlight=False)


def cmd_run(args: argparse.Namespace) -> ExitCode:
    cfg = _read_file_first(args)
    if args.workers > 1 or args.gpus:
        # `--gpus` with one worker too: a worker process is pinned (CUDA_VISIBLE_DEVICES) before CUDA starts in
        # it; a process that has asked CUDA about its devices could not be pinned any more.
        return _supervise(args, cfg)
    return _run(args)


def _cpu_workers_likely(device: str) -> bool:
    """Whether `run --workers` will fork CPU workers, told without importing torch: a CPU device, or `auto` on
    a machine with no NVIDIA device node. Then the forkserver starts first and the preparation is forked from it;
    `run_workers` still decides from the resolved device how it starts the workers."""
    return device == "cpu" or (device == "auto" and not os.path.exists("/dev/nvidiactl"))


def _open_run(args: argparse.Namespace, worker: int = 0) -> Run:
    from hpsearch.search import open_run

    return open_run(args.study, storage=args.storage, artifacts=args.artifacts, device=args.device,
                    n_trials=args.n_trials, worker=worker, overrides=args.set)


def _banner(args: argparse.Namespace, cfg: StudyConfig, url: str, finished: int, n_trials: int, data: str,
            device: str, artifacts: str) -> None:
    from hpsearch.store import redact

    archs = " | ".join(cfg.searched_archs or (cfg.model.arch,))  # `[space] arch`: the ones the trials draw
    console.print(f"study [bold]{cfg.study.name}[/] on {redact(url)}: {finished}/{n_trials} finished; "
                  f"{archs} on {cfg.data.dataset} {data}, device {device}, {args.workers} worker(s); "
                  f"artifacts in {artifacts}", soft_wrap=True)


def _run(args: argparse.Namespace) -> ExitCode:
    """`run` in this process: its trials here, with a progress bar."""
    from hpsearch.cli._prepare import data_facts
    from hpsearch.store import finished_trials

    run = _open_run(args)
    _banner(args, run.cfg, run.url, finished_trials(run.study), run.n_trials, data_facts(run), str(run.device),
            run.artifacts)
    code = _run_here(args, run)
    _where_results_are(args, run.cfg, run.url, run.artifacts)
    return code


def _supervise(args: argparse.Namespace, cfg: StudyConfig) -> ExitCode:
    """`run --workers N` / `run --gpus`: a supervisor that never imports torch. The study's preparation (every
    check, the data, the study created or resumed) runs in a child (hpsearch.cli._prepare); then this process
    opens the storage and the study itself and supervises the workers."""
    forked = args.gpus is None and _cpu_workers_likely(args.device or cfg.train.device)
    if not forked:
        return _supervise_prepared(args, cfg, forked)
    from hpsearch.workers import start_forkserver, stop_forkserver

    start_forkserver()  # it imports torch once, for the preparation's child and for the workers
    try:
        return _supervise_prepared(args, cfg, forked)
    finally:
        stop_forkserver()


def _supervise_prepared(args: argparse.Namespace, cfg: StudyConfig, forked: bool) -> ExitCode:
    import optuna

    from hpsearch.cli import _prepare
    from hpsearch.monitor import top_trials_table
    from hpsearch.store import finished_trials, open_storage, retrying
    from hpsearch.workers import WorkerJob, run_workers

    prepared = _prepare.prepare(args, forked)
    if not isinstance(prepared, _prepare.Prepared):
        return prepared  # refused: the child printed its one line
    # The same retrying storage as open_run's: the supervisor too rides out a storage outage.
    storage = retrying(open_storage(prepared.url, heartbeat_interval=cfg.study.heartbeat_interval,
                                    heartbeat_grace=cfg.study.heartbeat_grace), cfg.study.storage_patience)
    study = optuna.load_study(study_name=cfg.study.name, storage=storage)
    _banner(args, cfg, prepared.url, finished_trials(study), prepared.n_trials, prepared.data, prepared.device,
            prepared.artifacts)
    if args.verbosity:  # its workers print as quietly (or as fully) as it does
        os.environ[VERBOSITY_ENV] = str(args.verbosity)
    job = WorkerJob(study, storage, prepared.url, str(cfg.source), prepared.artifacts, prepared.n_trials,
                    cfg.study.target, prepared.gpus, tuple(args.set))
    code = run_workers(job, args.workers, per_gpu=args.workers_per_gpu, timeout=args.timeout,
                       on_event=lambda line: console.print(line, highlight=False))
    console.print(f"{finished_trials(study)}/{prepared.n_trials} finished trials")
    show(top_trials_table(study, cfg.ensemble.top_k))
    _where_results_are(args, cfg, prepared.url, prepared.artifacts)
    return code


def _where_results_are(args: argparse.Namespace, cfg: StudyConfig, url: str, artifacts: str) -> None:
    """The run's last lines: where the study and its trials' files are, and the commands that read them."""
    from hpsearch.store import redact

    console.print(f"results: study {cfg.study.name!r} in {redact(url)}; each trial's weights and outputs "
                  f"in {artifacts}", highlight=False, soft_wrap=True)
    same = [flag for flag, given in (("--storage", args.storage), ("--artifacts", args.artifacts)) if given]
    tail = f" (each with the same {' and '.join(same)})" if same else ""
    console.print(f"next: hpsearch status {args.study} | hpsearch report {args.study} --out report | "
                  f"hpsearch ensemble {args.study} --out ensemble{tail}", markup=False, highlight=False,
                  soft_wrap=True)


def _run_here(args: argparse.Namespace, run: Run) -> ExitCode:
    """The trials in this process, with a progress bar of trials and of the running trial's epochs."""
    import optuna
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hpsearch.monitor import describe_trial, top_trials_table
    from hpsearch.record import read_trial_record
    from hpsearch.search import run_trials
    from hpsearch.store import best_trial, finished_trials
    from hpsearch.train import EpochMetrics
    from hpsearch.workers import install_stop_handler

    cfg, study, n_trials = run.cfg, run.study, run.n_trials
    install_stop_handler()  # SIGTERM, like Ctrl-C, ends the running trial FAIL now and queues its retry
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        trials_task = progress.add_task("trials", total=n_trials, completed=finished_trials(study))
        epoch_task = progress.add_task("epochs", total=cfg.train.epochs * max(1, cfg.data.folds))

        def on_epoch(trial: Any, m: EpochMetrics) -> None:
            done = len(read_trial_record(trial).folds) * cfg.train.epochs  # with folds: its finished folds' epochs
            progress.update(epoch_task, completed=done + m.epoch + 1,
                            description=f"trial {trial.number} val_acc {m.val_accuracy:.4f}")

        def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            progress.console.print(describe_trial(trial))
            best = best_trial(study)
            progress.update(trials_task, completed=min(n_trials, finished_trials(study)),
                            description=f"trials (best {f'{best.value:.4f}' if best is not None else '-'})")
            progress.reset(epoch_task)

        guard = run_trials(study, run.objective(on_epoch=on_epoch), n_trials, timeout=args.timeout,
                           callbacks=[on_trial])
    show(top_trials_table(study, cfg.ensemble.top_k))
    if guard.stopped:
        console.print(f"stopped: {guard.stopped}", highlight=False, soft_wrap=True)
    if guard.tripped:
        console.print(f"[red]stopped[/]: {guard.limit} trials failed in a row; see `hpsearch status "
                      f"{args.study}` and each trial's fail_reason")
        return ExitCode.FAILURE_STREAK
    return ExitCode.OK


def cmd_worker(args: argparse.Namespace) -> ExitCode:
    """One worker: what `run --workers N` starts, and what other machines run against one storage."""
    _read_file_first(args)

    import optuna

    from hpsearch.monitor import describe_trial
    from hpsearch.search import run_trials
    from hpsearch.slurm import worker_index
    from hpsearch.workers import install_stop_handler, watch_supervisor

    index = worker_index(args.worker_index)  # a SLURM array task's id when no --worker-index is given
    install_stop_handler()
    watch_supervisor()  # under `run --workers N`: stop, trial FAIL and queued, when `run` dies (even kill -9)
    run = _open_run(args, worker=index)

    def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        console.print(f"[dim]worker {index}[/] " + describe_trial(trial), highlight=False)

    try:
        guard = run_trials(run.study, run.objective(), run.n_trials, timeout=args.timeout, callbacks=[on_trial])
    except StoreFullError as full:
        print_error(str(full))
        return ExitCode.WORKER_STORE_FULL  # the supervisor stops every worker: their next trials find no room
    except DeviceBrokenError as broken:
        print_error(str(broken))
        return broken.exit_code  # the supervisor restarts this worker with a fresh GPU context
    if guard.stopped:
        console.print(f"[dim]worker {index}[/] stopped: {guard.stopped}", highlight=False, soft_wrap=True)
    return ExitCode.WORKER_FAILURE_STREAK if guard.tripped else ExitCode.OK
