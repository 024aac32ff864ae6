"""`main`: parse the command line, run the command's function, and turn what it raised into one line and an
exit code (`ExitCode`), never a traceback for input the user can fix."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

from hpsearch.cli._output import console, print_error, set_verbosity
from hpsearch.cli._parser import build_parser
from hpsearch.errors import ExitCode, HpsearchError

Command = Callable[[argparse.Namespace], ExitCode]


def main(argv: Sequence[str] | None = None) -> ExitCode:
    args = build_parser().parse_args(argv)
    set_up_process(args.verbosity, optuna=args.uses_optuna)
    try:
        return _command(args.handler)(args)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: running trials were marked FAIL and queued for retry from their "
                      "checkpoints; `hpsearch run` resumes the study")
        return ExitCode.INTERRUPTED
    except Exception as err:
        code = refusal(err)
        if code is None:
            raise
        return code


def set_up_process(verbosity: int, *, optuna: bool) -> None:
    """Log format, verbosity and warnings of a process that runs a command (`main`, or run's preparation child)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    set_verbosity(verbosity, optuna=optuna)
    # We use Optuna's heartbeat and retry callbacks on purpose; their ExperimentalWarnings are noise to users.
    warnings.filterwarnings("ignore", message=r".*(is experimental|experimental feature).*")


def refusal(err: Exception) -> ExitCode | None:
    """An error the user can act on, printed as its one line, and its exit code; None: a bug, to be raised."""
    if isinstance(err, HpsearchError):
        print_error(str(err))
        return err.exit_code
    line = _proxy_failure(err)
    if line is None:
        return None
    print_error(line)
    return ExitCode.STORAGE_DOWN


def _command(handler: str) -> Command:
    """The function a parser named as "module:function", its module imported only now: a command imports only
    what it runs on."""
    module, _, name = handler.partition(":")
    command: Command = getattr(importlib.import_module(module), name)
    return command


def _proxy_failure(err: Exception) -> str | None:
    if "grpc" not in sys.modules:  # no proxy in this process: nothing to explain
        return None
    from hpsearch.store import proxy_failure

    return proxy_failure(err)


if __name__ == "__main__":
    sys.exit(main())
