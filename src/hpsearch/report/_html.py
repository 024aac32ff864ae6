"""report.html of `hpsearch report`: one self-contained page with the summary, the tables, every figure and the notes.

Images are data URIs and the CSS is inline: the page fetches nothing. report/_study.py gathers what it shows.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
import pandas as pd
from optuna.trial import FrozenTrial

from hpsearch.monitor import format_cell, state_counts
from hpsearch.record import read_study_record
from hpsearch.store import ranked_trials, redact


@dataclass(frozen=True)
class Drawn:
    """One figure as the page and the folder get it: rendered once, written once and embedded once."""

    name: str  # the PNG's file name
    caption: str
    png: bytes


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f0f0f0}td{text-align:right}figure{margin:2em 0}img{max-width:100%}
figcaption{font-weight:bold;margin-bottom:0.5em}.notes li{color:#8a5a00}"""


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, na_rep="", float_format=lambda v: f"{v:.4g}")


def _trials_table(frame: pd.DataFrame) -> str:
    """The top-trials table with every cell as the terminal prints it (hpsearch.monitor.format_cell)."""
    cells = pd.DataFrame({c: [format_cell(str(c), v) for v in frame[c].tolist()] for c in frame.columns})
    return _table(cells)


def _summary(study: optuna.Study, url: str, trial: FrozenTrial) -> str:
    counts = ", ".join(f"{state} {n}" for state, n in state_counts(study).items() if n)
    record = read_study_record(study)
    sizes = record.split_sizes or {}
    best = ranked_trials(study)[0]  # a trial with outputs exists, so a COMPLETE one does
    rows = [("study", study.study_name), ("storage", redact(url)), ("direction", study.direction.name.lower()),
            ("trials", counts), ("split", ", ".join(f"{k} {v}" for k, v in sizes.items())),
            ("classes", str(len(record.class_names))),
            ("best trial", f"trial {best.number}: {(study.metric_names or ['val_accuracy'])[0]} {best.value:.4f}"),
            ("its params", ", ".join(f"{k}={format_cell(k, v)}" for k, v in best.params.items())),
            ("per-class results of", f"trial {trial.number} (the best with stored outputs)")]
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
                               for k, v in rows) + "</table>"


def page(study: optuna.Study, url: str, trial: FrozenTrial, top: pd.DataFrame, per_class: pd.DataFrame,
         drawn: Sequence[Drawn], notes: Sequence[str], ensemble: pd.DataFrame | None = None) -> str:
    """report.html: one file that opens anywhere, offline: PNGs inline as base64 data URIs, CSS inline."""
    name = html.escape(study.study_name)
    figures = "".join(f"<figure><figcaption>{html.escape(d.caption)}</figcaption><img alt='{html.escape(d.name)}' "
                      f"src='data:image/png;base64,{base64.b64encode(d.png).decode('ascii')}'></figure>"
                      for d in drawn)
    note_list = "".join(f"<li>{html.escape(n)}</li>" for n in notes) or "<li>none</li>"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Study {name}</title>"
            f"<style>{STYLE}</style></head><body><h1>Study {name}</h1>{_summary(study, url, trial)}"
            f"<h2>Notes</h2><ul class='notes'>{note_list}</ul>"
            f"<h2>Top {len(top)} trials (COMPLETE)</h2>{_trials_table(top)}"
            f"<h2>Per class: trial {trial.number} on the validation split</h2>{_table(per_class)}"
            + ("" if ensemble is None else f"<h2>Ensemble: test-split comparison</h2>{_table(ensemble)}")
            + f"<h2>Figures</h2>{figures}</body></html>\n")
