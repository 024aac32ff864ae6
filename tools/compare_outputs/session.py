"""The CLI session both sides run: three tiny digits studies, the soup study's starting weights, an image pool,
and the steps (each a CLI command) on them."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

STUDY = """[study]
name = "{name}"
n_trials = {n_trials}
sampler = "tpe"
pruner = "{pruner}"
pruner_startup_trials = 1
pruner_warmup_epochs = 0
seed = 0

[data]
dataset = "digits"
image_size = 32
augment = ["crop"]
subset = {subset}
folds = {folds}

[model]
arch = "resnet18"
weights = "{weights}"
freeze = "{freeze}"

[train]
epochs = {epochs}
batch_size = 64
checkpoint_every = 0

[space]
lr = [1e-4, 1e-2]
optimizer = ["adam", "rmsprop"]
scheduler = ["step", "exponential", "plateau"]
dropout = [0.0, 0.5]

[space.step]
step_size = [1, 2]

[ensemble]
top_k = 3
"""


SINGLE = {"subset": 0, "folds": 0, "weights": "none", "freeze": "none"}
STUDIES = {  # the brief's study; its cross-validated twin; one whose trials share their start, so soups are made
    "tiny.toml": STUDY.format(name="tiny", n_trials=4, pruner="median", epochs=2, **SINGLE),
    "tiny-cv.toml": STUDY.format(name="tiny-cv", n_trials=2, pruner="wilcoxon", epochs=1,
                                 **(SINGLE | {"subset": 600, "folds": 3})),
    "tiny-soup.toml": STUDY.format(name="tiny-soup", n_trials=3, pruner="none", epochs=1,
                                   **(SINGLE | {"subset": 600, "weights": "init.safetensors", "freeze": "backbone"})),
}
INIT_WEIGHTS = "init.safetensors"  # a seeded random ResNet-18: every trial of tiny-soup starts from it
POOL = "pool"  # digit PNGs for predict and select, and one unreadable file
POOL_IMAGES = 12


@dataclass(frozen=True)
class Step:
    """One CLI command run by both sides in `WORKDIR/<side>/<name>`; `{dir}` in args is that folder (relative)."""

    name: str
    args: tuple[str, ...]
    study_from: str | None = None  # copy this step's study.db and artifacts (from the old side) into {dir}
    inputs: tuple[tuple[str, str], ...] = ()  # (old side's path, path in {dir}) copied in first
    fresh_run: bool = False  # Part A: trial durations and host memory are measured, not computed


def _db(folder: str = "{dir}") -> tuple[str, ...]:
    return ("--storage", f"sqlite:///{folder}/study.db")


def _store() -> tuple[str, ...]:
    return (*_db(), "--artifacts", "{dir}/artifacts")


def single_split_steps() -> list[Step]:
    study, fresh = "tiny.toml", "A-run"
    export = (("B-ensemble-weighted/out", "export"),)
    return [
        Step(fresh, ("run", study, *_store()), fresh_run=True),
        Step("B-status", ("status", study, *_store()), study_from=fresh),
        Step("B-check", ("check", study, *_db()), study_from=fresh),
        Step("B-run-finished", ("run", study, *_store()), study_from=fresh),
        *(Step(f"B-ensemble-{m}", ("ensemble", study, *_store(), "--method", m, "--out", "{dir}/out"), study_from=fresh)
          for m in ("weighted", "soft", "hard", "soup")),
        Step("B-ensemble-onnx", ("ensemble", study, *_store(), "--onnx", "--out", "{dir}/out"), study_from=fresh),
        Step("B-predict", ("predict", "{dir}/export", POOL), inputs=export),
        Step("B-select", ("select", "{dir}/export", POOL, "--n", "3", "--out", "{dir}/selected.csv"), inputs=export),
        Step("B-report", ("report", study, *_store(), "--out", "{dir}/out"), study_from=fresh),
        Step("B-report-ensemble", ("report", study, *_store(), "--out", "{dir}/out", "--ensemble", "{dir}/export"),
             inputs=export, study_from=fresh),
    ]


def cross_validated_steps() -> list[Step]:
    study, fresh = "tiny-cv.toml", "CV-A-run"
    export = (("CV-B-ensemble-weighted/out", "export"),)
    return [
        Step(fresh, ("run", study, *_store()), fresh_run=True),
        Step("CV-B-status", ("status", study, *_store()), study_from=fresh),
        Step("CV-B-ensemble-weighted", ("ensemble", study, *_store(), "--out", "{dir}/out"), study_from=fresh),
        Step("CV-B-ensemble-soup", ("ensemble", study, *_store(), "--method", "soup", "--out", "{dir}/out"),
             study_from=fresh),
        Step("CV-B-predict", ("predict", "{dir}/export", POOL), inputs=export),
        Step("CV-B-report-ensemble", ("report", study, *_store(), "--out", "{dir}/out", "--ensemble",
                                      "{dir}/export"), inputs=export, study_from=fresh),
    ]


def soup_steps() -> list[Step]:
    study, fresh = "tiny-soup.toml", "S-A-run"
    return [
        Step(fresh, ("run", study, *_store()), fresh_run=True),
        Step("S-B-ensemble-soup", ("ensemble", study, *_store(), "--method", "soup", "--out", "{dir}/out"),
             study_from=fresh),
    ]


def input_files() -> dict[str, bytes]:
    """The study files, the soup study's starting weights and the image pool: written once, copied to each side."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image
    from safetensors.torch import save
    from sklearn.datasets import load_digits

    files = {name: text.encode("utf-8") for name, text in STUDIES.items()}
    torch.manual_seed(0)
    files[INIT_WEIGHTS] = save(torchvision.models.resnet18(num_classes=10).state_dict())
    digits = load_digits()
    for i in range(POOL_IMAGES):  # the dataset's last images, 8x8 of 0-16, as 32x32 grey PNGs
        index = len(digits.images) - 1 - i
        pixels = (digits.images[index] * 255 / 16).round().astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((32, 32), Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files[f"{POOL}/digit-{i:02d}-label-{digits.target[index]}.png"] = buffer.getvalue()
    files[f"{POOL}/unreadable.png"] = b"this is no PNG\n"  # predict and select name it, skip it, exit 7
    return files


def write_inputs(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
