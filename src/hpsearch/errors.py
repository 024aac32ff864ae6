"""One error base for everything a user can fix: `HpsearchError` and the exit code it maps to.

Every module raises a subclass whose message is one line naming the field, file or URL and the fix; the CLI
catches the base, prints that line and exits with `exit_code` (2: bad input), never with a traceback.
Each subclass keeps its module's name (`hpsearch.storage.StorageError` is this module's `StorageError`).
"""

from __future__ import annotations

from pathlib import Path

EXIT_BAD_INPUT = 2


class HpsearchError(ValueError):
    """Input hpsearch cannot use; `str(err)` is one line naming what and the fix."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(HpsearchError):
    """A study file that cannot be run. `str(err)` is one line naming the field and the fix."""

    def __init__(self, field: str, message: str, source: str | Path | None = None) -> None:
        self.field = field
        self.source = str(source) if source is not None else None
        where = f"{self.source}: " if self.source else ""
        super().__init__(f"{where}{field}: {message}")


class UsageError(HpsearchError):
    """Bad input found by the CLI itself (flags that do not go together, a study that does not exist)."""


class StorageError(HpsearchError):
    """A storage URL that cannot be opened; the message says which and why."""


class DataError(HpsearchError):
    """Data that cannot be loaded; the message names the file or folder and the fix."""


class ArtifactStoreError(HpsearchError):
    """The artifact store named by the user cannot be used; one line naming it and the fix."""


class StoreFullError(ArtifactStoreError):
    """The artifact store has no room for a trial's files: the run stopped, the trial is queued for retry."""


class DeviceBrokenError(HpsearchError):
    """A sticky device error (an illegal address, a device-side assert) left this process's GPU unusable: its
    trial ended FAIL; the process must exit (a supervisor restarts a worker with a fresh context)."""

    exit_code = 6


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
