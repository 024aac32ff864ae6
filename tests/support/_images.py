"""Image folders of solid-colour PNGs, and an imagefolder [data] section over one."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    from hpsearch.config import DataSection


def solid_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


COLOURS = {"cat": (200, 30, 30), "dog": (20, 180, 40), "eel": (10, 20, 230)}


def colour_folder(root: Path, parts: dict[str, int], size: tuple[int, int] = (20, 12)) -> Path:
    """root/<part>/<class>/<i>.png, each class a solid colour (its content is checked after decoding)."""
    for part, per_class in parts.items():
        for name, colour in COLOURS.items():
            for i in range(per_class):
                solid_png(root / part / name / f"{i}.png", colour, size)
    return root


def imagefolder_section(root: Path, tmp_path: Path, **extra: object) -> DataSection:
    """An imagefolder [data] section over `root`, 16 px, its cache in tmp_path/cache."""
    from hpsearch.config import DataSection

    fields: dict[str, object] = {"dataset": "imagefolder", "root": str(root), "image_size": 16, "augment": [],
                                 "cache_dir": str(tmp_path / "cache"), **extra}
    return DataSection.model_validate(fields)


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A real, valid PNG of a few tens of KiB whose header declares side x side pixels (1-bit grey, all black):
    a decompression bomb (20,000 x 20,000 = 400 megapixels, 1.2 GB as RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    rows = (b"\x00" * (1 + (side + 7) // 8)) * 1000  # filter byte 0, then the row's packed bits
    body = b"".join(packer.compress(rows) for _ in range(side // 1000)) + packer.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path
