"""What the report's tests draw and read: small studies built in memory, what a drawn figure shows, CSV rows."""

from __future__ import annotations

import csv
import io

import numpy as np
import optuna
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial


def scatter_points(fig: Figure) -> int:
    """The points of every scatter in `fig`, all its axes together."""
    return sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections if isinstance(c, PathCollection))


# mathtext would parse \foo as a symbol and fail ("Unknown symbol: \foo"): a class name the report must draw as is.
MATH_CLASS = r"$\foo$"


def drawn_texts(fig: Figure) -> set[str]:
    """Every text the figure draws, as matplotlib draws it (its mathtext escapes undone), after a real render."""
    fig.canvas.draw()
    return {t._preprocess_math(t.get_text())[0] for t in fig.findobj(lambda a: hasattr(a, "_preprocess_math"))
            if t.get_text()}


def csv_rows(data: bytes) -> list[dict[str, str]]:
    """A CSV file's rows, by header."""
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


SYNTHETIC_SPACE = {
    "lr": FloatDistribution(1e-4, 1e-1, log=True), "optimizer": CategoricalDistribution(["adam", "rmsprop"]),
    "scheduler": CategoricalDistribution(["step", "plateau"]), "dropout": FloatDistribution(0.0, 0.5),
}


def synthetic_study(n: int, pruned_every: int = 3) -> optuna.Study:
    """n trials in memory: every `pruned_every`-th PRUNED after 2 epochs, the rest COMPLETE after 5."""
    rng = np.random.default_rng(0)
    study = optuna.create_study(direction="maximize")
    trials = []
    for i in range(n):
        params = {"lr": float(10 ** rng.uniform(-4, -1)), "optimizer": ["adam", "rmsprop"][i % 2],
                  "scheduler": ["step", "plateau"][(i // 2) % 2], "dropout": float(rng.uniform(0, 0.5))}
        pruned = i % pruned_every == pruned_every - 1
        curve = {e: float(rng.uniform(0.1, 0.99)) for e in range(2 if pruned else 5)}
        trials.append(create_trial(state=TrialState.PRUNED if pruned else TrialState.COMPLETE, params=params,
                                   distributions=SYNTHETIC_SPACE, intermediate_values=curve,
                                   value=None if pruned else curve[4]))
    study.add_trials(trials)
    return study
