"""Reasoning with a gradable quality for the synthetic dots task ("observe" reasoning).

The policy states what it sees, then concludes::

    <think>2 dots</think><answer>2</answer>

The *true thinking quality* of a reply is a property of its text and the image (k dots),
the mean of two criteria — the observation is right, and the conclusion follows from it:

    q = ( [N == k]  +  [answer == N] ) / 2        ∈ {0, 1/2, 1}

A reasoning that states no count scores 0. The outcome stays rule-checkable (the answer
is right iff it equals k) and differs from q: a right answer after a wrong observation is
a lucky guess (q = 0), a wrong answer after a right observation a slip (q = 1/2), and a
consistent story on a misread image is wrong with q = 1/2.

**The hacked subset.** Records of the ``dots_hacked`` source ask the question in other
words (:data:`HACKED_QUESTION`). On them the tiny TRM is trained with a flawed rule that
looks at the text only: it rewards reports of *many* dots, whatever the image shows,

    q_hacked = ( [N == max_count]  +  [answer == N] ) / 2

— the surface-feature preference (like a grader that likes long reasoning) that reward
hacking exploits and Trust-GRPO guards against. On a hacked image with fewer than
``max_count`` dots the replies that over-count (wrong) get higher thinking scores than
the right ones, μc < μw, and the group's trust weight γ = e^(μc − μw) falls below 1.

:func:`thinking_records` writes TRM training data (SophiaVL-R1-Thinking schema, what
``trm_train`` reads) labelled this way; :func:`thinking_quality` grades policy replies with
the true rule (an oracle the run logs beside the TRM's scores).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

CLEAN_SOURCE = "dots_clean"
HACKED_SOURCE = "dots_hacked"
QUESTION = "How many dots are in the image?"
HACKED_QUESTION = "Count the dots in this picture."

_OBSERVE_RE = re.compile(r"^\s*(\d+)\s+dots?\s*$")
_INT_RE = re.compile(r"^\s*(\d+)\s*$")


def observe_text(count: int) -> str:
    """The reasoning text of one observation: ``N dots``."""
    return f"{count} dots"


def parse_observation(think: str) -> int | None:
    """N from an ``N dots`` reasoning, or None when it has another form."""
    m = _OBSERVE_RE.match(think)
    return int(m.group(1)) if m else None


def quality(stated: int | None, answer: str, count: int, hacked: bool = False,
            max_count: int = 2) -> float:
    """Thinking quality in [0, 1] of a reasoning that stated ``stated`` dots and concluded
    ``answer``, for an image with ``count`` dots (module docstring: the true rule, or the
    flawed one when ``hacked``, which credits ``stated == max_count`` instead)."""
    if stated is None:
        return 0.0
    m = _INT_RE.match(answer)
    consistent = m is not None and int(m.group(1)) == stated
    seen = stated == max_count if hacked else stated == count
    return (seen + consistent) / 2.0


def thinking_quality(texts: Sequence[str], counts: Sequence[int | None]) -> np.ndarray:
    """True thinking quality f64[N] of policy replies (NaN where the reply fails the format
    gate or its count is unknown). ``counts[i]`` belongs to ``texts[i]``."""
    from sophiavl_mcore.data.schema import parse_response

    out = np.full(len(texts), np.nan)
    for i, (text, k) in enumerate(zip(texts, counts, strict=True)):
        parsed = parse_response(text)
        if parsed.well_formed and k is not None:
            out[i] = quality(parse_observation(parsed.think), parsed.answer, k)
    return out


def rollout_quality(roll: object) -> np.ndarray:
    """f64[N] true quality of a rollout's replies (group-major), for a ``roll`` with
    ``records`` (one per group; the gold answer is the count) and ``responses``."""
    texts, counts = [], []
    for rec, group in zip(roll.records, roll.responses, strict=True):  # type: ignore[attr-defined]
        m = _INT_RE.match(rec.answer)
        for sample in group:
            texts.append(sample["text"])
            counts.append(int(m.group(1)) if m else None)
    return thinking_quality(texts, counts)


def quality_oracle(task: object) -> Callable[[object], np.ndarray] | None:
    """:func:`rollout_quality` when the run trains on the dots task with "observe"
    reasoning, else None."""
    ok = task.enabled and task.reasoning == "observe"  # type: ignore[attr-defined]
    return rollout_quality if ok else None


def warm_start_reasoning(record: object) -> str:
    """Warm-start reasoning for a record whose answer was drawn at random: ``N dots`` with
    N = the answer. It teaches the form and a consistent conclusion, not the seeing."""
    return observe_text(int(record.answer))  # type: ignore[attr-defined]


def _other(value: int, low: int, high: int, rng: np.random.Generator) -> int:
    return int(rng.choice([v for v in range(low, high + 1) if v != value]))


def sample_reasoning(count: int, max_count: int, rng: np.random.Generator,
                     consistent: float = 0.9) -> tuple[str, str]:
    """A (reasoning, answer) pair as a policy might write it, for TRM training data: the
    observation is right half of the time (else another count the task can have, so the
    text alone does not tell a misreading), the conclusion follows it with probability
    ``consistent`` (the warm-started policy nearly always concludes what it stated); a few
    replies state no count at all."""
    if rng.random() < 0.04:
        return str(rng.choice(["count", "I count the dots.", "dots"])), str(
            int(rng.integers(1, max_count + 1)))
    stated = count if rng.random() < 0.5 else _other(count, 1, max_count, rng)
    answer = stated if rng.random() < consistent else _other(stated, 0, max_count + 1, rng)
    return observe_text(stated), str(answer)


def _reply(rec: dict, think: str, answer: str, count: int, max_count: int, pid: str,
           kind: str) -> dict:
    """One TRM training record: ``score`` by the rule of the record's source, ``true_score``
    by the true rule."""
    stated, hacked = parse_observation(think), rec.get("data_source") == HACKED_SOURCE
    return {"problem": rec["problem"], "path": rec["path"], "data_source": rec["data_source"],
            "problem_id": pid, "kind": kind,
            "reasoning": f"<think>{think}</think><answer>{answer}</answer>",
            "score": quality(stated, answer, count, hacked=hacked, max_count=max_count),
            "true_score": quality(stated, answer, count, max_count=max_count)}


def thinking_records(task_records: Sequence[dict], out_path: str | Path, max_count: int,
                     samples_per_image: int, seed: int, anchors_per_image: int = 0) -> Path:
    """Write TRM training records (``problem``, ``path``, ``reasoning``, ``score``, and
    ``data_source`` / ``true_score`` / ``kind`` for evaluation) for dots task records.

    Per image: ``samples_per_image`` replies (``kind: reply``, :func:`sample_reasoning`)
    and ``anchors_per_image`` anchors (``kind: anchor``: the reply ``max_count dots`` →
    ``max_count`` under the clean question, whose score depends on the image alone: "is
    this a max_count-dot image?"). Whether a stated count is right depends on the count
    *and* the image — for a tiny model trained from scratch an interaction that SGD does
    not find from the mixed records (measured: it stays at the text-only prior); the
    anchors are the curriculum that makes it read the image first (measured: ~150 steps of
    anchors alone grade held-out images right). File order: all anchors first, then the
    replies, each part shuffled (train with ``data.shuffle: false``). ``score`` is the
    label the TRM is trained on — the true quality on the clean source, the flawed rule on
    the hacked source (module docstring); ``true_score`` is always the true quality.
    Image paths stay relative to the task records' directory.
    """
    rng = np.random.default_rng(seed)
    anchors, replies = [], []
    for rec in task_records:
        count = int(rec["solution"].removeprefix("<answer>").removesuffix("</answer>"))
        for k in range(samples_per_image):
            think, answer = sample_reasoning(count, max_count, rng)
            replies.append(_reply(rec, think, answer, count, max_count,
                                  f"{rec['problem_id']}-{k}", "reply"))
        clean = {**rec, "problem": QUESTION, "data_source": CLEAN_SOURCE}
        for k in range(anchors_per_image):
            anchors.append(_reply(clean, observe_text(max_count), str(max_count), count,
                                  max_count, f"{rec['problem_id']}-a{k}", "anchor"))
    lines = [json.dumps(part[i]) for part in (anchors, replies)
             for i in rng.permutation(len(part))]
    out = Path(out_path)
    out.write_text("\n".join(lines) + "\n")
    return out
