"""The `hpsearch` command: argument parsing, progress, tables and exit codes over the stages."""

from __future__ import annotations

from hpsearch.cli._help import exit_codes_markdown
from hpsearch.cli._main import main

__all__ = ["exit_codes_markdown", "main"]
