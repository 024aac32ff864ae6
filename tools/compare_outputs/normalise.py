"""The narrow text rules: work folders and source trees, timestamps, elapsed times, host and pid, inline PNGs by
pixels, and a file's sha256 or artifact id by its content as compared; a table's measured column masked."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import socket
from dataclasses import dataclass, field

TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2}| UTC)?")
ELAPSED = re.compile(r"(?<![\d:])\d+:\d{2}:\d{2}(?![\d:])")  # rich's progress columns, H:MM:SS
DURATION = re.compile(r"\b(in|took|after) \d+(?:\.\d+)? ?(?:ms|s|min)\b")
PNG_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")
SHA256 = re.compile(r"\b[0-9a-f]{64}\b")
UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
TABLE_RULE = set("┏┓┗┛┡┩└┘┌┐├┤━─┳┻╇┴┬┼╋ ")


@dataclass
class Normaliser:
    """Narrow text rules, plus the names a file's bytes go by (its sha256, its artifact id) mapped to its
    content as compared, filled in per folder as its files are read."""

    places: list[tuple[str, str]]  # (absolute path, placeholder), longest first
    hashes: dict[str, str] = field(default_factory=dict)  # raw sha256 -> content token
    artifacts: dict[str, str] = field(default_factory=dict)  # artifact id -> content token

    def text(self, text: str) -> str:
        for path, placeholder in self.places:
            text = text.replace(path, placeholder)
        text = PNG_URI.sub(lambda m: f"data:image/png;pixels={png_digest(base64.b64decode(m.group(1)))}", text)
        text = TIMESTAMP.sub("<TIME>", text)
        text = ELAPSED.sub("<ELAPSED>", text)
        text = DURATION.sub(lambda m: f"{m.group(1)} <DURATION>", text)
        text = re.sub(rf"\b{re.escape(socket.gethostname())}:\d+\b", "<HOST>:<PID>", text)
        text = SHA256.sub(lambda m: self.hashes.get(m.group(0), m.group(0)), text)
        return UUID.sub(lambda m: self.artifacts.get(m.group(0), m.group(0)), text)


def mask_table_column(text: str, header: str) -> str:
    """Rich tables cell by cell, padding dropped, with the cells under `header` masked: the `sec` column of a
    fresh run's trials is how long they took (it may widen the table, hence no padding)."""
    lines, index = [], None
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)]
        if len(cells) > 2 and "┃" in line:
            index = cells.index(header) if header in cells else None
        elif len(cells) > 2 and index is not None and index < len(cells):
            cells[index] = "<masked>"
        if len(cells) > 2:
            lines.append(" | ".join(cells))
        else:
            lines.append("<rule>" if line.strip() and set(line) <= TABLE_RULE else line.strip())
    return "\n".join(lines) + "\n"


def short(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def png_digest(data: bytes) -> str:
    """A PNG by its pixels (matplotlib's metadata chunks carry its version and may carry dates)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return f"{image.mode}-{image.width}x{image.height}-{short(image.tobytes())}"
