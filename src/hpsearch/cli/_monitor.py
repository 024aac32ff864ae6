"""`status`, `stop` and `dashboard`: the commands that watch or steer a study. No torch at import, directly or
through what this module imports: they run beside the workers, and watching a study must stay cheap."""

from __future__ import annotations

import argparse

from hpsearch.cli._hosts import is_loopback
from hpsearch.cli._output import cache_object, console, print_cache, print_json_object, show
from hpsearch.errors import ExitCode, UsageError


def cmd_status(args: argparse.Namespace) -> ExitCode:
    from hpsearch.monitor import status_object, status_renderables
    from hpsearch.store import open_existing, resolve_artifacts

    cfg, study, url = open_existing(args.study, args.storage)
    artifacts = resolve_artifacts(args.artifacts, study, cfg.study.artifacts)
    top_k = args.top_k or cfg.ensemble.top_k
    if args.json:
        print_json_object({**status_object(study, url, artifacts, top_k), "data_cache": cache_object(cfg)})
        return ExitCode.OK
    for part in status_renderables(study, url, artifacts, top_k, cfg.train.epochs):
        show(part)
    print_cache(cfg)
    return ExitCode.OK


def cmd_stop(args: argparse.Namespace) -> ExitCode:
    from hpsearch.store import open_existing, request_stop

    _, study, _ = open_existing(args.study, args.storage)
    request = request_stop(study, "hpsearch stop" + (" --now" if args.now else ""), now=args.now)
    how = ("at once: their running trials end FAIL, each with a queued retry" if args.now
           else "after their current trials")
    console.print(f"asked every worker of study {study.study_name!r} to stop {how}; recorded as {request.line()}; "
                  f"a later `hpsearch run {args.study}` resumes it", highlight=False, soft_wrap=True)
    return ExitCode.OK


def cmd_dashboard(args: argparse.Namespace) -> ExitCode:
    from hpsearch.monitor import serve

    if not args.allow_remote and not is_loopback(args.host):
        raise UsageError(f"--host {args.host}: optuna-dashboard has no authentication of its own and can delete "
                         "studies; bind 127.0.0.1 (default), or add --allow-remote to expose it on purpose (every "
                         "request then needs the token in the URL it prints)")
    serve(args.study, storage=args.storage, artifacts=args.artifacts, host=args.host, port=args.port,
          loopback=is_loopback(args.host), allow_remote=args.allow_remote,
          # One line, never wrapped (the URL may carry the token) nor read as markup.
          echo=lambda line: console.print(line, soft_wrap=True, markup=False, highlight=False))
    return ExitCode.OK
