"""Writing an ensemble's export folder (manifest, member safetensors, SHA256SUMS, report.md, ONNX)."""

from __future__ import annotations

from hpsearch.export._write import RESULT_FILE, export_ensemble, staged_dir

__all__ = ["RESULT_FILE", "export_ensemble", "staged_dir"]
