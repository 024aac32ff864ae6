"""The export's README.md, a model card: what the folder is, its classes and preprocessing, its held-out metrics
and the data each came from, its members and weights, and the few lines that load it with plain torchvision (and
timm) and with ONNX Runtime. Written from the manifest alone, so it describes exactly what the folder ships.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CARD_FILE = "README.md"
SHOWN_CLASSES = 50  # a card listing 1000 class names is no longer read


def _f(value: object, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "—"


def _params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _metrics(manifest: Mapping[str, Any]) -> list[str]:
    shipped = next((m for m in manifest.get("metrics", []) if m.get("method") == manifest["combine"]["method"]), None)
    fitting = manifest.get("fitting", {})
    if shipped is None:
        return ["No metrics recorded."]
    heldout = fitting.get("heldout", {}).get(shipped["method"], {})
    return [
        "| data | accuracy | NLL | ECE |", "|---|---:|---:|---:|",
        f"| test split ({fitting.get('test', 'held out')}), at the shipped T | {_f(shipped.get('test_accuracy'))} | "
        f"{_f(shipped.get('test_nll_scaled'))} | {_f(shipped.get('test_ece_scaled'))} |",
        f"| cross-fitted held-out ({fitting.get('evidence', '')}) | {_f(heldout.get('accuracy'))} | "
        f"{_f(shipped.get('heldout_nll'))} | — |",
        "", "ECE: 15 equal-width confidence bins. Every combination the export was chosen among is in "
        "`manifest.json` (`metrics`).",
    ]


def model_card(manifest: Mapping[str, Any]) -> str:
    """README.md of an export folder, from its manifest."""
    combine, pre, members = manifest["combine"], manifest["preprocessing"], manifest["members"]
    classes = list(manifest["classes"])
    shown = ", ".join(f"`{c}`" for c in classes[:SHOWN_CLASSES])
    more = f" and {len(classes) - SHOWN_CLASSES} more (all in `manifest.json`)" if len(classes) > SHOWN_CLASSES else ""
    member_rows = [f"| {m['trial']} | {m['arch']} | {m['weight']:.3f} | "
                   + (", ".join(f["file"] for f in m["folds"]) if "folds" in m else m.get("file", ""))
                   + f" | {_params(m.get('hyperparameters', {}))} |" for m in members]
    t = combine.get("temperature")
    timm = any(str(m["arch"]).startswith("timm:") for m in members)
    lines = [
        f"# {manifest['study']}: {combine['method']} ({len(members)} member{'s' * (len(members) != 1)})",
        "",
        f"An image classifier exported by hpsearch {manifest.get('hpsearch_version', '')} from study "
        f"`{manifest['study']}` (storage `{manifest.get('storage', '')}`, split `{manifest.get('split_sha256', '')}`).",
        f"It combines as: {combine['rule']}; T = {t if t is not None else 'none'}.",
        "",
        "## Classes", "", f"{len(classes)} classes, in output order: {shown}{more}.",
        "",
        "## Preprocessing", "",
        f"RGB, {pre['resize']['policy']}; values {pre['scale']}; then {pre['normalize']} with mean {pre['mean']} and "
        f"std {pre['std']}; input {pre['layout']} of {pre['image_size']} x {pre['image_size']}.",
        "",
        "## Held-out metrics", "", *_metrics(manifest),
        "",
        "## Which data fitted what", "",
        *(f"- {k}: {v}" for k, v in manifest.get("fitting", {}).items() if isinstance(v, str)),
        "",
        "## Members", "", "| trial | arch | weight | file(s) | hyperparameters |", "|---:|---|---:|---|---|",
        *member_rows,
        "",
        "## Load it", "",
        "With hpsearch: `hpsearch.load_ensemble(FOLDER)` (checks every sha256 first), or `hpsearch predict FOLDER "
        "IMAGES...`. With plain torchvision" + (" and timm (a `timm:NAME` member is timm's NAME)" if timm else "")
        + ", from the manifest alone:",
        "", "```python", *_torchvision_lines(timm), "```",
    ]
    if "onnx" in manifest:
        lines += ["", "With ONNX Runtime (no torch needed):", "", "```python", "import onnxruntime",
                  f"session = onnxruntime.InferenceSession(\"{manifest['onnx']['file']}\")",
                  "probs = session.run(None, {\"images\": x})[0]   # x: float32 NCHW, preprocessed as above", "```"]
    lines += ["", "`sha256sum -c SHA256SUMS` checks every file of the folder, this one included."]
    return "\n".join(lines) + "\n"


def _torchvision_lines(timm: bool = False) -> list[str]:
    if timm:  # timm's model of that name, never its pretrained weights: the member's own load strictly
        build = [
            "def build(spec):",
            "    if spec[\"arch\"].startswith(\"timm:\"):  # pip install timm",
            "        import timm",
            "        return timm.create_model(spec[\"arch\"].removeprefix(\"timm:\"), pretrained=False,",
            "                                 num_classes=spec[\"num_classes\"], **spec[\"builder_kwargs\"])",
            "    return torchvision.models.get_model(spec[\"arch\"], num_classes=spec[\"num_classes\"],",
            "                                        **spec[\"builder_kwargs\"])",
            "",
        ]
        model = ["        model = build(spec)"]
    else:
        build = []
        model = ["        model = torchvision.models.get_model(spec[\"arch\"], num_classes=spec[\"num_classes\"],",
                 "                                             **spec[\"builder_kwargs\"])"]
    return [
        "import json, torch, torchvision",
        "from safetensors.torch import load_file",
        "",
        "m = json.load(open(\"manifest.json\"))",
        *build,
        "def member(spec, x):  # a member's softmax; a cross-validated member averages its fold models'",
        "    files = [f[\"file\"] for f in spec[\"folds\"]] if \"folds\" in spec else [spec[\"file\"]]",
        "    probs = []",
        "    for name in files:",
        *model,
        "        model.load_state_dict(load_file(name), strict=True)",
        "        probs.append(model.eval()(x).softmax(-1))",
        "    return torch.stack(probs).mean(0)",
        "",
        "# x: images preprocessed as above; hard voting combines votes instead (see combine.rule)",
        "mix = sum(spec[\"weight\"] * member(spec, x) for spec in m[\"members\"])",
        "probs = (mix.log() / (m[\"combine\"][\"temperature\"] or 1.0)).softmax(-1)",
    ]
