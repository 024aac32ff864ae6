"""What each command's `--help` says above and below its options: what the command does, for a user, and an
example to copy; the top-level epilog ends with the exit codes, generated from `ExitCode`."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from hpsearch.errors import ExitCode

DESCRIPTION = """\
Search the hyperparameters of fine-tuning an image classifier (learning rate, optimizer, LR scheduler, dropout)
with Optuna. A study is one TOML file naming the data, the model and the search space; `run` trains its trials,
`status`, `dashboard` and `report` show them, `ensemble` combines the best trials without retraining, and
`predict` classifies new images with that ensemble. `hpsearch COMMAND --help` explains each command."""

STUDY_HELP = "the study file (TOML): its [study] name finds the study in the storage"


@dataclass(frozen=True)
class Help:
    summary: str  # one line in the top-level command list
    description: str  # the paragraph at the top of the command's --help
    example: str  # shell lines, shown under "example:"


COMMANDS: dict[str, Help] = {
    "run": Help(
        "run (or resume) a study until it holds n_trials finished trials",
        "Train the study's trials until it holds [study] n_trials finished ones (COMPLETE + PRUNED), showing a "
        "progress bar and one line per finished trial, then a table of the best trials. Running it again resumes "
        "the study: interrupted trials restart from their checkpoints. With --workers N it starts N worker "
        "processes on this machine (spread over the GPUs) and restarts any that dies.",
        "hpsearch run studies/digits.toml\nhpsearch run studies/cifar10-resnet18.toml --workers 4 --gpus 0,1"),
    "worker": Help(
        "run one worker against a storage (what other machines run)",
        "One worker process: it takes trials of the study from the storage and trains them until the study holds "
        "n_trials finished trials. Start one per GPU on other machines, all against the same PostgreSQL storage "
        "(or storage proxy), to spread a study over many machines.",
        "hpsearch worker studies/cifar10-resnet18.toml --storage grpc://db-host:13000 --device cuda"),
    "check": Help(
        "validate a study file and print what `run` would do",
        "Read and validate the study file (every key, the search space, that the model takes the image size) "
        "without training anything, and print the resolved study: the storage it would use, the data cache and "
        "every setting with its default filled in. Exit 2 with one line naming the field and the fix otherwise.",
        "hpsearch check studies/digits.toml\nhpsearch check studies/digits.toml --json | jq .config.train"),
    "status": Help(
        "trial counts by state, best trial, top-k table",
        "Show how far a study got: its trials counted by state, the best trial and its parameters, the artifact "
        "store's size, the top-k trials, then the trials running now (worker, device, epoch) and the last failed "
        "ones with their reasons. It only reads the study; it never creates a storage.",
        "hpsearch status studies/digits.toml\nhpsearch status studies/digits.toml --json | jq .best"),
    "stop": Help(
        "ask every worker of the study, on every machine, to stop",
        "Ask every worker of the study, on every machine, to stop after its current trial (or at once with "
        "--now: running trials end FAIL with a queued retry that resumes their checkpoint). A later `run` resumes "
        "the study.",
        "hpsearch stop studies/digits.toml --now"),
    "ensemble": Help(
        "weigh the top-k trials' stored outputs into an ensemble and compare",
        "Combine the study's top-k trials into an ensemble without retraining: weights and a temperature are "
        "fitted on the stored validation outputs, and what ships (the best single trial, uniform or weighted soft "
        "voting; a temperature or none) rests on cross-fitted held-out evidence; every choice is then compared on "
        "the test split. Writes report.md and ensemble.json to --out and, unless --no-export, the member weights, "
        "a model card and a manifest that `predict` reads.",
        "hpsearch ensemble studies/digits.toml --top-k 5 --out best-ensemble\n"
        "hpsearch ensemble studies/digits.toml --json | jq '.metrics[] | {method, test_accuracy}'"),
    "export": Help(
        "export one trial as `ensemble` exports an ensemble",
        "Export one COMPLETE trial the way `hpsearch ensemble` exports an ensemble: its weights, a manifest, a "
        "model card and checksums that `predict` and plain PyTorch load; its temperature is decided by the same "
        "held-out evidence.",
        "hpsearch export studies/digits.toml --trial 7 --out trial-7\nhpsearch predict trial-7 photos/"),
    "report": Help(
        "a finished study as trials.csv, PNG plots, per-class results and one self-contained report.html",
        "Write a report of the study to --out: trials.csv, per-class results, PNG plots (optimization history, "
        "parameter importances, ...) and one self-contained report.html to open in a browser or attach.",
        "hpsearch report studies/digits.toml --out report   # then open report/report.html"),
    "predict": Help(
        f"classify images with an exported ensemble (CSV; exit {int(ExitCode.INPUTS_SKIPPED)} if some skipped)",
        "Classify image files (or folders, searched recursively) with an ensemble exported by `hpsearch "
        "ensemble`, as CSV: one row per image with its predicted class and the class probabilities. Unreadable "
        f"inputs are named on stderr and skipped (exit {int(ExitCode.INPUTS_SKIPPED)}).",
        "hpsearch predict best-ensemble photos/ --out predictions.csv"),
    "select": Help(
        "rank unlabeled images by ensemble uncertainty, write the N most uncertain",
        "Rank unlabeled images by how unsure the exported ensemble is about them and write the N most uncertain "
        "as CSV: the images worth labelling next (uncertainty sampling for active learning).",
        "hpsearch select best-ensemble unlabeled/ --n 100 --by entropy --out to-label.csv"),
    "dashboard": Help(
        "start optuna-dashboard on the study's storage and artifacts",
        "Serve optuna-dashboard on the study's storage and artifact store, to watch a study in the browser while "
        "it runs. It binds 127.0.0.1; another host needs --allow-remote and then the token in the URL it prints.",
        "hpsearch dashboard studies/digits.toml --port 8080   # then open http://127.0.0.1:8080"),
    "storage-proxy": Help(
        "Optuna's gRPC storage proxy in front of the database",
        "Run Optuna's gRPC storage proxy in front of the database, so that many workers share one small pool of "
        "database connections: workers and every other command then use --storage grpc://HOST:PORT.",
        "HPSEARCH_STORAGE=postgresql+psycopg://hpsearch@db-host/hpsearch hpsearch storage-proxy --port 13000"),
}


def example_epilog(command: str) -> str:
    """The example under a command's options, indented as argparse indents its own sections."""
    return "example:\n" + "\n".join(f"  {line}" for line in COMMANDS[command].example.splitlines())


def exit_code_rows() -> list[tuple[int, str]]:
    return [(int(code), code.meaning) for code in ExitCode]


def exit_codes_epilog() -> str:
    """The exit codes, for the top-level --help."""
    width = max(len(str(code)) for code, _ in exit_code_rows())
    indent = " " * (width + 4)
    lines = [textwrap.fill(f"  {code:>{width}}  {meaning}", 100, subsequent_indent=indent)
             for code, meaning in exit_code_rows()]
    return "exit codes:\n" + "\n".join(lines)


def exit_codes_markdown() -> str:
    """The exit codes as the README's table (tools/exit_codes.py writes it; tests/cli checks it)."""
    return "\n".join(["| code | meaning |", "|---:|---|",
                      *(f"| {code} | {meaning.replace('|', chr(92) + '|')} |" for code, meaning in exit_code_rows())])
