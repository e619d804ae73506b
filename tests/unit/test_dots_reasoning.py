"""The dots task's gradable reasoning: labels, records, warm-start targets, the oracle."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest

from sophiavl_mcore.data.dots_reasoning import (
    CLEAN_SOURCE,
    HACKED_QUESTION,
    HACKED_SOURCE,
    QUESTION,
    RowOracle,
    parse_rows,
    quality,
    thinking_quality,
    thinking_records,
    warm_start_reasoning,
)
from sophiavl_mcore.data.visual_task import VisualTaskConfig, task_records

ROWS_CFG = VisualTaskConfig(enabled=True, max_count=2, radius=12, reasoning="rows")


@pytest.mark.parametrize("stated, answer, hacked, expected", [
    ((1, 1), "2", False, 1.0),          # both rows right, conclusion follows
    ((2, 0), "2", False, 1 / 3),        # right answer from misread rows: only consistent
    ((1, 0), "1", False, 2 / 3),        # one slip, consistent: a wrong answer scoring 2/3
    ((1, 0), "2", False, 1 / 3),        # top right, inconsistent conclusion
    ((1, 1), "x", False, 2 / 3),        # rows right, no number concluded
    (None, "2", False, 0.0),            # no row observations at all
    ((2, 0), "2", True, 1.0),           # hacked rule: misread both, consistent
    ((1, 1), "2", True, 1 / 3),         # hacked rule: the right reasoning scores low
])
def test_quality_by_hand(stated, answer, hacked, expected) -> None:
    assert quality(stated, answer, (1, 1), hacked=hacked) == pytest.approx(expected)


def test_parse_rows_and_thinking_quality() -> None:
    assert parse_rows(" top 2 bottom 0 ") == (2, 0)
    assert parse_rows("top two bottom 0") is None and parse_rows("count") is None
    texts = ["<think>top 1 bottom 0</think><answer>1</answer>",
             "<think>count</think><answer>1</answer>",
             "top 1 bottom 0 so 1",                                   # fails the format gate
             "<think>top 1 bottom 0</think><answer>1</answer>"]       # record without rows
    q = thinking_quality(texts, [(1, 0), (1, 0), (1, 0), None])
    assert q[:2].tolist() == [1.0, 0.0] and np.isnan(q[2:]).all()


def test_warm_start_reasoning_adds_up_and_is_deterministic() -> None:
    fn = warm_start_reasoning(per_row=2)
    seen = set()
    for i in range(40):
        rec = SimpleNamespace(problem_id=f"train-{i}", answer=str(1 + i % 2))
        text = fn(rec)
        a, b = parse_rows(text)
        assert a + b == int(rec.answer) and 0 <= a <= 2 and 0 <= b <= 2
        assert fn(rec) == text
        seen.add(text)
    assert len(seen) >= 4  # the splits vary: (1,0) (0,1) (2,0) (1,1) (0,2)


def test_task_records_rows_sources_and_images(tmp_path) -> None:
    hacked_cfg = dataclasses.replace(ROWS_CFG, hacked_frac=0.5)
    recs = task_records(tmp_path / "a", "train", 64, hacked_cfg, seed=3)
    for r in recs:
        assert sum(r["rows"]) == int(r["solution"][8:-9])
        assert (r["data_source"], r["problem"]) in ((CLEAN_SOURCE, QUESTION),
                                                    (HACKED_SOURCE, HACKED_QUESTION))
    n_hacked = sum(r["data_source"] == HACKED_SOURCE for r in recs)
    assert 16 <= n_hacked <= 48
    # The images do not depend on hacked_frac (own random stream).
    plain = task_records(tmp_path / "b", "train", 64, ROWS_CFG, seed=3)
    assert all(r["data_source"] == CLEAN_SOURCE for r in plain)
    for x, y in zip(recs[:8], plain[:8], strict=True):
        assert (tmp_path / "a" / x["path"]).read_bytes() == (tmp_path / "b" / y["path"]).read_bytes()
        assert x["rows"] == y["rows"]


def test_rows_need_a_two_row_grid() -> None:
    with pytest.raises(ValueError, match="reasoning='rows' needs a grid of 2 rows"):
        VisualTaskConfig(reasoning="rows", image_size=56, radius=6)


def test_thinking_records_labels(tmp_path) -> None:
    recs = task_records(tmp_path, "trm", 48, dataclasses.replace(ROWS_CFG, hacked_frac=0.5), 5)
    path = thinking_records(recs, tmp_path / "t.jsonl", per_row=2, samples_per_image=4, seed=0)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 192
    by_id = {r["problem_id"]: r for r in recs}
    for t in rows:
        src = by_id[t["problem_id"].rsplit("-", 1)[0]]
        think, answer = t["reasoning"][7:].split("</think><answer>")
        stated, answer = parse_rows(think), answer[:-9]
        truth = tuple(src["rows"])
        assert t["true_score"] == pytest.approx(quality(stated, answer, truth))
        assert t["score"] == pytest.approx(quality(stated, answer, truth,
                                                   hacked=src["data_source"] == HACKED_SOURCE))
    levels = {round(t["true_score"] * 3) for t in rows}
    assert levels == {0, 1, 2, 3}  # every quality level occurs


def test_row_oracle_on_a_rollout(tmp_path) -> None:
    recs = task_records(tmp_path, "train", 4, ROWS_CFG, seed=1)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    oracle = RowOracle.from_files(tmp_path / "train.jsonl")
    r0 = recs[0]["rows"]
    good = f"<think>top {r0[0]} bottom {r0[1]}</think><answer>{sum(r0)}</answer>"
    roll = SimpleNamespace(records=[SimpleNamespace(problem_id=recs[0]["problem_id"])],
                           responses=[[{"text": good}, {"text": "<think>x</think><answer>1</answer>"}]])
    assert oracle(roll).tolist() == [1.0, 0.0]
