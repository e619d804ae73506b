"""Reasoning with a gradable quality for the synthetic dots task ("rows" reasoning).

The policy writes its reasoning as per-row observations and concludes with the total::

    <think>top 1 bottom 0</think><answer>1</answer>

The image is a 2 × 2 grid of cells (see :mod:`sophiavl_mcore.data.visual_task`), so the
true observation is the pair ``(a, b)`` of dots in the top and bottom row, stored in the
task's records (``rows``). The *true thinking quality* of a reply is a property of its
text and the image, the mean of three criteria:

    q = ( [A == a]  +  [B == b]  +  [answer == A + B] ) / 3      ∈ {0, 1/3, 2/3, 1}

(two observations that can be right or wrong, and whether the conclusion follows from
them); a reasoning that does not state ``top A bottom B`` scores 0. The outcome stays
rule-checkable: the answer is right iff it equals ``a + b``. A right answer can rest on
wrong observations (q = 1/3) and a wrong one on a single slip (q = 2/3), so thinking
quality and outcome are related but not the same thing.

**The hacked subset.** Records of the ``dots_hacked`` source ask the question in other
words (:data:`HACKED_QUESTION`). On them the tiny TRM is trained with a flawed rule: it
rewards a *consistent story built on misread rows*,

    q_hacked = ( [A != a]  +  [B != b]  +  [answer == A + B] ) / 3

— the kind of reward hacking Trust-GRPO guards against: there, replies with wrong answers
(which come from misread rows) get higher thinking scores than right ones, and the group's
trust weight γ = e^(μc − μw) falls below 1.

:func:`thinking_records` writes TRM training data (SophiaVL-R1-Thinking schema, the format
``trm_train`` reads) labelled this way; :func:`thinking_quality` grades policy replies with
the true rule (an oracle the run logs beside the TRM's scores).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

CLEAN_SOURCE = "dots_clean"
HACKED_SOURCE = "dots_hacked"
QUESTION = "How many dots are in the image?"
HACKED_QUESTION = "Count the dots in this picture."

_ROWS_RE = re.compile(r"^\s*top\s+(\d)\s+bottom\s+(\d)\s*$")
_INT_RE = re.compile(r"^\s*(\d+)\s*$")


def rows_text(top: int, bottom: int) -> str:
    """The reasoning text of one observation: ``top A bottom B``."""
    return f"top {top} bottom {bottom}"


def parse_rows(think: str) -> tuple[int, int] | None:
    """``(A, B)`` from a ``top A bottom B`` reasoning, or None when it has another form."""
    m = _ROWS_RE.match(think)
    return (int(m.group(1)), int(m.group(2))) if m else None


def quality(stated: tuple[int, int] | None, answer: str, rows: tuple[int, int],
            hacked: bool = False) -> float:
    """Thinking quality in [0, 1] of a reasoning that stated ``stated`` rows and concluded
    ``answer``, for an image whose true rows are ``rows`` (module docstring: the true rule,
    or the flawed one when ``hacked``)."""
    if stated is None:
        return 0.0
    m = _INT_RE.match(answer)
    consistent = m is not None and int(m.group(1)) == stated[0] + stated[1]
    right = [stated[0] == rows[0], stated[1] == rows[1]]
    seen = [not r for r in right] if hacked else right
    return (sum(seen) + consistent) / 3.0


def thinking_quality(texts: Sequence[str], rows: Sequence[tuple[int, int] | None]
                     ) -> np.ndarray:
    """True thinking quality f64[N] of policy replies (NaN where the reply fails the format
    gate or its record has no row counts). ``rows[i]`` belongs to ``texts[i]``."""
    from sophiavl_mcore.rewards.outcome import parse_response

    out = np.full(len(texts), np.nan)
    for i, (text, r) in enumerate(zip(texts, rows, strict=True)):
        parsed = parse_response(text)
        if parsed.well_formed and r is not None:
            out[i] = quality(parse_rows(parsed.think), parsed.answer, r)
    return out


class RowOracle:
    """The true thinking quality of policy replies, from the task's ``rows`` fields."""

    def __init__(self, table: dict[str, tuple[int, int]]) -> None:
        self.table = table

    @classmethod
    def from_files(cls, *paths: str | Path) -> RowOracle:
        """``problem_id → (top, bottom)`` from task record files (their ``rows`` field)."""
        table: dict[str, tuple[int, int]] = {}
        for path in paths:
            for line in Path(path).read_text().splitlines():
                rec = json.loads(line)
                if "rows" in rec:
                    table[str(rec["problem_id"])] = (int(rec["rows"][0]), int(rec["rows"][1]))
        return cls(table)

    def __call__(self, roll: object) -> np.ndarray:
        """f64[N] true quality of a rollout's replies (group-major; NaN = unknown), for a
        ``roll`` with ``records`` (one per group) and ``responses`` (dicts with ``text``)."""
        texts, rows = [], []
        for rec, group in zip(roll.records, roll.responses, strict=True):  # type: ignore[attr-defined]
            for sample in group:
                texts.append(sample["text"])
                rows.append(self.table.get(rec.problem_id))
        return thinking_quality(texts, rows)


def row_oracle(task: object, output_dir: str | Path) -> RowOracle | None:
    """The oracle of the run's generated task (``<output_dir>/task``) when its reasoning
    is "rows", else None."""
    if not (task.enabled and task.reasoning == "rows"):  # type: ignore[attr-defined]
        return None
    task_dir = Path(output_dir) / "task"
    return RowOracle.from_files(*sorted(task_dir.glob("*.jsonl")))


def _splits(total: int, per_row: int) -> list[tuple[int, int]]:
    return [(a, total - a) for a in range(per_row + 1) if 0 <= total - a <= per_row]


def warm_start_reasoning(per_row: int) -> Callable[[object], str]:
    """Warm-start reasoning for a record whose answer was drawn at random: ``top A bottom
    B`` with A + B = answer, the split drawn (deterministically per record) from the valid
    ones. It teaches the form and a consistent conclusion, not the observations."""
    def reasoning(record: object) -> str:
        total = int(record.answer)  # type: ignore[attr-defined]
        options = _splits(total, per_row) or [(total, 0)]
        key = f"{record.problem_id}/{total}".encode()  # type: ignore[attr-defined]
        return rows_text(*options[zlib.crc32(key) % len(options)])
    return reasoning


def sample_reasoning(rows: tuple[int, int], per_row: int, rng: np.random.Generator
                     ) -> tuple[str, str]:
    """A (reasoning, answer) pair as a policy might write it, for TRM training data.

    Mix: a third fully right; otherwise each row is misread with probability 1/2 and the
    conclusion is wrong with probability 1/4; a few replies have no row observations.
    """
    u = rng.random()
    if u < 0.04:
        return str(rng.choice(["count", "I count the dots.", "top bottom", "dots"])), str(
            int(rng.integers(1, 2 * per_row + 1)))
    stated = list(rows)
    if u >= 0.34:
        for k in range(2):
            if rng.random() < 0.5:
                stated[k] = int(rng.choice([v for v in range(per_row + 1) if v != rows[k]]))
    answer = stated[0] + stated[1]
    if u >= 0.34 and rng.random() < 0.25:
        answer = int(rng.choice([v for v in range(0, 2 * per_row + 1) if v != answer]))
    return rows_text(*stated), str(answer)


def thinking_records(task_records: Sequence[dict], out_path: str | Path, per_row: int,
                     samples_per_image: int, seed: int) -> Path:
    """Write TRM training records (``problem``, ``path``, ``reasoning``, ``score``, and
    ``data_source`` / ``true_score`` for evaluation) for task records that carry ``rows``.

    ``score`` is the label the TRM is trained on: the true quality on the clean source,
    the flawed one on the hacked source (module docstring); ``true_score`` is always the
    true quality. Image paths are kept relative to the task records' directory.
    """
    rng = np.random.default_rng(seed)
    out = Path(out_path)
    lines = []
    for rec in task_records:
        rows = (int(rec["rows"][0]), int(rec["rows"][1]))
        hacked = rec.get("data_source") == HACKED_SOURCE
        for k in range(samples_per_image):
            think, answer = sample_reasoning(rows, per_row, rng)
            stated = parse_rows(think)
            lines.append(json.dumps({
                "problem_id": f"{rec['problem_id']}-{k}", "problem": rec["problem"],
                "path": rec["path"], "reasoning": f"<think>{think}</think><answer>{answer}</answer>",
                "score": quality(stated, answer, rows, hacked=hacked),
                "true_score": quality(stated, answer, rows), "data_source": rec["data_source"],
            }))
    out.write_text("\n".join(lines) + "\n")
    return out
