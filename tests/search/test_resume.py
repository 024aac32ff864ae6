"""What opening an existing study changes in it (a password an older study recorded is scrubbed), and what it
refuses with the way out (a study made before splits had a calibration part)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from hpsearch import keys
from hpsearch.config import ConfigError, read_study_file
from hpsearch.search._study import open_study, prepare
from hpsearch.store import open_storage
from tests.support import tiny_tables, write_study


def test_a_password_an_older_study_recorded_is_scrubbed_when_a_run_opens_it(
        study_file: Callable[..., Path], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = read_study_file(study_file("tiny"))
    prepared = prepare(cfg)
    study = open_study(cfg, open_storage(url), prepared, tmp_path / "artifacts")
    # As a study created before study files were refused a password recorded it (the dashboard shows it).
    recorded = study.user_attrs[keys.CONFIG]
    leaked = "postgresql+psycopg://hp:s3cr@t@db.example:5432/hp"
    study.set_user_attr(keys.CONFIG, {**recorded, "study": {**recorded["study"], "storage": leaked}})

    open_study(cfg, open_storage(url), prepared, tmp_path / "artifacts")

    attrs = optuna.load_study(study_name=cfg.study.name, storage=open_storage(url)).user_attrs
    assert "s3cr" not in str(attrs)
    assert attrs[keys.CONFIG]["study"]["storage"] == "postgresql+psycopg://hp:***@db.example:5432/hp"
    assert {k: v for k, v in attrs[keys.CONFIG].items() if k != "study"} == \
        {k: v for k, v in recorded.items() if k != "study"}


def test_resuming_a_study_made_without_a_calibration_part_says_how(tmp_path: Path) -> None:
    """A study created with no calibration part (as every study was before there was one) and a file that now
    gets the default one: the split differs, and the refusal names the setting that resumes it."""
    old = write_study(tmp_path / "old.toml", tiny_tables("old", data={"calibration_fraction": 0}))
    new = write_study(tmp_path / "new.toml", tiny_tables("old"))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = read_study_file(old)
    open_study(cfg, open_storage(url), prepare(cfg), tmp_path / "artifacts")
    resumed = read_study_file(new)
    with pytest.raises(ConfigError) as caught:
        open_study(resumed, open_storage(url), prepare(resumed), tmp_path / "artifacts")
    assert "set [data] calibration_fraction = 0" in str(caught.value)
    assert "made without a calibration part" in str(caught.value)
