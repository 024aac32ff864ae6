"""A folder's files as compared: text normalised, a study database dumped through Optuna, PNGs by pixels,
safetensors by sorted header and tensor bytes, ONNX without its provenance, artifacts by content."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .normalise import UUID, Normaliser, png_digest, short

TEXT_SUFFIXES = {".json", ".csv", ".md", ".html", ".txt", ".toml"}
TEXT_NAMES = {"SHA256SUMS"}
ONNX_PROVENANCE = {"namespace", "pkg.torch.onnx.class_hierarchy", "pkg.torch.onnx.stack_trace"}
VOLATILE_TRIAL_ATTRS = {"memory_at_start"}  # the host's resident memory when the trial started: measured


def safetensors_digest(data: bytes) -> str | None:
    """A safetensors file by its header (keys sorted: the writer orders its metadata at random) and tensor bytes."""
    if len(data) < 10 or data[8:9] != b"{":
        return None
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + size])
    except (ValueError, UnicodeDecodeError):
        return None
    return f"header-{short(json.dumps(header, sort_keys=True).encode())}-data-{short(data[8 + size:])}"


_BINARY_CACHE: dict[tuple[int, int, int, int], tuple[str, str]] = {}


def binary_fingerprint(path: Path) -> tuple[str, str]:
    """(raw sha256, what is compared), cached per inode and mtime (hard-linked stores are read once)."""
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _BINARY_CACHE:
        data = path.read_bytes()
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            compared = f"png {png_digest(data)}"
        elif path.suffix == ".onnx":
            compared = f"onnx {onnx_digest(data)}"
        else:
            tensors = safetensors_digest(data)
            compared = f"safetensors {tensors}" if tensors else f"bytes {short(data)}"
        _BINARY_CACHE[key] = (hashlib.sha256(data).hexdigest(), compared)
    return _BINARY_CACHE[key]


def onnx_digest(data: bytes) -> str:
    """An ONNX model without its nodes' provenance: torch.onnx records, per node, the Python module path of each
    traced class and a stack trace of source files and line numbers, which move with a refactor. Ops,
    attributes, weights, names and the fx node text stay compared."""
    import onnx

    model = onnx.load_from_string(data)
    for node in [*model.graph.node, *(n for function in model.functions for n in function.node)]:
        kept = [prop for prop in node.metadata_props if prop.key not in ONNX_PROVENANCE]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return f"graph-{short(model.SerializeToString(deterministic=True))}"


def dump_studies(db: Path) -> str:
    """Every study in a SQLite file as JSON: attrs, and per trial its state, values, params, intermediate values
    and attrs. Left out: start/end times (trial durations show in the reports that print them)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    try:
        studies = [{
            "name": s.study_name, "directions": [d.name for d in s.directions],
            "user_attrs": storage.get_study_user_attrs(s._study_id),
            "system_attrs": storage.get_study_system_attrs(s._study_id),
            "trials": [_trial_record(t) for t in storage.get_all_trials(s._study_id, deepcopy=False)],
        } for s in storage.get_all_studies()]
    finally:
        storage.remove_session()
        storage.engine.dispose()
    return json.dumps(studies, indent=1, sort_keys=True, default=repr) + "\n"


def _trial_record(trial: Any) -> dict[str, Any]:
    return {"number": trial.number, "state": trial.state.name, "values": trial.values, "params": trial.params,
            "distributions": {k: repr(v) for k, v in trial.distributions.items()},
            "intermediate_values": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
            "user_attrs": drop_measured(trial.user_attrs), "system_attrs": trial.system_attrs}


def drop_measured(value: Any, parent: str = "") -> Any:
    """Trial attrs without what a run measures rather than computes: the host memory at the trial's start, and
    the seconds of each epoch in a fold's `history`."""
    if isinstance(value, dict):
        return {k: drop_measured(v, k) for k, v in value.items()
                if k not in VOLATILE_TRIAL_ATTRS and not (parent == "history" and k == "seconds")}
    if isinstance(value, list):
        return [drop_measured(v, parent) for v in value]
    return value


def fingerprint_tree(folder: Path, norm: Normaliser) -> dict[str, str]:
    """Every file under `folder`: relative path -> normalised text, or a line naming its content."""
    norm = Normaliser(norm.places)  # this folder's hashes and artifact ids only
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(("-journal", "-wal", "-shm")))
    texts: dict[str, str] = {}
    text_hashes: dict[str, str] = {}
    found: dict[str, str] = {}
    stores: dict[str, list[str]] = {}  # artifact store folder -> its files' contents (their ids are random)
    for path in paths:
        rel = path.relative_to(folder).as_posix()
        if path.suffix == ".db":
            texts[rel] = dump_studies(path)
        elif path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES:
            texts[rel] = path.read_text(encoding="utf-8", errors="replace")
            text_hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            raw, compared = binary_fingerprint(path)
            norm.hashes[raw] = f"<sha256 of {compared}>"
            if UUID.fullmatch(path.name):
                norm.artifacts[path.name] = f"<artifact {compared}>"
                stores.setdefault(f"{path.parent.relative_to(folder).as_posix()}/* (by content)", []).append(compared)
            else:
                found[rel] = compared
    for _ in range(3):  # a text naming another text's sha256 (SHA256SUMS names manifest.json) needs two passes
        for rel, raw in text_hashes.items():
            norm.hashes[raw] = f"<sha256 of text {short(norm.text(texts[rel]).encode())}>"
    files = {norm.text(rel): f"{line}\n" for rel, line in found.items()}
    files |= {rel: "".join(f"{c}\n" for c in sorted(contents)) for rel, contents in stores.items()}
    for rel, text in texts.items():
        files[norm.text(rel)] = readable(rel, norm.text(text))
    return files


def readable(rel: str, text: str) -> str:
    """Normalised text laid out for diffs: a study dump re-sorted once artifact ids became contents, a page one
    tag per line (it is written as one line); nothing is dropped."""
    if rel.endswith(".db"):
        return json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n"
    return re.sub(r">(?=<)", ">\n", text) if rel.endswith(".html") else text
