"""The `hpsearch` command: argument parsing, progress, tables and exit codes (`errors.ExitCode`) over the library."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console

from hpsearch import __version__
from hpsearch.errors import ExitCode, HpsearchError, UsageError

console = Console(stderr=True)
out = Console()


# ------------------------------------------------------------------------------------------- commands


def _check_file_first(args: argparse.Namespace) -> Any:
    """The study file read and validated before torch is imported: a bad file is one line in a second, not
    after the several seconds torch and torchvision take to import."""
    from hpsearch.config import read_study_file

    return read_study_file(args.study)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _check_file_first(args)

    from hpsearch.model import check_study_model
    from hpsearch.store import redact, resolve_storage_url

    check_study_model(cfg)
    url = resolve_storage_url(args.storage, cfg.study.storage)
    out.print(f"[bold]{args.study}[/] is valid")
    out.print(f"storage: {redact(url)}")
    _print_cache(cfg)
    out.print_json(data=cfg.model_dump(mode="json"))
    return ExitCode.OK


def _open_run(args: argparse.Namespace, worker: int = 0) -> Any:
    import optuna

    from hpsearch.search import open_run

    run = open_run(args.study, storage=args.storage, artifacts=args.artifacts, device=args.device,
                   n_trials=args.n_trials, worker=worker)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return run


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _check_file_first(args)
    if args.workers > 1 and _cpu_workers_likely(args.device or cfg.train.device):
        from hpsearch.workers import start_forkserver, stop_forkserver

        start_forkserver()  # it imports torch for the workers while this process imports its own
        try:
            return _run(args)
        finally:
            stop_forkserver()
    return _run(args)


def _cpu_workers_likely(device: str) -> bool:
    """Whether `run --workers` will fork CPU workers, told without importing torch: a CPU device, or `auto` on
    a machine with no NVIDIA device node. Only a head start: `run_workers` decides from the resolved device."""
    return device == "cpu" or (device == "auto" and not os.path.exists("/dev/nvidiactl"))


def _run(args: argparse.Namespace) -> int:
    import optuna
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hpsearch.keys import fold_records
    from hpsearch.monitor import describe_trial, top_trials_table
    from hpsearch.search import run_trials
    from hpsearch.store import best_trial, finished_trials, redact
    from hpsearch.train import EpochMetrics

    run = _open_run(args)
    cfg, study, n_trials = run.cfg, run.study, run.n_trials
    folds = f" in {len(run.prepared.folds.sizes())} folds of train+val" if run.prepared.folds is not None else ""
    console.print(f"study [bold]{cfg.study.name}[/] on {redact(run.url)}: {finished_trials(study)}/{n_trials} "
                  f"finished; {cfg.model.arch} on {cfg.data.dataset} {run.prepared.split.sizes()}{folds}, "
                  f"device {run.device}, {args.workers} worker(s); artifacts in {run.artifacts}")
    if args.workers > 1:
        from hpsearch.workers import run_workers

        code = run_workers(run, args.workers, gpus=args.gpus, per_gpu=args.workers_per_gpu, timeout=args.timeout,
                           on_event=lambda line: console.print(line, highlight=False))
        console.print(f"{finished_trials(study)}/{n_trials} finished trials")
        out.print(top_trials_table(study, cfg.ensemble.top_k))
        return code

    from hpsearch.workers import install_stop_handler

    install_stop_handler()  # SIGTERM, like Ctrl-C, ends the running trial FAIL now and queues its retry
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        trials_task = progress.add_task("trials", total=n_trials, completed=finished_trials(study))
        epoch_task = progress.add_task("epochs", total=cfg.train.epochs * max(1, cfg.data.folds))

        def on_epoch(trial: Any, m: EpochMetrics) -> None:
            done = len(fold_records(trial)) * cfg.train.epochs  # with folds: the epochs of its finished folds
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
    out.print(top_trials_table(study, cfg.ensemble.top_k))
    if guard.stopped:
        console.print(f"stopped: {guard.stopped}", highlight=False, soft_wrap=True)
    if guard.tripped:
        console.print(f"[red]stopped[/]: {guard.limit} trials failed in a row; see `hpsearch status "
                      f"{args.study}` and each trial's fail_reason")
        return ExitCode.FAILURE_STREAK
    return ExitCode.OK


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker: what `run --workers N` starts, and what other machines run against one storage."""
    _check_file_first(args)

    import optuna

    from hpsearch.errors import DeviceBrokenError, StoreFullError
    from hpsearch.monitor import describe_trial
    from hpsearch.search import run_trials
    from hpsearch.workers import install_stop_handler

    install_stop_handler()
    run = _open_run(args, worker=args.worker_index)

    def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        console.print(f"[dim]worker {args.worker_index}[/] " + describe_trial(trial), highlight=False)

    try:
        guard = run_trials(run.study, run.objective(), run.n_trials, timeout=args.timeout, callbacks=[on_trial])
    except StoreFullError as full:
        console.print(f"[red]error[/]: {full}", highlight=False, soft_wrap=True)
        return ExitCode.WORKER_STORE_FULL  # the supervisor stops every worker: their next trials find no room
    except DeviceBrokenError as broken:
        console.print(f"[red]error[/]: {broken}", highlight=False, soft_wrap=True)
        return broken.exit_code  # the supervisor restarts this worker with a fresh GPU context
    if guard.stopped:
        console.print(f"[dim]worker {args.worker_index}[/] stopped: {guard.stopped}", highlight=False, soft_wrap=True)
    return ExitCode.WORKER_FAILURE_STREAK if guard.tripped else ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    from hpsearch.monitor import status_renderables
    from hpsearch.store import open_existing, resolve_artifacts

    cfg, study, url = open_existing(args.study, args.storage)
    artifacts = resolve_artifacts(args.artifacts, study, cfg.study.artifacts)
    for part in status_renderables(study, url, artifacts, args.top_k or cfg.ensemble.top_k, cfg.train.epochs):
        out.print(part)
    _print_cache(cfg)
    return ExitCode.OK


def _print_cache(cfg: Any) -> None:
    if not cfg.data.cached:
        return  # nothing to show, and no torch import: `status` of a digits study starts in about a second
    from hpsearch.data import cache_state

    state = cache_state(cfg.data)
    if state is not None:
        path, size = state
        built = f"{size / 2**20:.1f} MiB" if size is not None else "not built yet: the first run decodes it"
        out.print(f"data cache: {path} ({built}; deleting it is safe, it is rebuilt on demand)", highlight=False,
                  soft_wrap=True)


def cmd_stop(args: argparse.Namespace) -> int:
    from hpsearch.store import open_existing, request_stop

    _, study, _ = open_existing(args.study, args.storage)
    request = request_stop(study, "hpsearch stop" + (" --now" if args.now else ""), now=args.now)
    how = ("at once: their running trials end FAIL, each with a queued retry" if args.now
           else "after their current trials")
    console.print(f"asked every worker of study {study.study_name!r} to stop {how}; recorded as {request.line()}; "
                  f"a later `hpsearch run {args.study}` resumes it", highlight=False, soft_wrap=True)
    return ExitCode.OK


def cmd_ensemble(args: argparse.Namespace) -> int:
    from hpsearch.export import export_ensemble
    from hpsearch.monitor import result_table

    exported = export_ensemble(
        args.study, storage=args.storage, artifacts=args.artifacts, top_k=args.top_k, method=args.method,
        out=args.out, export=not args.no_export, onnx=args.onnx, device=args.device,
        on_warning=lambda line: console.print(f"[yellow]warning[/]: {line}", highlight=False, soft_wrap=True),
        on_start=lambda line: console.print(line, highlight=False))
    result, folder = exported.result, exported.folder
    folds = any(m.fold_artifacts for m in result.members)
    _print_unwrapped(result_table(result, f"top {len(exported.selection.candidates)} trials of "
                                          f"{exported.study_name!r}: val NLL on "
                                          f"{'out-of-fold train+val' if folds else 'validation'}, the rest on test; "
                                          "(T) after temperature scaling"))
    for note in result.notes:
        out.print(f"- {note}", highlight=False, soft_wrap=True)
    written = "" if args.no_export else (f" and the exported ensemble ({folder / 'manifest.json'}, "
                                         f"{sum(len(m.fold_artifacts) or 1 for m in result.members)} member files"
                                         + (", ensemble.onnx" if args.onnx else "") + ")")
    console.print(f"wrote {folder / 'report.md'}, {folder / 'ensemble.json'}{written}", highlight=False)
    return ExitCode.OK


def cmd_report(args: argparse.Namespace) -> int:
    from hpsearch.report import REPORT_FILE, write_report

    written = write_report(args.study, storage=args.storage, artifacts=args.artifacts, out=args.out,
                           on_file=lambda path: console.print(f"wrote {path}", highlight=False, soft_wrap=True),
                           ensemble=args.ensemble)
    for note in written.notes:
        console.print(f"- {note}", highlight=False, soft_wrap=True)
    console.print(f"report with {len(written.figures)} figures, per class from trial {written.trial}: "
                  f"{written.folder / REPORT_FILE}", highlight=False, soft_wrap=True)
    return ExitCode.OK


def _print_unwrapped(renderable: Any) -> None:
    """Print at the renderable's natural width when stdout is no terminal (a pipe or file is not 80 columns)."""
    if out.is_terminal:
        out.print(renderable)
        return
    from rich.measure import Measurement

    width = Measurement.get(out, out.options.update_width(10_000), renderable).maximum
    Console(width=max(out.width, width), file=out.file).print(renderable)


def _print_skipped(line: str) -> None:
    from rich.markup import escape

    console.print(f"[yellow]skipped[/]: {escape(line)}", highlight=False, soft_wrap=True)


def _scored_csv(args: argparse.Namespace, write: Callable[..., int], what: str) -> int:
    """predict and select alike: open the export, write the CSV, name every skipped input.

    OK when every input was read, INPUTS_SKIPPED when some were (each named on stderr); a bad DIR raises.
    """
    from hpsearch.predict import open_for_scoring
    from hpsearch.train import resolve_device

    device = resolve_device(args.device)
    ensemble, paths, warnings = open_for_scoring(args.dir, args.inputs, device, tta=args.tta)
    for line in warnings:
        _print_skipped(line)

    def warn(line: str) -> None:
        warnings.append(line)
        _print_skipped(line)

    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(args.out, "w", newline="", encoding="utf-8")) if args.out else sys.stdout
        n = write(ensemble, paths, sink, device, warn)
    console.print(f"{what} {n} image(s){f' into {args.out}' if args.out else ''}; {len(warnings)} skipped",
                  highlight=False)
    return ExitCode.INPUTS_SKIPPED if warnings else ExitCode.OK


def cmd_predict(args: argparse.Namespace) -> int:
    from hpsearch.predict import predict_csv

    return _scored_csv(args, lambda ensemble, paths, sink, device, warn: predict_csv(
        ensemble, paths, sink, args.batch_size, device, warn, tta=args.tta), "predicted")


def cmd_select(args: argparse.Namespace) -> int:
    from hpsearch.predict import select_csv

    return _scored_csv(args, lambda ensemble, paths, sink, device, warn: select_csv(
        ensemble, paths, sink, args.n, args.by, args.batch_size, device, warn, tta=args.tta),
        f"selected by {args.by}:")


def cmd_dashboard(args: argparse.Namespace) -> int:
    from hpsearch.monitor import serve

    if not args.allow_remote and not _is_loopback(args.host):
        raise UsageError(f"--host {args.host}: optuna-dashboard has no authentication and can delete studies; "
                         "bind 127.0.0.1 (default), or add --allow-remote to expose it on purpose")
    serve(args.study, storage=args.storage, artifacts=args.artifacts, host=args.host, port=args.port,
          echo=console.print)
    return ExitCode.OK


def cmd_storage_proxy(args: argparse.Namespace) -> int:
    import os

    from hpsearch.store import resolve_storage_url, serve

    if not args.allow_remote and not _is_loopback(args.host):
        raise UsageError(f"--host {args.host}: the storage proxy has no authentication nor encryption (anyone who "
                         "reaches the port can change or delete studies); bind 127.0.0.1 (default), or add "
                         "--allow-remote on a private network")
    os.environ.setdefault("HPSEARCH_APP_NAME", "hpsearch-storage-proxy")  # what pg_stat_activity shows

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)  # `docker stop` ends it like Ctrl-C
    try:
        serve(resolve_storage_url(args.storage, None), host=args.host, port=args.port, pool_size=args.pool_size,
              heartbeat_grace=args.heartbeat_grace, echo=console.print)
    except KeyboardInterrupt:
        console.print("storage proxy stopped")
    return ExitCode.OK


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -------------------------------------------------------------------------------------------- parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpsearch", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hpsearch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def storage(p: argparse.ArgumentParser) -> None:
        p.add_argument("--storage", help="SQLAlchemy URL (default: $HPSEARCH_STORAGE, [study] storage, "
                       "sqlite:///hpsearch.db)")

    def artifacts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--artifacts", metavar="DIR|s3://BUCKET/PREFIX",
                       help="artifact store: a folder, or S3 with credentials and endpoint from the environment "
                       "(default: the one the study recorded, else [study] artifacts, else ./artifacts)")

    run = sub.add_parser("run", help="run (or resume) a study until it holds n_trials finished trials")
    run.add_argument("study", metavar="STUDY.toml")
    storage(run)
    run.add_argument("--n-trials", type=_positive, help="finished trials to reach (default: [study] n_trials)")
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="stop starting trials after this long")
    run.add_argument("--workers", type=_positive, default=1, help="worker processes on this machine (default 1)")
    run.add_argument("--gpus", type=_gpu_list, help="GPU indices for the workers, e.g. 0,1,2,3 (default: all)")
    run.add_argument("--workers-per-gpu", type=_positive, default=1, help="workers packed on each GPU")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: [train] device (auto)")
    artifacts(run)
    run.set_defaults(func=cmd_run)

    worker = sub.add_parser("worker", help="run one worker against a storage (what other machines run)")
    worker.add_argument("study", metavar="STUDY.toml")
    storage(worker)
    worker.add_argument("--n-trials", type=_positive, help="finished trials to reach (default: [study] n_trials)")
    worker.add_argument("--timeout", type=float, metavar="SECONDS", help="stop starting trials after this long")
    worker.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: [train] device (auto)")
    worker.add_argument("--worker-index", type=int, default=0, help="seeds this worker's sampler (default 0)")
    artifacts(worker)
    worker.set_defaults(func=cmd_worker)

    check = sub.add_parser("check", help="validate a study file and print what `run` would do")
    check.add_argument("study", metavar="STUDY.toml")
    storage(check)
    check.set_defaults(func=cmd_check)

    status = sub.add_parser("status", help="trial counts by state, best trial, top-k table")
    status.add_argument("study", metavar="STUDY.toml")
    storage(status)
    artifacts(status)
    status.add_argument("--top-k", type=_positive, help="rows of the table (default: [ensemble] top_k)")
    status.set_defaults(func=cmd_status)

    stop = sub.add_parser("stop", help="ask every worker of the study, on every machine, to stop")
    stop.add_argument("study", metavar="STUDY.toml")
    storage(stop)
    stop.add_argument("--now", action="store_true",
                      help="stop at once: running trials end FAIL with a queued retry (default: after each trial)")
    stop.set_defaults(func=cmd_stop)

    ens = sub.add_parser("ensemble", help="weigh the top-k trials' stored outputs into an ensemble and compare")
    ens.add_argument("study", metavar="STUDY.toml")
    storage(ens)
    artifacts(ens)
    ens.add_argument("--top-k", type=_positive, help="candidates (default: [ensemble] top_k)")
    ens.add_argument("--method", choices=["weighted", "soft", "hard", "soup"], default="weighted",
                     help="the ensemble written to --out (default weighted); the table compares all. soup: the "
                     "greedy weight average of the trials (same architecture and starting weights), re-run on "
                     "validation and kept only if it beats the best single trial there (else weighted)")
    ens.add_argument("--device", choices=["auto", "cpu", "cuda"],
                     help="where --method soup re-runs the averaged model (default: [train] device)")
    ens.add_argument("--out", metavar="DIR", default="best-ensemble",
                     help="folder for report.md and ensemble.json, replaced atomically (default best-ensemble)")
    ens.add_argument("--no-export", action="store_true",
                     help="write only report.md and ensemble.json, not the member weights and manifest.json")
    ens.add_argument("--onnx", action="store_true",
                     help="also write ensemble.onnx: the whole ensemble as one ONNX graph, images to probabilities "
                          "(needs the optional extra: pip install -e '.[onnx]')")
    ens.set_defaults(func=cmd_ensemble)

    rep = sub.add_parser("report", help="a finished study as trials.csv, PNG plots, per-class results and one "
                         "self-contained report.html")
    rep.add_argument("study", metavar="STUDY.toml")
    storage(rep)
    artifacts(rep)
    rep.add_argument("--out", metavar="DIR", default="report",
                     help="folder for the report, replaced atomically (default report)")
    rep.add_argument("--ensemble", metavar="DIR", default=None,
                     help="an exported ensemble (`hpsearch ensemble --out DIR`): add its members' weights, its "
                     "comparison table and a reliability diagram before/after temperature scaling")
    rep.set_defaults(func=cmd_report)

    def exported(p: argparse.ArgumentParser, inputs: str) -> None:
        p.add_argument("dir", metavar="DIR", help="an ensemble folder written by `hpsearch ensemble --out DIR`")
        p.add_argument("inputs", metavar=inputs, nargs="+", help="image files and/or folders (searched recursively)")
        p.add_argument("--batch-size", type=_positive, default=64, help="images per forward pass (default 64)")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto")
        p.add_argument("--tta", action="store_true",
                       help="test-time augmentation with the study's own augmentations (manifest preprocessing."
                       "augment): average over the original, fixed shifts (crop) and mirror images (flip)")

    pred = sub.add_parser("predict", help="classify images with an exported ensemble (CSV; exit 7 if some skipped)")
    exported(pred, "INPUT")
    pred.add_argument("--out", metavar="FILE.csv", help="write the CSV here (default: stdout)")
    pred.set_defaults(func=cmd_predict)

    sel = sub.add_parser("select", help="rank unlabeled images by ensemble uncertainty, write the N most uncertain")
    exported(sel, "POOL")
    sel.add_argument("--n", type=_positive, required=True, help="how many images to select")
    sel.add_argument("--by", choices=["entropy", "margin", "disagreement"], default="entropy",
                     help="entropy of the ensemble (default), margin between its top two, or disagreement "
                     "(mutual information between members)")
    sel.add_argument("--out", metavar="FILE.csv", help="write the CSV here (default: stdout)")
    sel.set_defaults(func=cmd_select)

    dash = sub.add_parser("dashboard", help="start optuna-dashboard on the study's storage and artifacts")
    dash.add_argument("study", metavar="STUDY.toml", nargs="?")
    storage(dash)
    artifacts(dash)
    dash.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    dash.add_argument("--port", type=int, default=8080)
    dash.add_argument("--allow-remote", action="store_true",
                      help="allow a non-loopback --host (the dashboard has no authentication)")
    dash.set_defaults(func=cmd_dashboard)

    from hpsearch.store import DEFAULT_HEARTBEAT_GRACE_S, DEFAULT_POOL_SIZE, DEFAULT_PORT

    proxy = sub.add_parser("storage-proxy", help="Optuna's gRPC storage proxy in front of the database: workers "
                           "use --storage grpc://HOST:PORT and the database sees one pool")
    storage(proxy)
    proxy.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    proxy.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    proxy.add_argument("--allow-remote", action="store_true",
                       help="allow a non-loopback --host (the proxy has no authentication)")
    proxy.add_argument("--pool-size", type=_positive, default=DEFAULT_POOL_SIZE,
                       help=f"database connections, all told (default {DEFAULT_POOL_SIZE})")
    proxy.add_argument("--heartbeat-grace", type=_positive, default=DEFAULT_HEARTBEAT_GRACE_S, metavar="SECONDS",
                       help="a trial whose worker has not beaten for this long ends FAIL and is retried "
                       f"(default {DEFAULT_HEARTBEAT_GRACE_S})")
    proxy.set_defaults(func=cmd_storage_proxy)
    return parser


def _gpu_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of GPU indices") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # We use Optuna's heartbeat and retry callbacks on purpose; their ExperimentalWarnings are noise to users.
    warnings.filterwarnings("ignore", message=r".*(is experimental|experimental feature).*")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: running trials were marked FAIL and queued for retry from their "
                      "checkpoints; `hpsearch run` resumes the study")
        return ExitCode.INTERRUPTED
    except HpsearchError as err:
        from rich.markup import escape

        # escape: a message naming "[study] name" must not be eaten as rich markup
        console.print(f"[red]error[/]: {escape(str(err))}", highlight=False, soft_wrap=True)
        return err.exit_code
    except Exception as err:
        line = _proxy_failure(err)
        if line is None:
            raise
        console.print(f"[red]error[/]: {line}", highlight=False, soft_wrap=True, markup=False)
        return ExitCode.STORAGE_DOWN


def _proxy_failure(err: Exception) -> str | None:
    if "grpc" not in sys.modules:  # no proxy in this process: nothing to explain
        return None
    from hpsearch.store import proxy_failure

    return proxy_failure(err)


if __name__ == "__main__":
    sys.exit(main())
