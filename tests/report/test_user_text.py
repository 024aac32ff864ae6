"""Names users choose (classes, choices) in the report's figures and CSVs: drawn literally (no mathtext), and never
a spreadsheet formula in a CSV cell."""

from __future__ import annotations

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import create_trial

from hpsearch.report import _plots as plots
from hpsearch.report._study import CONFUSION_FILE, csv_bytes, draw, figure_builders, per_class_table, trials_table
from tests.support import MATH_CLASS, csv_rows, drawn_texts, synthetic_study

# ------------------------------------------------------------------------------- user-named text, drawn literally

def test_a_class_named_like_mathtext_is_drawn_literally():
    classes = [MATH_CLASS, "a$b", "plain"]
    matrix = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 5]])
    study = synthetic_study(12)
    frame = trials_table(study)
    drawn, notes = draw(figure_builders(study, frame, matrix, classes, 0))  # a crash is not a note: it raises
    assert CONFUSION_FILE in {d.name for d in drawn}, notes
    texts = drawn_texts(plots.confusion_matrix(matrix, classes, "trial 0"))
    assert {MATH_CLASS, "a$b"} <= texts
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 3, 8, 8), dtype=np.uint8)
    mistakes = plots.confident_mistakes(images, np.array([0, 1, 0, 2]), np.array([1, 0, 0, 0]),
                                        np.array([0.9, 0.8, 0.7, 0.6]), classes, n=4)
    assert f"true {MATH_CLASS} / pred a$b (p=0.90)" in drawn_texts(mistakes)
    assert "Ensemble members' weights ($x$)" in drawn_texts(plots.member_weights([1, 2], [0.5, 0.5], "$x$"))


# ----------------------------------------------------------------------------- user-named text in the CSVs


def test_per_class_csv_writes_formula_class_names_with_a_leading_quote():
    classes = ["=cmd|x", "@SUM(1)", "-2+3", "plain"]
    matrix = np.array([[1, 3, 0, 0], [2, 1, 0, 0], [0, 0, 4, 1], [0, 0, 0, 5]])
    rows = csv_rows(csv_bytes(per_class_table(matrix, classes)))
    assert [r["class"] for r in rows] == ["'=cmd|x", "'@SUM(1)", "'-2+3", "plain"]
    assert [r["most_confused_with"] for r in rows] == ["'@SUM(1)", "'=cmd|x", "plain", ""]
    assert [r["accuracy"] for r in rows] == ["0.25", "0.3333333333333333", "0.8", "1.0"]


def test_trials_csv_quotes_formula_text_and_leaves_negative_numbers():
    space = {"choice": CategoricalDistribution(["=cmd|x", "@SUM(1)"]), "shift": FloatDistribution(-1.0, 1.0)}
    study = optuna.create_study(direction="maximize")
    study.add_trials([create_trial(value=0.5, params={"choice": "=cmd|x", "shift": -0.5}, distributions=space),
                      create_trial(value=-0.25, params={"choice": "@SUM(1)", "shift": 0.25}, distributions=space)])
    rows = csv_rows(csv_bytes(trials_table(study)))
    assert [r["choice"] for r in rows] == ["'=cmd|x", "'@SUM(1)"]
    assert [r["shift"] for r in rows] == ["-0.5", "0.25"]
    assert [r["value"] for r in rows] == ["0.5", "-0.25"]
