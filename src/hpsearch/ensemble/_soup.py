"""Greedy model soups (Wortsman et al., 2022): one model whose weights are the average of several trials'.

A soup is only meaningful when the trials fine-tuned the same architecture from the same starting weights:
then they tend to land in one basin of the loss, and the average of their weights is a model of its own that
can beat each of them at the cost of one. Trials of a study share its `[model] weights` and, unless `[space]
arch` drew theirs (mixed ones are refused), its architecture; a study with `weights = "none"` started every
trial from its own random initialisation, and is refused.

Greedy soup: take the candidates in rank order (best validation accuracy first); the soup starts as the best
trial; each next trial's weights are added to the uniform average when the averaged model's validation
accuracy does not drop (>=). Averaging weights changes the function, so every step re-runs the averaged model
on the study's validation split: the data is loaded from the config the study recorded, and its split must
still hash to the study's `split_sha256`. The final soup is kept only when validation says it beats the best
single trial, re-run the same way: higher validation accuracy, or the same accuracy and a lower validation NLL.
Its comparison row (test metrics, temperature fitted on the calibration split, or on validation where the study
has none) is computed like every other row.

Every floating tensor is averaged, BatchNorm running statistics included; integer buffers (BatchNorm's
`num_batches_tracked`) are the best trial's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hpsearch.archs import trial_arch
from hpsearch.config import StudyConfig
from hpsearch.data import DeviceData, ImagePool, RecordMismatch, Split, rebuild_study_data
from hpsearch.ensemble._candidates import Candidate
from hpsearch.ensemble._combine import Outputs, accuracy, member_log_probs, nll
from hpsearch.ensemble._rows import Row, soft_row
from hpsearch.errors import EnsembleError
from hpsearch.model import builder_kwargs
from hpsearch.predict import plain_model
from hpsearch.record import StudyRecord, read_study_record, read_trial_record
from hpsearch.search import study_preprocess
from hpsearch.store import TrialOutputs, load_weights
from hpsearch.train import predict_logits

if TYPE_CHECKING:
    import optuna

    from hpsearch.store import ArtifactStore

State = dict[str, torch.Tensor]
# A state dict's architecture, as far as a soup cares: every tensor's name, shape and dtype.
Signature = dict[str, tuple[tuple[int, ...], torch.dtype]]


class SoupError(EnsembleError):
    """A soup that cannot be made (members from different starting weights or architectures, data gone)."""


@dataclass(frozen=True)
class SoupStep:
    """One greedy-soup step: the soup's validation numbers with `trial` added (in-process re-run)."""

    trial: int
    val_accuracy: float
    val_nll: float
    added: bool


@dataclass(frozen=True)
class SoupInfo:
    """The greedy soup tried by `--method soup`: what went in and whether it was kept."""

    ingredients: tuple[int, ...]  # trials whose weights were averaged, rank order
    steps: tuple[SoupStep, ...]  # the first is the best trial alone: the baseline the soup must beat
    kept: bool
    reason: str  # one line: why it was kept or not


@dataclass(frozen=True)
class Soup:
    info: SoupInfo
    state_dict: State  # the averaged weights of info.ingredients, plain torchvision keys
    row: Row  # the "greedy soup" comparison row
    arch: str


# ------------------------------------------------------------------------------------------- checks


def soup_config(study: optuna.Study) -> StudyConfig:
    """The study's recorded config, when its trials can be souped; a one-line SoupError otherwise."""
    recorded = read_study_record(study).config
    if not recorded:
        raise SoupError(f"--method soup: study {study.study_name!r} records no config (not created by hpsearch); "
                        "cannot tell which weights its trials started from")
    cfg = StudyConfig.recorded(recorded, read_study_record(study).split_sizes)
    if not cfg.model.pretrained:
        raise SoupError(f"--method soup: study {study.study_name!r} trained from random initialisations "
                        "(model.weights = none), so its trials did not start from the same weights and averaging "
                        "them is meaningless; use --method weighted, soft or hard")
    return cfg


def check_one_arch(archs: Mapping[int, str]) -> str:
    """The one architecture of the trials (`[space] arch` draws one per trial); mixed ones are refused."""
    (first, arch), *rest = archs.items()
    other = next(((t, a) for t, a in rest if a != arch), None)
    if other is not None:
        raise SoupError(f"--method soup: trial {first} trained {arch} but trial {other[0]} {other[1]} ([space] arch); "
                        "a soup averages the weights of one architecture; use --method weighted, soft or hard, or "
                        "--top-k over trials of one architecture")
    return arch


def check_same_start(starts: Mapping[int, str | None]) -> None:
    """Refuse trials that recorded different starting weights (user attr `init_weights`; older trials lack it
    and are taken to have started from the study's recorded `[model] weights`)."""
    known = {trial: tag for trial, tag in starts.items() if tag}
    if "none" in known.values():
        trial = next(t for t, tag in known.items() if tag == "none")
        raise SoupError(f"--method soup: trial {trial} started from a random initialisation (model.weights = none), "
                        "so the trials did not start from the same weights and averaging them is meaningless; use "
                        "--method weighted, soft or hard")
    items = list(known.items())
    other = next(((t, tag) for t, tag in items if tag != items[0][1]), None)
    if other is not None:
        raise SoupError(f"--method soup: trial {items[0][0]} started from {items[0][1]} but trial {other[0]} from "
                        f"{other[1]}; a soup averages trials fine-tuned from the same weights")


def signature(state: Mapping[str, torch.Tensor]) -> Signature:
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def check_same_architecture(signatures: Sequence[tuple[int, Signature]]) -> None:
    """Refuse members whose state dicts differ in names, shapes or dtypes (different architectures)."""
    first_trial, first = signatures[0]
    for trial, sig in signatures[1:]:
        if sig == first:
            continue
        names = sorted(set(sig) ^ set(first))
        if names:
            what = f"tensor {names[0]} is in only one of them"
        else:
            k = next(k for k in first if sig[k] != first[k])
            what = f"{k} is {list(sig[k][0])} {sig[k][1]} vs {list(first[k][0])} {first[k][1]}"
        raise SoupError(f"--method soup: trial {trial}'s weights are another architecture than trial "
                        f"{first_trial}'s ({what}); a soup averages the same parameters of one architecture")


# --------------------------------------------------------------------------------------------- math


def average_states(states: Sequence[Mapping[str, torch.Tensor]]) -> State:
    """The uniform average of floating tensors (in float64, cast back); integer tensors are the first's."""
    first = states[0]
    out: State = {}
    for k, v in first.items():
        if v.is_floating_point():
            total = torch.zeros(v.shape, dtype=torch.float64)
            for s in states:
                total += s[k].double()
            out[k] = (total / len(states)).to(v.dtype).contiguous()
        else:
            out[k] = v.clone().contiguous()
    return out


def greedy_soup(trials: Sequence[int], load: Callable[[int], State],
                evaluate: Callable[[State], tuple[float, float]]) -> tuple[list[int], State, list[SoupStep]]:
    """Wortsman et al. (2022), greedy soup. `trials` in rank order (best first); `evaluate(state)` gives the
    (validation accuracy, validation NLL) of a model with those weights. A trial joins when the averaged
    model's validation accuracy does not drop. Returns (ingredients, averaged weights, one step per trial)."""
    first = load(trials[0])
    acc, loss = evaluate(first)
    steps = [SoupStep(trials[0], acc, loss, True)]
    ingredients, states, soup = [trials[0]], [first], first
    for trial in trials[1:]:
        state = load(trial)
        candidate = average_states([*states, state])
        cand_acc, cand_loss = evaluate(candidate)
        added = cand_acc >= acc
        steps.append(SoupStep(trial, cand_acc, cand_loss, added))
        if added:
            ingredients.append(trial)
            states.append(state)
            soup, acc, loss = candidate, cand_acc, cand_loss
    return ingredients, soup, steps


def soup_decision(ingredients: Sequence[int], steps: Sequence[SoupStep]) -> tuple[bool, str]:
    """Keep the soup only when validation says it beats the best single trial (steps[0])."""
    base = steps[0]
    last = next(s for s in reversed(steps) if s.added)
    if len(ingredients) == 1:
        return False, (f"no other trial could join trial {base.trial} without lowering validation accuracy; the "
                       "soup is that single trial")
    vs = (f"validation accuracy {last.val_accuracy:.4f} and NLL {last.val_nll:.4f} vs the best single trial "
          f"#{base.trial}'s {base.val_accuracy:.4f} and {base.val_nll:.4f}")
    if last.val_accuracy > base.val_accuracy or (last.val_accuracy == base.val_accuracy
                                                  and last.val_nll < base.val_nll):
        return True, f"the soup of {len(ingredients)} trials beats the best single trial on validation ({vs})"
    return False, f"the soup of {len(ingredients)} trials does not beat the best single trial on validation ({vs})"


# ------------------------------------------------------------------------------------------ the study


def _labels(pool: ImagePool, part: np.ndarray) -> np.ndarray:
    return pool.labels[torch.from_numpy(part)].numpy().astype(np.int64)


def _rebuilt(record: StudyRecord, cfg: StudyConfig, first: TrialOutputs) -> tuple[ImagePool, Split]:
    """The study's pool and split as the data here gives them, checked against its record and the labels its
    trials stored: averaged weights are re-run on the very images the trials were validated on."""
    try:
        data = rebuild_study_data(record, cfg.data, cfg.study.seed)
    except RecordMismatch as err:
        why = "sha256 differs" if err.part == "split" else f"its {err.part} differ"
        raise SoupError(f"--method soup: the data study {record.study_name!r} recorded ({cfg.data.dataset} under "
                        f"{cfg.data.root!r}) no longer gives its split ({why}); the soup must be "
                        "validated on the study's own validation split") from None
    val_labels = data.pool.labels[torch.from_numpy(data.split.val)]
    test_labels = data.pool.labels[torch.from_numpy(data.split.test)]
    if not (val_labels.equal(first.val_labels) and test_labels.equal(first.test_labels)):
        raise SoupError(f"--method soup: the labels of study {record.study_name!r}'s split differ from the ones "
                        "its trials stored; the data changed")
    return data.pool, data.split


def make_soup(study: optuna.Study, store: ArtifactStore, candidates: Sequence[Candidate],
              device: torch.device, on_start: Callable[[str], None] | None = None) -> Soup:
    """The greedy soup of `candidates` (rank order), re-run on the study's own validation and test splits.

    The refusals (random inits, different starting weights or architectures) come first; then `on_start`
    hears one line before the data is loaded and the averaged models run."""
    cfg = soup_config(study)
    by_trial = {c.trial: c for c in candidates}
    frozen = {t.number: t for t in study.get_trials(deepcopy=False)}
    arch = check_one_arch({c.trial: trial_arch(cfg.model.arch, c.params) for c in candidates})
    check_same_start({c.trial: read_trial_record(frozen[c.trial]).init_weights if c.trial in frozen else None
                      for c in candidates})
    check_same_architecture([(c.trial, signature(load_weights(store, c.weights_artifact))) for c in candidates])
    if on_start is not None:
        on_start(f"greedy soup of {len(candidates)} trials: re-running averaged weights on {cfg.data.dataset}'s "
                 f"validation split ({device})")
    record = read_study_record(study)
    pool, split = _rebuilt(record, cfg, candidates[0].outputs)
    pre = study_preprocess(study)
    val, test = DeviceData(pool, split.val, device), DeviceData(pool, split.test, device)
    y_val, y_test = _labels(pool, split.val), _labels(pool, split.test)
    # The row's T and evidence come from the same outputs as every other row's: calibration where there is one.
    fit, y_fit = (DeviceData(pool, split.calibration, device), _labels(pool, split.calibration)) if len(
        split.calibration) else (val, y_val)
    n_classes = len(record.classes or ()) or pool.num_classes
    model = plain_model(arch, n_classes, builder_kwargs(arch, pre.image_size)).to(device).eval()

    def log_probs(state: State, data: DeviceData) -> np.ndarray:
        model.load_state_dict(state, strict=True)
        logits = predict_logits(model, data, pre, cfg.train.eval_batch_size)
        return member_log_probs([logits.double().cpu().numpy()])[0]

    def evaluate(state: State) -> tuple[float, float]:
        lp = log_probs(state, val)
        return accuracy(lp.argmax(axis=1), y_val), nll(lp, y_val)

    ingredients, state, steps = greedy_soup([c.trial for c in candidates],
                                            lambda t: load_weights(store, by_trial[t].weights_artifact), evaluate)
    kept, reason = soup_decision(ingredients, steps)
    data = Outputs(fit=log_probs(state, fit)[None], test=log_probs(state, test)[None], y_fit=y_fit, y_test=y_test)
    name = "greedy soup (" + "+".join(f"#{t}" for t in ingredients) + ")"
    row = soft_row("soup", name, data, np.ones(1), ingredients[:1])
    row = dataclasses.replace(row, trials=tuple(ingredients), weights=(1.0 / len(ingredients),) * len(ingredients))
    return Soup(SoupInfo(tuple(ingredients), tuple(steps), kept, reason), state, row, arch)
