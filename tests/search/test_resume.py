"""What opening an existing study changes in it: a password an older study recorded is scrubbed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna

from hpsearch import keys
from hpsearch.config import read_study_file
from hpsearch.search._study import open_study, prepare
from hpsearch.store import open_storage


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
