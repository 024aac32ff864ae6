"""An ensemble's comparison: the table `hpsearch ensemble` prints and the report.md it writes beside it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table

from hpsearch.ensemble import Candidate, EnsembleResult, Row, at_bound

# `held-out NLL` and `held-out acc` are cross-fitted on the fitting outputs (calibration, out-of-fold or validation),
# of what the row ships (with its T where one ships); the rest is measured on the test split; `(T)`: at the shipped
# T.
COMPARISON_HEADERS = ("method", "members", "weights", "held-out acc", "held-out NLL", "acc", "NLL", "ECE", "T",
                      "NLL (T)", "ECE (T)")


def _f(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _weights_cell(row: Row) -> str:
    return " ".join(f"#{t}:{w:.2f}" for t, w in zip(row.trials, row.weights, strict=True))


def temperature_cell(row: Row) -> str:
    """The T a row ships; where it ships none, the T it fitted and why it was not kept: `(bound)` when it ran to
    the search's edge, `(not backed held out)` when cross-fitting showed no clear gain with it."""
    if row.temperature is None:
        return "—"
    if row.temperature_ships or row.fitted_temperature is None or row.fitted_temperature == 1.0:
        return _f(row.temperature, 3)
    if row.temperature_at_bound:  # degenerate: at a search bound, or sharpening outputs without a mistake
        why = "bound" if at_bound(row.fitted_temperature) else "no mistake to fit it"
    else:
        why = "not backed held out"
    return f"1 (fit {row.fitted_temperature:.3g}: {why})"


def table_cells(result: EnsembleResult) -> list[list[str]]:
    """The comparison as text cells, shared by the terminal table and report.md."""
    cells = []
    for row in result.rows:
        name = row.name + (" [chosen]" if row.key == result.method else "")
        if row.key == "weighted" and result.collapsed:
            name += " [collapsed to 1 member]"
        if row.key == "soup" and result.soup is not None and not result.soup.kept:
            name += " [not kept]"
        cells.append([name, str(len(row.trials)), _weights_cell(row),
                      _f(row.heldout.accuracy if row.heldout is not None else None), _f(row.shipped_heldout_nll),
                      _f(row.accuracy), _f(row.nll), _f(row.ece), temperature_cell(row), _f(row.nll_scaled),
                      _f(row.ece_scaled)])
    return cells


def result_table(result: EnsembleResult, title: str) -> Table:
    table = Table(title=escape(title), header_style="bold")
    for i, header in enumerate(COMPARISON_HEADERS):
        table.add_column(header, justify="left" if i in (0, 2) else "right")
    for cells in table_cells(result):
        table.add_row(*(escape(c) for c in cells))
    return table


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "|".join(":---" if i in left else "---:" for i in range(len(headers))) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def report_markdown(result: EnsembleResult, study_name: str, candidates: Sequence[Candidate],
                    skipped: Sequence[str]) -> str:
    weights = dict(zip((c.trial for c in candidates), result.weight_fit.weights, strict=True))
    cand_rows = [[f"#{c.trial}", f"{c.val_accuracy:.4f}", f"{weights[c.trial]:.3f}",
                  ", ".join(f"{k}={_param(v)}" for k, v in c.params.items())] for c in candidates]
    parts = [
        f"# Ensemble of study `{study_name}`",
        "",
        f"Split `{result.split_sha256}`: {result.sizes['fit']} {result.fit_data}, {result.sizes['test']} test "
        "samples. Weights and temperatures are fitted on those outputs; what ships is decided by cross-fitting on "
        "them (refitted without each part, scored on it); the test split only measures.",
        "",
        f"Chosen method: **{result.method}** ({len(result.members)} members"
        + (f", T = {result.temperature:.3f}" if result.temperature is not None else "") + ").",
        "",
    ]
    if result.collapsed:
        parts += [f"**The weighted ensemble collapsed to a single member (trial {result.row('weighted').trials[0]})"
                  ": weighted soft voting is that one model, not an ensemble.**", ""]
    parts += ["## Which data fitted what", "", *(f"- {k}: {v}" for k, v in result.fitting().items()
                                                  if isinstance(v, str)), ""]
    parts += ["## Comparison", "", "`held-out acc` and `held-out NLL` are cross-fitted on the fitting outputs; acc, "
              "NLL and ECE are on test, before and after the temperature each row ships.", "",
              _markdown_table(COMPARISON_HEADERS, table_cells(result), left=(0, 2)), "",
              "## Candidates (rank order)", "",
              _markdown_table(["trial", "val acc", "fitted weight", "params"], cand_rows, left=(0, 3)), "",
              "## Notes", "", *(f"- {n}" for n in result.notes)]
    if result.soup is not None:
        parts += ["", "## Greedy soup", "", f"{'Kept' if result.soup.kept else 'Not kept'}: {result.soup.reason}.",
                  "", "Trials in rank order; each row is the soup's validation accuracy and NLL with that trial's "
                  "weights averaged in (re-run on the validation split); the first row is the best trial alone.", "",
                  _markdown_table(["trial", "val acc", "val NLL", "added"],
                                  [[f"#{s.trial}", f"{s.val_accuracy:.4f}", f"{s.val_nll:.4f}",
                                    "yes" if s.added else "no"] for s in result.soup.steps])]
    if skipped:
        parts += ["", "## Skipped trials", "", *(f"- {s}" for s in skipped)]
    return "\n".join(parts) + "\n"


def _param(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
