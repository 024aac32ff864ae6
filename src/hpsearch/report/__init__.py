"""`hpsearch report`: trials.csv, per-class results, figures and one self-contained report.html."""

from __future__ import annotations

from hpsearch.report._study import REPORT_FILE, write_report

__all__ = ["REPORT_FILE", "write_report"]
