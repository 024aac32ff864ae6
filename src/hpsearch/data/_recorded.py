"""A study's data rebuilt on this machine from its config, and checked against what the study recorded.

Everything that re-runs a model on a study's own images after the search (a greedy soup, a report's
confident mistakes, the normalization of a study that predates its recording) needs the very split the
trials' outputs line up with. The split and folds are fixed by the data and the seed, so they are rebuilt,
not stored; their sha256 in the record says whether the data here still gives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hpsearch.data._datasets import ImagePool, load_pool
from hpsearch.data._folds import Folds, make_folds
from hpsearch.data._settings import DataSettings
from hpsearch.data._split import Split, make_split
from hpsearch.errors import StudyRecordError
from hpsearch.record import StudyRecord

RecordedPart = Literal["split", "folds", "classes"]


@dataclass(frozen=True)
class StudyData:
    """The pool a study file names, its seeded split, and its folds ([data] folds; None without)."""

    pool: ImagePool
    split: Split
    folds: Folds | None


class RecordMismatch(StudyRecordError):
    """The data here does not give what the study recorded; `part` names which."""

    def __init__(self, study_name: str, part: RecordedPart) -> None:
        super().__init__(f"the data here no longer gives study {study_name!r}'s recorded {part}")
        self.part: RecordedPart = part


def build_study_data(cfg: DataSettings, seed: int) -> StudyData:
    """Load the pool and cut the split (and folds) the way every trial of a study with this data and seed sees it."""
    pool = load_pool(cfg, seed)
    split = make_split(pool, cfg, seed)
    folds = make_folds(pool.labels.numpy(), split, cfg.folds, seed) if cfg.folds else None
    return StudyData(pool, split, folds)


def recorded_mismatch(record: StudyRecord, data: StudyData) -> RecordedPart | None:
    """Which recorded part `data` does not give, or None. The split's sha256 covers its sizes; folds and
    classes are checked where recorded (a single-split study records no folds, an old one maybe no classes)."""
    if data.split.sha256() != record.split_sha256:
        return "split"
    if record.folds_sha256 is not None and (data.folds is None or data.folds.sha256() != record.folds_sha256):
        return "folds"
    if record.classes is not None and tuple(data.pool.classes) != record.classes:
        return "classes"
    return None


def rebuild_study_data(record: StudyRecord, cfg: DataSettings, seed: int) -> StudyData:
    """The study's data as it is on this machine (`cfg`, `seed`: its recorded config's); RecordMismatch where it
    no longer gives the recorded split, folds or classes. Loading errors (DataError, OSError) pass through."""
    data = build_study_data(cfg, seed)
    part = recorded_mismatch(record, data)
    if part is not None:
        raise RecordMismatch(record.study_name, part)
    return data
