"""`ensemble.onnx`: the whole exported ensemble as one ONNX graph (`hpsearch ensemble ... --onnx`).

One graph from preprocessed images `images` [batch, 3, S, S] float32 (what `ensemble.preprocess` makes of uint8
images; the manifest's preprocessing) to `probabilities` [batch, C] float32: every member with its weights, the
weighted average of their softmaxes and the temperature, exactly what `load_ensemble`'s module computes (it is
that module, exported by torch.onnx's dynamo exporter). The batch axis is dynamic. Weights live inside the file,
or, past ONNX's 2 GB protobuf limit, in `ensemble.onnx.data` next to it; both are listed in the manifest and in
SHA256SUMS. Before it is kept the graph is run with ONNX Runtime on two batch sizes and compared with the
PyTorch module (max abs difference <= ONNX_TOLERANCE), so a graph that computes something else is never written.

The ONNX packages are an optional extra: `pip install -e '.[onnx]'`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hpsearch.errors import ExportError, first_line
from hpsearch.predict import sha256_file

if TYPE_CHECKING:
    from hpsearch.predict import Ensemble

ONNX_FILE = "ensemble.onnx"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
ONNX_TOLERANCE = 1e-4
CHECK_BATCHES = (1, 5)  # the export traces batch 2; the check runs other sizes through the dynamic axis
PACKAGES = ("onnx", "onnxruntime", "onnxscript")  # onnxscript: torch.onnx's dynamo exporter builds on it


def missing_packages() -> list[str]:
    """The ONNX packages that do not import here."""
    missing = []
    for name in PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def require_onnx() -> None:
    """Raise ExportError naming the missing packages and the install command, when some are missing."""
    missing = missing_packages()
    if missing:
        raise ExportError(f"--onnx needs the optional ONNX packages ({', '.join(missing)} missing); install them "
                          "with `pip install -e '.[onnx]'` (or pip install onnx onnxruntime onnxscript)")


def write_onnx(folder: Path, ensemble: Ensemble) -> dict[str, Any]:
    """Export `ensemble` (eval mode, CPU) to folder/ensemble.onnx, check it with ONNX Runtime, and return the
    manifest's `onnx` entry (file, sha256, external data files, input/output, opset, the check's result)."""
    import onnx

    require_onnx()
    ensemble = ensemble.cpu().eval()
    size = ensemble.preprocess.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad():
            program = torch.onnx.export(ensemble, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes={"x": {0: batch}},
                                        verbose=False)
    except Exception as err:  # the exporter raises many types; one line naming the step is what the CLI needs
        raise ExportError(f"torch.onnx could not export the ensemble ({type(err).__name__}: "
                          f"{first_line(err)})") from None
    if program is None:
        raise ExportError("torch.onnx returned no program for the ensemble")
    path = folder / ONNX_FILE
    program.save(str(path))  # weights inside the file; past 2 GB in ensemble.onnx.data (external data)
    model = onnx.load(str(path), load_external_data=False)
    external = sorted({entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                       if entry.key == "location"})
    for name in external:
        if "/" in name or "\\" in name or not (folder / name).is_file():
            raise ExportError(f"{path}: external data {name!r} is not a file next to it")
    check = check_onnx(path, ensemble)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    classes = len(ensemble.classes)
    return {
        "file": ONNX_FILE,
        "sha256": sha256_file(path),
        "external_data": [{"file": name, "sha256": sha256_file(folder / name)} for name in external],
        "opset": opset,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32",
                  "is": "preprocessed images: see preprocessing (uint8 / 255, then (x - mean) / std), NCHW"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", classes], "dtype": "float32",
                   "is": "class probabilities in the order of classes, combined as combine.rule says"},
        "exporter": f"torch.onnx (dynamo) {torch.__version__}",
        "check": check,
    }


def check_onnx(path: Path, ensemble: Ensemble) -> dict[str, Any]:
    """Run the graph with ONNX Runtime (CPU) on CHECK_BATCHES random batches; compare with the module."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    size = ensemble.preprocess.image_size
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for n in CHECK_BATCHES:
        x = torch.randn(n, 3, size, size, generator=generator)
        with torch.no_grad():
            expected = ensemble(x).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        if got.shape != expected.shape:
            raise ExportError(f"{path}: ONNX Runtime gave shape {list(got.shape)} for batch {n}, the module "
                              f"{list(expected.shape)}")
        worst = max(worst, float(abs(got - expected).max()))
    if not worst <= ONNX_TOLERANCE:
        raise ExportError(f"{path}: ONNX Runtime's probabilities differ from the PyTorch module's by {worst:.3g} "
                          f"(> {ONNX_TOLERANCE}); not written")
    return {"runtime": f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)",
            "batch_sizes": list(CHECK_BATCHES), "max_abs_diff": worst, "tolerance": ONNX_TOLERANCE}
