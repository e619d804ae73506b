"""Tiny SFT case shared by the tests: a tiny random Qwen2.5-VL and SophiaVL-R1-Thinking
records with small generated images (written to disk by the tests themselves)."""

from __future__ import annotations

import json
from pathlib import Path

# Reasoning texts and the score a grader gives them: the score is a function of the
# text, so a model can learn it (and the loss can fall below the format-only level).
REASONINGS = (
    ("The picture shows a red square, so the area is 12 square units and the answer is 42.", 1.0),
    ("The answer is 42 because the picture shows a triangle. The answer is 42. The answer is 42.", 0.4),
    ("Option A, B, C or D: the triangle is red so I pick option C.", 0.1),
    ("Let me reason step by step: the image shows a square of side 4, area 16; option B.", 0.7),
)
QUESTIONS = (
    "What is shown in the picture?",
    "What is the area of the triangle?",
    "Which option is correct: A, B, C or D?",
    "How many squares are in the image?",
)


def write_records(root: Path, n: int = 32, seed: int = 0) -> Path:
    """``n`` thinking records + PNG images (56×84 or 84×56) under ``root``; returns the file."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        shape = (56, 84) if i % 2 == 0 else (84, 56)
        arr = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "images" / f"{i}.png")
        reasoning, score = REASONINGS[i % len(REASONINGS)]
        records.append({"problem_id": i, "problem": QUESTIONS[(i // 4) % len(QUESTIONS)],
                        "path": f"images/{i}.png", "reasoning": reasoning, "score": score})
    path = root / "thinking.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build_model(root: Path) -> Path:
    from sophiavl_mcore.testing.tiny_models import TinyModelSpec, build_tiny_qwen2_5_vl

    # 2 KV heads so that TP=2 splits the query groups; 2 layers so that PP=2 has one each.
    return build_tiny_qwen2_5_vl(root / "tiny_vl", TinyModelSpec(num_kv_heads=2))
