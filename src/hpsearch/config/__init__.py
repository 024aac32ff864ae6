"""The study file: its typed schema and its validation.

A study file is TOML with the tables `[study]`, `[data]`, `[model]`, `[train]`, `[space]`, `[ensemble]` and
`[tracking]`. `read_study_file(path)` returns a `StudyConfig` or raises `ConfigError`, whose message is one
line that names the offending field and says what is allowed. Imports no torch: checks that need the model
itself (can this architecture take this image size?) live in `hpsearch.model`.
"""

from __future__ import annotations

from hpsearch.config._read import ConfigError, parse_study, read_study_file, resolve_path
from hpsearch.config._sections import (
    FAMILIES,
    DataSection,
    EnsembleSection,
    ModelSection,
    StudySection,
    TrackingSection,
    TrainSection,
    family_of,
    looks_like_path,
)
from hpsearch.config._space import ExponentialSpace, PlateauSpace, SpaceSection, StepSpace
from hpsearch.config._study import StudyConfig

__all__ = [
    "FAMILIES",
    "ConfigError",
    "DataSection",
    "EnsembleSection",
    "ExponentialSpace",
    "ModelSection",
    "PlateauSpace",
    "SpaceSection",
    "StepSpace",
    "StudyConfig",
    "StudySection",
    "TrackingSection",
    "TrainSection",
    "family_of",
    "looks_like_path",
    "parse_study",
    "read_study_file",
    "resolve_path",
]
