"""Writing an ensemble's export folder (manifest, member safetensors, SHA256SUMS, report.md, ONNX), and the
`hpsearch ensemble` command that makes one."""

from __future__ import annotations

from hpsearch.export._comparison import report_markdown, result_table
from hpsearch.export._ensemble_command import Exported, export_ensemble
from hpsearch.export._write import RESULT_FILE, staged_dir

__all__ = ["RESULT_FILE", "Exported", "export_ensemble", "report_markdown", "result_table", "staged_dir"]
