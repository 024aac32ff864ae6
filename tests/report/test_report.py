"""`hpsearch report`: what a user shows a colleague, checked against what the storage holds.

One tiny real study (4 trials, median pruner) is trained once for the module; every figure's points are
counted against the trials read back from storage with a fresh `optuna.load_study`, never against the frame
the figure was drawn from. The plots on studies built in memory, without training, are in
tests/report/test_plots.py.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image
from scipy.special import softmax

from hpsearch import keys
from hpsearch.cli._main import main
from hpsearch.config import read_study_file
from hpsearch.ensemble import ECE_BINS
from hpsearch.record import read_study_record
from hpsearch.report import _plots as plots
from hpsearch.report._ensemble import RELIABILITY_FILE, WEIGHTS_FILE, ensemble_builders, read_ensemble
from hpsearch.report._study import (
    MISTAKES_FILE,
    PER_CLASS_FILE,
    REPORT_FILE,
    TRIALS_FILE,
    confident_mistakes,
    confusion,
    figure_builders,
    trials_table,
    validation_images,
)
from hpsearch.search._study import open_study, prepare
from hpsearch.store import load_trial_outputs, open_artifact_store, open_storage, ranked_trials
from tests.support import MATH_CLASS, csv_rows, scatter_points, tiny_tables, write_study

NAME = "reporttiny"


@dataclass(frozen=True)
class Trained:
    study_file: Path
    url: str
    store: Path
    out: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """4 trials of 2 epochs; the median pruner may prune from the third on (the first two always finish)."""
    root = tmp_path_factory.mktemp("report")
    study_file = write_study(root / f"{NAME}.toml", tiny_tables(
        NAME, study={"n_trials": 4, "pruner": "median", "pruner_startup_trials": 2, "pruner_warmup_epochs": 0},
        train={"epochs": 2}))
    url, store, out = f"sqlite:///{root / 's.db'}", root / "store", root / "report"
    assert main(["run", str(study_file), "--storage", url, "--artifacts", str(store)]) == 0
    assert main(["report", str(study_file), "--storage", url, "--artifacts", str(store), "--out", str(out)]) == 0
    return Trained(study_file, url, store, out)


def fresh_study(trained: Trained) -> optuna.Study:
    return optuna.load_study(study_name=NAME, storage=open_storage(trained.url))


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


# ------------------------------------------------------------------------------------------- the folder


@pytest.mark.slow
@pytest.mark.inprocess
def test_every_file_is_written_and_every_png_opens(trained):
    for name in (TRIALS_FILE, PER_CLASS_FILE, REPORT_FILE):
        assert (trained.out / name).is_file(), name
    images = pngs(trained.out)
    assert len(images) >= 6, [p.name for p in images]
    assert "confusion_matrix.png" in {p.name for p in images}
    for path in images:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert 300 <= image.width <= 4000 and 200 <= image.height <= 4000, (path.name, image.size)
    assert not [p for p in trained.out.iterdir() if "test" in p.name]  # no test-split figure


@pytest.mark.slow
@pytest.mark.inprocess
def test_each_figure_is_drawn_or_named_as_skipped(trained):
    page = (trained.out / REPORT_FILE).read_text(encoding="utf-8")
    written = {p.name for p in pngs(trained.out)}
    study = fresh_study(trained)
    for name, _, _ in figure_builders(study, trials_table(study), np.zeros((1, 1)), ["x"], 0):
        assert name in written or f"{name.removesuffix('.png')}: skipped," in page, name


@pytest.mark.slow
@pytest.mark.inprocess
def test_html_is_one_self_contained_page(trained):
    page = (trained.out / REPORT_FILE).read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(pngs(trained.out))
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(script|link|iframe)\b", page)
    study = fresh_study(trained)
    best = ranked_trials(study)[0]
    assert f"trial {best.number}: val_accuracy {best.value:.4f}" in page
    for state, n in ((s, len(study.get_trials(states=(s,)))) for s in (TrialState.COMPLETE, TrialState.PRUNED)):
        if n:
            assert f"{state.name} {n}" in page
    assert "<h2>Per class" in page and "most_confused_with" in page


# ------------------------------------------------------------------------------------------ trials.csv


@pytest.mark.slow
@pytest.mark.inprocess
def test_trials_csv_has_one_row_per_trial_with_values_from_storage(trained):
    frame = pd.read_csv(trained.out / TRIALS_FILE)
    trials = fresh_study(trained).get_trials()
    assert len(frame) == len(trials) == 4
    params = set().union(*(t.params for t in trials))
    assert params <= set(frame.columns)
    assert {"number", "state", "value", "duration_s", "best_epoch", "pruned_reason", "fail_reason",
            "retry_of"} <= set(frame.columns)
    rows = frame.set_index("number")
    for t in trials:
        row = rows.loc[t.number]
        assert row["state"] == t.state.name
        assert row["value"] == pytest.approx(t.value) if t.value is not None else math.isnan(row["value"])
        assert row["duration_s"] == pytest.approx(t.duration.total_seconds(), abs=1e-3)
        for name, value in t.params.items():
            assert row[name] == (pytest.approx(value) if isinstance(value, float) else value), name
        if keys.BEST_EPOCH in t.user_attrs:
            assert row["best_epoch"] == t.user_attrs[keys.BEST_EPOCH] + 1  # stored 0-based, shown 1-based
        if t.state == TrialState.PRUNED:
            assert row["pruned_reason"] == t.user_attrs[keys.PRUNED_REASON]
        assert math.isnan(row["retry_of"])  # nothing failed, nothing retried


# ---------------------------------------------------------------------------------- figures vs storage


@pytest.mark.slow
@pytest.mark.inprocess
def test_figure_points_match_the_trials_in_storage(trained):
    study = fresh_study(trained)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    curves = [t for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)) if t.intermediate_values]
    pruned = [t for t in curves if t.state == TrialState.PRUNED]
    assert len(complete) >= 2 and curves

    assert scatter_points(plots.optimization_history(study)) == len(complete) + len(pruned)

    lines = [ln for ln in plots.learning_curves(study).axes[0].get_lines() if ln.get_label().startswith("Trial")]
    assert sorted(len(ln.get_xdata()) for ln in lines) == sorted(len(t.intermediate_values) for t in curves)
    assert sum(ln.get_linestyle() == "--" for ln in lines) == len(pruned)

    coords = plots.parallel_coordinate(study)
    segments = [c for ax in coords.axes for c in ax.collections if isinstance(c, LineCollection)]
    assert sum(len(c.get_segments()) for c in segments) == len(complete)

    frame = trials_table(study)
    assert scatter_points(plots.lr_vs_accuracy(frame)) == len(complete) + len(pruned)
    grid = plots.optimizer_scheduler_grid(frame)
    counts = [int(m.group(1)) for t in grid.axes[0].texts if (m := re.search(r"n=(\d+)", t.get_text()))]
    assert sum(counts) == len(complete)
    assert sum(int(n) for t in grid.axes[0].texts for n in re.findall(r"\+(\d+) pruned", t.get_text())) == \
        len(pruned)
    assert sum(n > 0 for n in counts) == len({(t.params["optimizer"], t.params["scheduler"]) for t in complete})
    every = study.get_trials()  # the grid's rows and columns: every optimizer and scheduler tried, finished or not
    assert len(counts) == len({t.params["optimizer"] for t in every}) * len({t.params["scheduler"] for t in every})


@pytest.mark.slow
@pytest.mark.inprocess
def test_confusion_matrix_sums_to_the_validation_split_and_gives_the_best_value(trained):
    study = fresh_study(trained)
    best = ranked_trials(study)[0]
    n_val = study.user_attrs[keys.SPLIT_SIZES]["val"]
    outputs = load_trial_outputs(open_artifact_store(trained.store, create=False), best)
    matrix = confusion(outputs.val_labels.numpy(), outputs.val_logits.numpy())
    assert matrix.sum() == n_val
    assert np.trace(matrix) / n_val == pytest.approx(best.value, abs=1e-6)

    per_class = pd.read_csv(trained.out / PER_CLASS_FILE)
    assert list(per_class["class"].astype(str)) == read_study_record(study).class_names
    assert per_class["images"].sum() == n_val
    assert per_class["correct"].sum() / n_val == pytest.approx(best.value, abs=1e-6)


TITLE = re.compile(r"true (.+) / pred (.+) \(p=([0-9.]+)\)")


@pytest.mark.slow
@pytest.mark.inprocess
def test_confident_mistakes_are_the_most_confidently_wrong_validation_images(trained):
    assert (trained.out / MISTAKES_FILE).is_file()
    study = fresh_study(trained)
    outputs = load_trial_outputs(open_artifact_store(trained.store, create=False), ranked_trials(study)[0])
    # computed here from the stored outputs, independently of the report's code
    probs = softmax(outputs.val_logits.double().numpy(), axis=1)
    true, predicted, confidence = outputs.val_labels.numpy(), probs.argmax(axis=1), probs.max(axis=1)
    wrong = [i for i in range(len(true)) if true[i] != predicted[i]]
    expected = sorted(wrong, key=lambda i: -confidence[i])[:16]
    assert expected, "the tiny study classifies every validation image right: nothing to show"

    classes = read_study_record(study).class_names
    fig = confident_mistakes(study, outputs, classes)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == min(16, len(wrong))
    titles = [TITLE.fullmatch(ax.get_title()) for ax in shown]
    assert all(titles), [ax.get_title() for ax in shown]
    assert [(m.group(1), m.group(2)) for m in titles] == [(classes[true[i]], classes[predicted[i]]) for i in expected]
    assert [float(m.group(3)) for m in titles] == pytest.approx([confidence[i] for i in expected], abs=0.006)
    images = validation_images(study)  # the split's val order is the stored logits' order
    assert len(images) == len(true)
    for ax, i in zip(shown, expected, strict=True):
        assert np.array_equal(np.asarray(ax.images[0].get_array()), np.moveaxis(images[i], 0, -1))


@pytest.mark.slow
@pytest.mark.inprocess
def test_confident_mistakes_are_skipped_with_a_note_when_the_split_differs(trained):
    study = fresh_study(trained)
    outputs = load_trial_outputs(open_artifact_store(trained.store, create=False), ranked_trials(study)[0])
    moved = optuna.create_study(direction="maximize")
    for key, value in study.user_attrs.items():
        moved.set_user_attr(key, value)
    moved.set_user_attr(keys.SPLIT_SHA256, "0" * 64)
    with pytest.raises(plots.PlotSkipped, match="another split"):
        confident_mistakes(moved, outputs, read_study_record(study).class_names)


# ------------------------------------------------------------------------------------------- --ensemble


@pytest.fixture(scope="module")
def ensembled(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A soft ensemble exported from the tiny study, and the study's report with --ensemble."""
    root = tmp_path_factory.mktemp("ensembled")
    ens, out = root / "ens", root / "report"
    assert main(["ensemble", str(trained.study_file), "--storage", trained.url, "--artifacts", str(trained.store),
                 "--out", str(ens), "--method", "soft"]) == 0
    assert main(["report", str(trained.study_file), "--storage", trained.url, "--artifacts", str(trained.store),
                 "--out", str(out), "--ensemble", str(ens)]) == 0
    return ens, out


def bar_heights(ax: Axes) -> list[float]:
    return [patch.get_height() for patch in ax.patches]


@pytest.mark.slow
@pytest.mark.inprocess
def test_ensemble_weights_comparison_and_reliability_join_the_report(trained, ensembled):
    ens, out = ensembled
    assert (out / WEIGHTS_FILE).is_file() and (out / RELIABILITY_FILE).is_file()
    result = json.loads((ens / "ensemble.json").read_text(encoding="utf-8"))
    study = fresh_study(trained)
    figures = {name: build() for name, _, build in ensemble_builders(read_ensemble(ens), study,
                                                                     open_artifact_store(trained.store, create=False))}

    (weights_ax,) = figures[WEIGHTS_FILE].axes
    assert bar_heights(weights_ax) == pytest.approx([m["weight"] for m in result["members"]])
    assert [t.get_text() for t in weights_ax.get_xticklabels()] == [f"trial {m['trial']}" for m in result["members"]]

    page = (out / REPORT_FILE).read_text(encoding="utf-8")
    assert "<h2>Ensemble: test-split comparison</h2>" in page
    table = page.split("<h2>Ensemble: test-split comparison</h2>", 1)[1].split("</table>", 1)[0]
    assert table.count("<tr") == len(result["metrics"]) + 1  # the header row and one per row of ensemble.json
    for row in result["table"]["rows"]:  # the table `hpsearch ensemble` printed, markers included
        assert f"<td>{row[0]}</td>" in table
    assert "uniform soft voting [chosen]</td>" in table

    counts = [ax for ax in figures[RELIABILITY_FILE].axes if ax.get_label().startswith("counts:")]
    assert len(counts) == 2  # before and after temperature scaling
    n_test = study.user_attrs[keys.SPLIT_SIZES]["test"]
    assert [sum(bar_heights(ax)) for ax in counts] == [n_test, n_test]
    assert all(len(ax.patches) == ECE_BINS for ax in counts)  # the table's ECE bins
    # the recombined members give the accuracy ensemble.json measured for the shipped method (T keeps the argmax)
    shipped = next(row for row in result["metrics"] if row["method"] == result["method"])
    accuracies = [ax for ax in figures[RELIABILITY_FILE].axes if ax.get_ylabel() == "accuracy"]
    before, after = (ax.get_title() for ax in accuracies)  # one ECE: the diagram's is the table's
    assert f"ECE {shipped['test_ece']:.4f}" in before and f"ECE {shipped['test_ece_scaled']:.4f}" in after
    for hits, count in zip(accuracies, counts, strict=True):
        correct = sum(h * n for h, n in zip(bar_heights(hits), bar_heights(count), strict=True))
        assert correct / n_test == pytest.approx(shipped["test_accuracy"])


@pytest.mark.slow
@pytest.mark.inprocess
def test_the_reliability_diagram_is_skipped_when_its_outputs_cannot_be_rebuilt(trained, ensembled, tmp_path):
    result = read_ensemble(ensembled[0])
    study = fresh_study(trained)
    empty = tmp_path / "store"
    empty.mkdir()
    cases = [({**result, "method": "hard", "temperature": None}, trained.store, "ships no mixture"),
             ({**result, "split_sha256": "0" * 64}, trained.store, "another split"),
             (result, empty, "not in the artifact store")]
    for changed, store, why in cases:
        builders = {name: build for name, _, build in
                    ensemble_builders(changed, study, open_artifact_store(store, create=False))}
        with pytest.raises(plots.PlotSkipped, match=why):
            builders[RELIABILITY_FILE]()
        builders[WEIGHTS_FILE]()  # the weights need only ensemble.json


@pytest.mark.slow
@pytest.mark.inprocess
def test_an_ensemble_folder_without_ensemble_json_is_one_line_and_exit_2(trained, tmp_path, capsys):
    out = tmp_path / "report"
    err = one_line_exit_2(capsys, ["report", str(trained.study_file), "--storage", trained.url, "--artifacts",
                                   str(trained.store), "--out", str(out), "--ensemble", str(tmp_path)])
    assert "ensemble.json" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------- bad input


def one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.slow
@pytest.mark.inprocess
def test_a_store_without_the_outputs_is_one_line_and_exit_2(trained, tmp_path, capsys):
    empty = tmp_path / "other-store"
    empty.mkdir()
    out = tmp_path / "report"
    err = one_line_exit_2(capsys, ["report", str(trained.study_file), "--storage", trained.url,
                                   "--artifacts", str(empty), "--out", str(out)])
    assert "no COMPLETE trial with stored validation outputs" in err and "--artifacts" in err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.inprocess
def test_out_that_is_no_report_folder_is_refused_and_left_alone(trained, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    err = one_line_exit_2(capsys, ["report", str(trained.study_file), "--storage", trained.url,
                                   "--artifacts", str(trained.store), "--out", str(out)])
    assert "not a report folder" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.fixture
def empty_study(tmp_path: Path) -> tuple[Path, str, optuna.Study]:
    path = write_study(tmp_path / "empty.toml", tiny_tables("emptyreport"))
    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = read_study_file(path)
    store = tmp_path / "store"
    study = open_study(cfg, open_storage(url), prepare(cfg), store)
    store.mkdir(exist_ok=True)
    return path, url, study


def test_an_empty_study_is_one_line_and_exit_2(empty_study, tmp_path, capsys):
    path, url, _ = empty_study
    out = tmp_path / "report"
    err = one_line_exit_2(capsys, ["report", str(path), "--storage", url, "--out", str(out)])
    assert "no trials yet" in err and "hpsearch run" in err
    assert not out.exists()


def test_a_study_without_complete_trials_is_one_line_and_exit_2(empty_study, tmp_path, capsys):
    path, url, study = empty_study
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"lr": 1e-3},
                                 distributions={"lr": FloatDistribution(1e-4, 1e-1, log=True)},
                                 intermediate_values={0: 0.5}))
    out = tmp_path / "report"
    err = one_line_exit_2(capsys, ["report", str(path), "--storage", url, "--out", str(out)])
    assert "no COMPLETE trial with stored validation outputs" in err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.inprocess
def test_report_of_a_study_with_hostile_class_names(trained, tmp_path):
    """The trained study's classes renamed `$\\foo$`, `=cmd|x`, `@SUM(1)`: `hpsearch report` draws every figure
    it drew before (mathtext would crash on the first) and per_class.csv quotes the formulas."""
    import sqlite3
    from contextlib import closing

    db = tmp_path / "s.db"
    with closing(sqlite3.connect(trained.url.removeprefix("sqlite:///"))) as source, \
            closing(sqlite3.connect(db)) as copy:
        source.backup(copy)  # the WAL's pages too
    url = f"sqlite:///{db}"
    study = optuna.load_study(study_name=NAME, storage=open_storage(url))
    hostile = [MATH_CLASS, "=cmd|x", "@SUM(1)", *map(str, range(3, 10))]
    study.set_user_attr(keys.CLASSES, hostile)
    out = tmp_path / "report"
    assert main(["report", str(trained.study_file), "--storage", url, "--artifacts", str(trained.store),
                 "--out", str(out)]) == 0
    assert {p.name for p in pngs(trained.out)} - {MISTAKES_FILE} <= {p.name for p in pngs(out)}
    rows = csv_rows((out / PER_CLASS_FILE).read_bytes())
    assert [r["class"] for r in rows[:3]] == [MATH_CLASS, "'=cmd|x", "'@SUM(1)"]
