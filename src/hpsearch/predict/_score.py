"""Predictions and uncertainty sampling with an exported ensemble: `hpsearch predict` and `hpsearch select`.

Image files are decoded as the manifest's preprocessing says (hpsearch.preprocess), run through the loaded
ensemble (hpsearch.loading), optionally over test-time augmentation views (hpsearch.tta), and written as CSV.
A class or file name that a spreadsheet would run as a formula is written with a leading `'` (`csv_text`).
An unreadable or missing input (a decompression bomb, a link out of a folder given) is named to `warn` and
skipped; the rest are still written.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Literal

import torch

from hpsearch.errors import DataError
from hpsearch.predict._load import Ensemble, load_ensemble
from hpsearch.predict._tta import manifest_augment, tta_member_probs
from hpsearch.preprocess import decode_image, image_files

Uncertainty = Literal["entropy", "margin", "disagreement"]
BY: tuple[Uncertainty, ...] = ("entropy", "margin", "disagreement")
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection; OWASP's advice: a leading ').
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str) -> str:
    """A CSV cell of text from a user-named thing (a class name, a file path): prefixed with `'` where a
    spreadsheet would read it as a formula; a number written as text ("-0.5") stays a number."""
    if not value.startswith(FORMULA_START):
        return value
    if value[0] in "+-":
        try:
            float(value)
            return value
        except ValueError:
            pass
    return "'" + value


def open_for_scoring(folder: str | Path, inputs: Iterable[str | Path], device: torch.device, tta: bool = False
                     ) -> tuple[Ensemble, list[Path], list[str]]:
    """(ensemble, image paths, warnings so far): the verified ensemble on `device` (with `tta`, checked to
    record its study's augmentations) and the inputs' image files; a bad folder is an ExportError."""
    ensemble = load_ensemble(folder, device)
    if tta:
        manifest_augment(ensemble.manifest)
    warnings: list[str] = []
    return ensemble, find_images(inputs, warnings.append), warnings



def find_images(inputs: Iterable[str | Path], warn: Callable[[str], None]) -> list[Path]:
    """Files as given (any suffix), folders recursively (image suffixes only), in order; missing ones warned, and
    so are links in a folder that lead out of it (not followed: hpsearch.preprocess.image_files)."""
    found: list[Path] = []

    def refuse(link: Path, target: Path) -> None:
        warn(f"{link}: a link out of {item} (to {target}), not followed; copy what it points to into the folder "
             "or name it as an input")

    for item in map(Path, inputs):
        if item.is_dir():
            found += image_files(item, refuse)
        elif item.is_file():
            found.append(item)
        else:
            warn(f"{item}: no such file or folder")
    return found


def decode_batches(paths: Sequence[Path], size: int, batch_size: int, warn: Callable[[str], None]
                   ) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """uint8 [B, 3, size, size] batches of the readable images; an unreadable one is warned about and skipped."""
    batch: list[Path] = []
    images: list[torch.Tensor] = []
    for path in paths:
        try:
            images.append(decode_image(path, size))
        except DataError as err:
            warn(str(err))
            continue
        batch.append(path)
        if len(batch) == batch_size:
            yield batch, torch.stack(images)
            batch, images = [], []
    if batch:
        yield batch, torch.stack(images)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Natural-log entropy of each row of [..., C] probabilities (0 log 0 = 0)."""
    p = probs.double()
    return -(p * p.clamp_min(1e-300).log()).sum(dim=-1)


def uncertainty(ensemble: Ensemble, member_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """entropy of the ensemble output; margin between its top two; disagreement = mutual information
    = entropy of the weighted mean of the members' softmaxes - weighted mean of their entropies (no T)."""
    probs = ensemble.combine(member_probs)
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    margin = top2[:, 0] - (top2[:, 1] if top2.shape[-1] > 1 else 0.0)
    w = ensemble.weights.to(member_probs.device)
    mean = (member_probs * w[:, None, None]).sum(dim=0)
    disagreement = (entropy(mean) - (entropy(member_probs) * w[:, None]).sum(dim=0)).clamp_min(0.0)
    return {"probs": probs, "entropy": entropy(probs), "margin": margin, "disagreement": disagreement}


def score_images(ensemble: Ensemble, paths: Sequence[Path], batch_size: int, device: torch.device,
                 warn: Callable[[str], None], tta: bool = False) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """Per readable image: its probabilities and uncertainties, decoded and preprocessed as the manifest says;
    with `tta`, each member's softmax averaged over the views of the study's own augmentations (hpsearch.tta)."""
    pre = ensemble.preprocess
    augment = manifest_augment(ensemble.manifest) if tta else ()
    with torch.inference_mode():
        for batch, images in decode_batches(paths, pre.image_size, batch_size, warn):
            x = pre(images.to(device))
            member = tta_member_probs(ensemble.member_probs, x, augment) if tta else ensemble.member_probs(x)
            stats = uncertainty(ensemble, member)
            cpu = {k: v.cpu() for k, v in stats.items()}
            for i, path in enumerate(batch):
                yield path, {k: v[i] for k, v in cpu.items()}


def _row(path: Path, stats: Mapping[str, torch.Tensor], classes: Sequence[str]) -> list[str]:
    probs = stats["probs"]
    k = int(probs.argmax())
    return [csv_text(str(path)), csv_text(classes[k]), f"{float(probs[k]):.6f}", f"{float(stats['entropy']):.6f}",
            *(f"{float(p):.6f}" for p in probs)]


def predict_csv(ensemble: Ensemble, paths: Sequence[Path], sink: IO[str], batch_size: int, device: torch.device,
                warn: Callable[[str], None], tta: bool = False) -> int:
    """Write path, predicted, probability, entropy, p_<class>... per readable image; return the rows written."""
    writer = csv.writer(sink, lineterminator="\n")
    writer.writerow(["path", "predicted", "probability", "entropy", *(f"p_{c}" for c in ensemble.classes)])
    n = 0
    for path, stats in score_images(ensemble, paths, batch_size, device, warn, tta):
        writer.writerow(_row(path, stats, ensemble.classes))
        n += 1
    return n


def select_csv(ensemble: Ensemble, paths: Sequence[Path], sink: IO[str], n: int, by: Uncertainty,
               batch_size: int, device: torch.device, warn: Callable[[str], None], tta: bool = False) -> int:
    """Rank by uncertainty (high entropy / disagreement, low margin first; ties keep input order), write top n."""
    scored = list(score_images(ensemble, paths, batch_size, device, warn, tta))
    sign = 1.0 if by == "margin" else -1.0
    ranked = sorted(scored, key=lambda item: sign * float(item[1][by]))[:n]
    writer = csv.writer(sink, lineterminator="\n")
    writer.writerow(["rank", "path", "predicted", "probability", "entropy", "margin", "disagreement"])
    for rank, (path, s) in enumerate(ranked, 1):
        k = int(s["probs"].argmax())
        writer.writerow([rank, csv_text(str(path)), csv_text(ensemble.classes[k]), _f(s["probs"][k]), _f(s["entropy"]),
                         _f(s["margin"]), _f(s["disagreement"])])
    return len(ranked)


def _f(value: torch.Tensor) -> str:
    x = float(value)
    return f"{x:.6f}" if math.isfinite(x) else str(x)

