"""A synthetic visual counting task rendered with PIL: "How many dots are in the image?"

Each image shows ``k`` (1 ≤ k ≤ ``max_count``) white discs at random, non-overlapping
positions on a dark background with a little noise; the answer is ``k`` in SophiaVL-R1
format (``<answer>k</answer>``, problem_type ``numerical``). The question text does not
depend on the image, so the answer can only come from the image.

With ``reasoning: observe`` the warm start teaches the reasoning of
:mod:`sophiavl_mcore.data.dots_reasoning` (``<think>N dots</think>``), which the tiny TRM
grades. A share ``hacked_frac`` of the records belongs to the ``dots_hacked`` source (the
question in other words), where that TRM grades with a flawed rule; the rest is
``dots_clean``.

:func:`write_dots_task` writes PNG files plus ``train.jsonl`` / ``val.jsonl`` records in
the schema of :mod:`sophiavl_mcore.data.records`. :func:`uniform_answer_records` makes
warm-start targets whose answers are drawn uniformly at random, independent of the
image: SFT on them teaches the output format but not the task.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sophiavl_mcore.data.config import VisualTaskConfig
from sophiavl_mcore.data.dots_reasoning import (
    CLEAN_SOURCE,
    HACKED_QUESTION,
    HACKED_SOURCE,
    QUESTION,
    warm_start_reasoning,
)
from sophiavl_mcore.data.records import Record


def render_dots(count: int, cfg: VisualTaskConfig, rng: np.random.Generator) -> Image.Image:
    """An RGB image [image_size, image_size] with ``count`` discs placed in distinct cells."""
    side = cfg.image_size
    cell = 2 * cfg.radius + 2
    per_row = side // cell
    cells = rng.choice(per_row * per_row, size=count, replace=False)
    bg = rng.integers(0, 40, size=(side, side, 3), dtype=np.uint8)
    img = Image.fromarray(bg, mode="RGB")
    draw = ImageDraw.Draw(img)
    for c in cells:
        cy, cx = divmod(int(c), per_row)
        y0 = cy * cell + 1 + int(rng.integers(0, cell - 2 * cfg.radius - 1))
        x0 = cx * cell + 1 + int(rng.integers(0, cell - 2 * cfg.radius - 1))
        draw.ellipse([x0, y0, x0 + 2 * cfg.radius, y0 + 2 * cfg.radius], fill=(235, 235, 235))
    return img


def task_records(out: Path, name: str, n: int, cfg: VisualTaskConfig, seed: int) -> list[dict]:
    """Render ``n`` images under ``out/img`` and return their raw records (not written)."""
    rng = np.random.default_rng(seed)
    hacked = np.random.default_rng([seed, 1]).random(n) < cfg.hacked_frac
    (out / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        count = int(rng.integers(1, cfg.max_count + 1))
        rel = f"img/{name}_{i:05d}.png"
        render_dots(count, cfg, rng).save(out / rel)
        records.append({
            "problem_id": f"{name}-{i}", "problem": HACKED_QUESTION if hacked[i] else QUESTION,
            "data_type": "image", "problem_type": "numerical",
            "solution": f"<answer>{count}</answer>", "path": rel,
            "data_source": HACKED_SOURCE if hacked[i] else CLEAN_SOURCE,
        })
    return records


def _write_split(out: Path, name: str, n: int, cfg: VisualTaskConfig, seed: int) -> Path:
    path = out / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in task_records(out, name, n, cfg, seed)))
    return path


def write_dots_task(out_dir: str | Path, cfg: VisualTaskConfig) -> tuple[Path, Path | None]:
    """Write the task under ``out_dir``; returns the train and (if any) val record files.

    Deterministic in ``cfg``: rewriting gives byte-identical records.
    """
    out = Path(out_dir)
    train = _write_split(out, "train", cfg.num_train, cfg, cfg.seed)
    val = _write_split(out, "val", cfg.num_val, cfg, cfg.seed + 1_000_003) if cfg.num_val else None
    return train, val


def uniform_answer_records(records: Sequence[Record], max_count: int, seed: int) -> list[Record]:
    """Copies of ``records`` whose answers are uniform in 1 … max_count, independent of
    the image (the warm start learns the format, not the task)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        answer = str(int(rng.integers(1, max_count + 1)))
        out.append(dataclasses.replace(r, answer=answer, solution=f"<answer>{answer}</answer>"))
    return out


def warm_start_reasoning_for(cfg: VisualTaskConfig, text: str) -> Callable[[Record], str]:
    """The warm start's reasoning per record: ``text`` verbatim ("free"), or ``N dots``
    with N = the record's (random) answer ("observe")."""
    if cfg.enabled and cfg.reasoning == "observe":
        return warm_start_reasoning
    return lambda _record: text
