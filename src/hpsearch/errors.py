"""One error base for everything a user can fix (`HpsearchError`), the exit codes, and an error's first line.

Every module raises a subclass whose message is one line naming the field, file or URL and the fix; the CLI
catches the base, prints that line and exits with `exit_code` (`ExitCode.BAD_INPUT`), never with a traceback.
"""

from __future__ import annotations

import enum
from pathlib import Path


class ExitCode(enum.IntEnum):
    """Every code the `hpsearch` command and its workers exit with, each with its one meaning: the single source
    of the table in `hpsearch --help` and in the README (tools/exit_codes.py writes it there)."""

    meaning: str

    def __new__(cls, value: int, meaning: str) -> ExitCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    OK = 0, "done (`run`: the study holds its n_trials finished trials, or `hpsearch stop` or --timeout ended it)"
    FAILURE_STREAK = 1, "`run` stopped: [study] max_consecutive_failures trials failed in a row"
    BAD_INPUT = 2, ("bad input: one line naming the field, file or URL and the fix, nothing created or trained "
                    "(a full artifact store too)")
    STORAGE_DOWN = 3, ("the storage (the database or the storage proxy) stopped answering (`run --workers` restarts "
                        "such a worker)")
    WORKER_FAILURE_STREAK = 4, "a `worker` stopped on a failure streak (its supervisor does not restart it)"
    WORKER_STORE_FULL = 5, "a `worker` found the artifact store full (its supervisor stops every worker)"
    DEVICE_BROKEN = 6, ("a sticky device error broke the process's GPU context (`run --workers` restarts such a "
                        "worker)")
    INPUTS_SKIPPED = 7, "`predict`/`select` wrote their CSV, but some inputs were unreadable or missing"
    INTERRUPTED = 130, ("interrupted (Ctrl-C or SIGTERM): running trials end FAIL, each with a queued retry that "
                        "resumes its checkpoint")


def first_line(err: BaseException) -> str:
    """The first non-blank line of an error's message, stripped; its type's name when the message is blank.

    Library errors (torch, drivers, pydantic) can span many lines; a one-line message quotes only the first."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


class HpsearchError(ValueError):
    """Input hpsearch cannot use; `str(err)` is one line naming what and the fix."""

    exit_code: ExitCode = ExitCode.BAD_INPUT


class ConfigError(HpsearchError):
    """A study file that cannot be run. `str(err)` is one line naming the field and the fix."""

    def __init__(self, field: str, message: str, source: str | Path | None = None) -> None:
        self.field = field
        self.message = message
        self.source = str(source) if source is not None else None
        where = f"{self.source}: " if self.source else ""
        super().__init__(f"{where}{field}: {message}")


class UsageError(HpsearchError):
    """Bad input found by the CLI itself (flags that do not go together, a study that does not exist)."""


class StorageError(HpsearchError):
    """A storage URL that cannot be opened; the message says which and why."""


class StorageUnavailableError(HpsearchError):
    """The storage did not answer (connection refused or dropped, database restarting, proxy down) for as long
    as `[study] storage_patience` allows; the message names the storage, how long and the last error."""

    exit_code = ExitCode.STORAGE_DOWN
    MARK = "storage unavailable"  # in the message: how a proxy's client tells this error apart (_retrying)

    def __init__(self, storage: str, waited_s: float, why: str) -> None:
        self.waited_s = waited_s
        super().__init__(f"storage: {storage}: {self.MARK} for {waited_s:.0f} s ({why}); check that the database "
                         "(or `hpsearch storage-proxy`) runs and is reachable, then run again")


class DataError(HpsearchError):
    """Data that cannot be loaded; the message names the file or folder and the fix."""


class ArtifactStoreError(HpsearchError):
    """The artifact store named by the user cannot be used; one line naming it and the fix."""


class StoreFullError(ArtifactStoreError):
    """A write found no room in the artifact store (ENOSPC, a quota): not the trial's fault, so the run stops at
    once and the trial is queued for retry."""


class DeviceBrokenError(HpsearchError):
    """A sticky device error (an illegal address, a device-side assert) left this process's GPU unusable: its
    trial ended FAIL; the process must exit (a supervisor restarts a worker with a fresh context)."""

    exit_code = ExitCode.DEVICE_BROKEN


class StudyRecordError(HpsearchError):
    """A study whose recorded attributes (config, split, preprocessing) cannot be used, or no longer match."""


class EnsembleError(HpsearchError):
    """An ensemble that cannot be built (too few usable candidates, outputs that do not line up)."""


class ExportError(HpsearchError):
    """An ensemble folder that cannot be written or loaded; the message names the file and the fix."""


class TTAError(HpsearchError):
    """Test-time augmentation asked of an export that cannot give it."""


class ReportError(HpsearchError):
    """A study report that cannot be made (no trials, no COMPLETE trial with stored outputs, a bad --out)."""
