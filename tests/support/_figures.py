"""What a drawn matplotlib figure shows, counted for the report's tests."""

from __future__ import annotations

from matplotlib.collections import PathCollection
from matplotlib.figure import Figure


def scatter_points(fig: Figure) -> int:
    """The points of every scatter in `fig`, all its axes together."""
    return sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections if isinstance(c, PathCollection))
