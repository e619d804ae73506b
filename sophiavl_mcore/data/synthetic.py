"""Synthetic images and records for tests and benchmarks (no downloads needed).

``natural_image`` makes something a JPEG codec and a resampler treat like a photo:
smooth gradients, a few filled shapes with hard edges, and sensor-like noise.
``write_png_rows`` writes a PNG row by row, so a 20000×20000 image costs a few MB of
memory and a few hundred KB of disk instead of 1.2 GB.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def natural_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """``[height, width, 3]`` uint8 photo-like image."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    phase = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        img[..., c] = 127.5 + 100.0 * np.sin(3.0 * x + 2.0 * y + phase[c]) * np.cos(2.0 * y - x)
    yy, xx = np.ogrid[:height, :width]
    for _ in range(6):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        r = int(rng.integers(2, max(3, min(height, width) // 4)))
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0.0, 6.0, size=(height, width, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(image: np.ndarray | Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    """Encode an array/PIL image with PIL (``fmt``: JPEG, PNG, GIF, ...)."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_rows(
    path: str | Path, height: int, width: int, channels: int = 3, bit_depth: int = 8,
    row: np.ndarray | None = None,
) -> None:
    """Write a PNG whose every row is ``row`` (default: zeros), streaming.

    ``channels``: 1 (gray), 3 (RGB) or 4 (RGBA); ``bit_depth``: 8 or 16 (big-endian rows).
    """
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    dtype = np.dtype(">u2") if bit_depth == 16 else np.dtype(np.uint8)
    if row is None:
        row = np.zeros((width, channels), dtype)
    raw = b"\x00" + np.ascontiguousarray(row, dtype=dtype).tobytes()
    comp = zlib.compressobj(1)  # speed over size: the rows repeat anyway
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)))
        pending = []
        for _ in range(height):
            piece = comp.compress(raw)
            if piece:
                pending.append(piece)
            if sum(map(len, pending)) > 1 << 20:
                f.write(_chunk(b"IDAT", b"".join(pending)))
                pending = []
        pending.append(comp.flush())
        f.write(_chunk(b"IDAT", b"".join(pending)))
        f.write(_chunk(b"IEND", b""))


def write_jpegs(
    folder: str | Path, sizes: Sequence[tuple[int, int]], seed: int = 0, quality: int = 90
) -> list[Path]:
    """Write one natural-looking JPEG per ``(height, width)``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = folder / f"img_{i:04d}_{h}x{w}.jpg"
        p.write_bytes(encode(natural_image(h, w, rng), "JPEG", quality=quality))
        paths.append(p)
    return paths


def write_records(path: str | Path, records: Sequence[dict]) -> Path:
    """Write raw records as .json / .jsonl / .parquet according to the suffix."""
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(list(records)))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(records)), path)
    else:
        raise ValueError(f"unknown suffix {path.suffix!r}")
    return path
