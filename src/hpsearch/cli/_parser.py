"""The command line: one parser per command, each naming the function that runs it as "module:function", so
that only the module of the command being run is imported (`status` never imports what `run` needs)."""

from __future__ import annotations

import argparse
from typing import TypeAlias

from hpsearch import __version__
from hpsearch.errors import ExitCode

# argparse's own type for what add_subparsers returns, which it does not export
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

DESCRIPTION = "The `hpsearch` command: argument parsing, progress, tables and exit codes over the library."
DEVICES = ["auto", "cpu", "cuda"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpsearch", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"hpsearch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_worker, _add_check, _add_status, _add_stop, _add_ensemble, _add_report,
                _add_predict, _add_select, _add_dashboard, _add_storage_proxy):
        add(commands)
    return parser


def _storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="SQLAlchemy URL (default: $HPSEARCH_STORAGE, [study] storage, "
                   "sqlite:///hpsearch.db)")


def _artifacts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", metavar="DIR|s3://BUCKET/PREFIX",
                   help="artifact store: a folder, or S3 with credentials and endpoint from the environment "
                   "(default: the one the study recorded, else [study] artifacts, else ./artifacts)")


def _trials(p: argparse.ArgumentParser) -> None:
    """The study file, its storage and how long to run: what `run` and `worker` share."""
    p.add_argument("study", metavar="STUDY.toml")
    _storage(p)
    p.add_argument("--n-trials", type=_positive, help="finished trials to reach (default: [study] n_trials)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop starting trials after this long")


def _add_run(commands: Commands) -> None:
    run = commands.add_parser("run", help="run (or resume) a study until it holds n_trials finished trials")
    _trials(run)
    run.add_argument("--workers", type=_positive, default=1, help="worker processes on this machine (default 1)")
    run.add_argument("--gpus", type=_gpu_list, help="GPU indices for the workers, e.g. 0,1,2,3 (default: all)")
    run.add_argument("--workers-per-gpu", type=_positive, default=1, help="workers packed on each GPU")
    run.add_argument("--device", choices=DEVICES, help="default: [train] device (auto)")
    _artifacts(run)
    run.set_defaults(handler="hpsearch.cli._run:cmd_run")


def _add_worker(commands: Commands) -> None:
    worker = commands.add_parser("worker", help="run one worker against a storage (what other machines run)")
    _trials(worker)
    worker.add_argument("--device", choices=DEVICES, help="default: [train] device (auto)")
    worker.add_argument("--worker-index", type=int, default=0, help="seeds this worker's sampler (default 0)")
    _artifacts(worker)
    worker.set_defaults(handler="hpsearch.cli._run:cmd_worker")


def _add_check(commands: Commands) -> None:
    check = commands.add_parser("check", help="validate a study file and print what `run` would do")
    check.add_argument("study", metavar="STUDY.toml")
    _storage(check)
    check.set_defaults(handler="hpsearch.cli._run:cmd_check")


def _add_status(commands: Commands) -> None:
    status = commands.add_parser("status", help="trial counts by state, best trial, top-k table")
    status.add_argument("study", metavar="STUDY.toml")
    _storage(status)
    _artifacts(status)
    status.add_argument("--top-k", type=_positive, help="rows of the table (default: [ensemble] top_k)")
    status.set_defaults(handler="hpsearch.cli._monitor:cmd_status")


def _add_stop(commands: Commands) -> None:
    stop = commands.add_parser("stop", help="ask every worker of the study, on every machine, to stop")
    stop.add_argument("study", metavar="STUDY.toml")
    _storage(stop)
    stop.add_argument("--now", action="store_true",
                      help="stop at once: running trials end FAIL with a queued retry (default: after each trial)")
    stop.set_defaults(handler="hpsearch.cli._monitor:cmd_stop")


def _add_ensemble(commands: Commands) -> None:
    ens = commands.add_parser("ensemble", help="weigh the top-k trials' stored outputs into an ensemble and compare")
    ens.add_argument("study", metavar="STUDY.toml")
    _storage(ens)
    _artifacts(ens)
    ens.add_argument("--top-k", type=_positive, help="candidates (default: [ensemble] top_k)")
    ens.add_argument("--method", choices=["auto", "single", "weighted", "soft", "hard", "soup"], default="auto",
                     help="the ensemble written to --out (default auto: the best single trial, uniform or weighted "
                     "soft voting, whichever has the lowest cross-fitted held-out NLL); the table compares all. "
                     "soup: the greedy weight average of the trials (same architecture and starting weights), re-run "
                     "on validation and kept only if it beats the best single trial there (else auto)")
    ens.add_argument("--device", choices=DEVICES,
                     help="where --method soup re-runs the averaged model (default: [train] device)")
    ens.add_argument("--out", metavar="DIR", default="best-ensemble",
                     help="folder for report.md and ensemble.json, replaced atomically (default best-ensemble)")
    ens.add_argument("--no-export", action="store_true",
                     help="write only report.md and ensemble.json, not the member weights and manifest.json")
    ens.add_argument("--onnx", action="store_true",
                     help="also write ensemble.onnx: the whole ensemble as one ONNX graph, images to probabilities "
                          "(needs the optional extra: pip install -e '.[onnx]')")
    ens.set_defaults(handler="hpsearch.cli._ensemble:cmd_ensemble")
    one = commands.add_parser("export", help="export one trial as `hpsearch ensemble` exports an ensemble")
    one.add_argument("study", metavar="STUDY.toml")
    _storage(one)
    _artifacts(one)
    one.add_argument("--trial", type=int, required=True, help="the COMPLETE trial to export")
    one.add_argument("--out", metavar="DIR", default=None, help="folder, replaced atomically (default trial-N)")
    one.add_argument("--onnx", action="store_true", help="also write ensemble.onnx (the optional onnx extra)")
    one.set_defaults(handler="hpsearch.cli._ensemble:cmd_export")


def _add_report(commands: Commands) -> None:
    rep = commands.add_parser("report", help="a finished study as trials.csv, PNG plots, per-class results and one "
                              "self-contained report.html")
    rep.add_argument("study", metavar="STUDY.toml")
    _storage(rep)
    _artifacts(rep)
    rep.add_argument("--out", metavar="DIR", default="report",
                     help="folder for the report, replaced atomically (default report)")
    rep.add_argument("--ensemble", metavar="DIR", default=None,
                     help="an exported ensemble (`hpsearch ensemble --out DIR`): add its members' weights, its "
                     "comparison table and a reliability diagram before/after temperature scaling")
    rep.set_defaults(handler="hpsearch.cli._ensemble:cmd_report")


def _exported(p: argparse.ArgumentParser, inputs: str) -> None:
    """An exported ensemble and the images to score with it: what `predict` and `select` share."""
    p.add_argument("dir", metavar="DIR", help="an ensemble folder written by `hpsearch ensemble --out DIR`")
    p.add_argument("inputs", metavar=inputs, nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--batch-size", type=_positive, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="default auto")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation with the study's own augmentations (manifest preprocessing."
                   "augment): average over the original, fixed shifts (crop) and mirror images (flip)")


def _add_predict(commands: Commands) -> None:
    pred = commands.add_parser("predict", help="classify images with an exported ensemble (CSV; exit "
                               f"{int(ExitCode.INPUTS_SKIPPED)} if some skipped)")
    _exported(pred, "INPUT")
    pred.add_argument("--out", metavar="FILE.csv", help="write the CSV here (default: stdout)")
    pred.set_defaults(handler="hpsearch.cli._ensemble:cmd_predict")


def _add_select(commands: Commands) -> None:
    sel = commands.add_parser("select", help="rank unlabeled images by ensemble uncertainty, write the N most "
                              "uncertain")
    _exported(sel, "POOL")
    sel.add_argument("--n", type=_positive, required=True, help="how many images to select")
    sel.add_argument("--by", choices=["entropy", "margin", "disagreement"], default="entropy",
                     help="entropy of the ensemble (default), margin between its top two, or disagreement "
                     "(mutual information between members)")
    sel.add_argument("--out", metavar="FILE.csv", help="write the CSV here (default: stdout)")
    sel.set_defaults(handler="hpsearch.cli._ensemble:cmd_select")


def _add_dashboard(commands: Commands) -> None:
    dash = commands.add_parser("dashboard", help="start optuna-dashboard on the study's storage and artifacts")
    dash.add_argument("study", metavar="STUDY.toml", nargs="?")
    _storage(dash)
    _artifacts(dash)
    dash.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    dash.add_argument("--port", type=int, default=8080)
    dash.add_argument("--allow-remote", action="store_true",
                      help="allow a non-loopback --host; every request then needs the token in the URL it prints")
    dash.set_defaults(handler="hpsearch.cli._monitor:cmd_dashboard")


def _add_storage_proxy(commands: Commands) -> None:
    from hpsearch.store import DEFAULT_HEARTBEAT_GRACE_S, DEFAULT_POOL_SIZE, DEFAULT_PORT

    proxy = commands.add_parser("storage-proxy", help="Optuna's gRPC storage proxy in front of the database: "
                                "workers use --storage grpc://HOST:PORT and the database sees one pool")
    _storage(proxy)
    proxy.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    proxy.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    proxy.add_argument("--allow-remote", action="store_true",
                       help="allow a non-loopback --host (the proxy has no authentication)")
    proxy.add_argument("--pool-size", type=_positive, default=DEFAULT_POOL_SIZE,
                       help=f"database connections, all told (default {DEFAULT_POOL_SIZE})")
    proxy.add_argument("--heartbeat-grace", type=_positive, default=DEFAULT_HEARTBEAT_GRACE_S, metavar="SECONDS",
                       help="a trial whose worker has not beaten for this long ends FAIL and is retried "
                       f"(default {DEFAULT_HEARTBEAT_GRACE_S})")
    proxy.set_defaults(handler="hpsearch.cli._proxy:cmd_storage_proxy")


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
