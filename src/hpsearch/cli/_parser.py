"""The command line: one parser per command, each naming the function that runs it as "module:function", so
that only the module of the command being run is imported (`status` never imports what `run` needs)."""

from __future__ import annotations

import argparse
import textwrap
from typing import TypeAlias

from hpsearch import __version__
from hpsearch.cli._help import COMMANDS, DESCRIPTION, STUDY_HELP, example_epilog, exit_codes_epilog

# argparse's own type for what add_subparsers returns, which it does not export
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

DEVICES = ["auto", "cpu", "cuda"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpsearch", description=DESCRIPTION, epilog=exit_codes_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hpsearch {__version__}")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=0,
                          help="print only errors and the final result (no progress, no per-trial lines)")
    loudness.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                          help="also print Optuna's own INFO log lines")
    parser.set_defaults(uses_optuna=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_worker, _add_check, _add_status, _add_stop, _add_ensemble, _add_report,
                _add_predict, _add_select, _add_dashboard, _add_storage_proxy):
        add(commands)
    return parser


def _command(commands: Commands, name: str) -> argparse.ArgumentParser:
    """A command's parser with its --help: what it does (description), its options, then an example."""
    text = COMMANDS[name]
    return commands.add_parser(name, help=text.summary, description=textwrap.fill(text.description, 100),
                               epilog=example_epilog(name), formatter_class=argparse.RawDescriptionHelpFormatter)


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a study-file key, validated as the file is and recorded in the study like it "
                   "(e.g. --set train.epochs=3 --set space.lr=[1e-4,1e-2]); repeatable")


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout instead of tables (keys: docs/cli.md)")


def _storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="SQLAlchemy URL (default: $HPSEARCH_STORAGE, [study] storage, "
                   "sqlite:///hpsearch.db)")


def _artifacts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", metavar="DIR|s3://BUCKET/PREFIX",
                   help="artifact store: a folder, or S3 with credentials and endpoint from the environment "
                   "(default: the one the study recorded, else [study] artifacts, else ./artifacts)")


def _trials(p: argparse.ArgumentParser) -> None:
    """The study file, its storage and how long to run: what `run` and `worker` share."""
    p.add_argument("study", metavar="STUDY.toml", help=STUDY_HELP)
    _storage(p)
    p.add_argument("--n-trials", type=_positive, help="finished trials to reach (default: [study] n_trials)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop starting trials after this long")
    _overrides(p)


def _add_run(commands: Commands) -> None:
    run = _command(commands, "run")
    _trials(run)
    run.add_argument("--workers", type=_positive, default=1, help="worker processes on this machine (default 1)")
    run.add_argument("--gpus", type=_gpu_list, help="GPU indices for the workers, e.g. 0,1,2,3 (default: all)")
    run.add_argument("--workers-per-gpu", type=_positive, default=1, help="workers packed on each GPU")
    run.add_argument("--device", choices=DEVICES, help="default: [train] device (auto)")
    _artifacts(run)
    run.set_defaults(handler="hpsearch.cli._run:cmd_run")


def _add_worker(commands: Commands) -> None:
    worker = _command(commands, "worker")
    _trials(worker)
    worker.add_argument("--device", choices=DEVICES, help="default: [train] device (auto)")
    worker.add_argument("--worker-index", type=int, help="seeds this worker's sampler (default: "
                        "SLURM_ARRAY_TASK_ID under a SLURM job array, else 0)")
    _artifacts(worker)
    worker.set_defaults(handler="hpsearch.cli._run:cmd_worker")


def _add_check(commands: Commands) -> None:
    check = _command(commands, "check")
    check.add_argument("study", metavar="STUDY.toml", help=STUDY_HELP)
    _storage(check)
    _overrides(check)
    _json(check)
    check.set_defaults(handler="hpsearch.cli._run:cmd_check")


def _add_status(commands: Commands) -> None:
    status = _command(commands, "status")
    status.add_argument("study", metavar="STUDY.toml", help=STUDY_HELP)
    _storage(status)
    _artifacts(status)
    status.add_argument("--top-k", type=_positive, help="rows of the table (default: [ensemble] top_k)")
    _json(status)
    status.set_defaults(handler="hpsearch.cli._monitor:cmd_status")


def _add_stop(commands: Commands) -> None:
    stop = _command(commands, "stop")
    stop.add_argument("study", metavar="STUDY.toml", help=STUDY_HELP)
    _storage(stop)
    stop.add_argument("--now", action="store_true",
                      help="stop at once: running trials end FAIL with a queued retry (default: after each trial)")
    stop.set_defaults(handler="hpsearch.cli._monitor:cmd_stop")


def _add_ensemble(commands: Commands) -> None:
    ens = _command(commands, "ensemble")
    ens.add_argument("study", metavar="STUDY.toml", help=STUDY_HELP)
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
    _json(ens)
    ens.set_defaults(handler="hpsearch.cli._ensemble:cmd_ensemble")
    one = _command(commands, "export")
    one.add_argument("study", metavar="STUDY.toml", help=STUDY_HELP)
    _storage(one)
    _artifacts(one)
    one.add_argument("--trial", type=int, required=True, help="the COMPLETE trial to export")
    one.add_argument("--out", metavar="DIR", default=None, help="folder, replaced atomically (default trial-N)")
    one.add_argument("--onnx", action="store_true", help="also write ensemble.onnx (the optional onnx extra)")
    _json(one)
    one.set_defaults(handler="hpsearch.cli._ensemble:cmd_export")


def _add_report(commands: Commands) -> None:
    rep = _command(commands, "report")
    rep.add_argument("study", metavar="STUDY.toml", help=STUDY_HELP)
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
    p.set_defaults(uses_optuna=False)  # scoring images needs only the export: no Optuna import
    p.add_argument("dir", metavar="DIR", help="an ensemble folder written by `hpsearch ensemble --out DIR`")
    p.add_argument("inputs", metavar=inputs, nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--batch-size", type=_positive, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="default auto")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation with the study's own augmentations (manifest preprocessing."
                   "augment): average over the original, fixed shifts (crop) and mirror images (flip)")


def _add_predict(commands: Commands) -> None:
    pred = _command(commands, "predict")
    _exported(pred, "INPUT")
    pred.add_argument("--out", metavar="FILE.csv", help="write the CSV here (default: stdout)")
    pred.set_defaults(handler="hpsearch.cli._ensemble:cmd_predict")


def _add_select(commands: Commands) -> None:
    sel = _command(commands, "select")
    _exported(sel, "POOL")
    sel.add_argument("--n", type=_positive, required=True, help="how many images to select")
    sel.add_argument("--by", choices=["entropy", "margin", "disagreement"], default="entropy",
                     help="entropy of the ensemble (default), margin between its top two, or disagreement "
                     "(mutual information between members)")
    sel.add_argument("--out", metavar="FILE.csv", help="write the CSV here (default: stdout)")
    sel.set_defaults(handler="hpsearch.cli._ensemble:cmd_select")


def _add_dashboard(commands: Commands) -> None:
    dash = _command(commands, "dashboard")
    dash.add_argument("study", metavar="STUDY.toml", nargs="?",
                      help=f"{STUDY_HELP} (default: every study in --storage)")
    _storage(dash)
    _artifacts(dash)
    dash.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    dash.add_argument("--port", type=int, default=8080)
    dash.add_argument("--allow-remote", action="store_true",
                      help="allow a non-loopback --host; every request then needs the token in the URL it prints")
    dash.set_defaults(handler="hpsearch.cli._monitor:cmd_dashboard")


def _add_storage_proxy(commands: Commands) -> None:
    from hpsearch.store import DEFAULT_HEARTBEAT_GRACE_S, DEFAULT_POOL_SIZE, DEFAULT_PORT

    proxy = _command(commands, "storage-proxy")
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
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of GPU indices") from None
    if not gpus:
        raise argparse.ArgumentTypeError("name at least one GPU index, e.g. --gpus 0")
    return gpus


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value
