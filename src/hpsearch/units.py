"""Sizes as users read them, in one convention everywhere hpsearch prints one: decimal units (kB, MB, GB = 10^3,
10^6, 10^9 bytes), as disks and downloads are labelled; never MiB beside MB."""

from __future__ import annotations

MIB = 2**20  # what torch and the trial records count GPU memory in


def size_text(n_bytes: float) -> str:
    """`n_bytes` in the largest decimal unit it reaches, one decimal: 512 B, 12.3 kB, 45.6 MB, 7.8 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n_bytes) >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"


def mib_text(mib: float) -> str:
    """A size counted in MiB (GPU memory) in the same decimal convention."""
    return size_text(mib * MIB)
