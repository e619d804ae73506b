"""The built-in sample batch through the reward stage, under each shipped ablation recipe."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sophiavl_mcore.rewards import demo
from sophiavl_mcore.rewards.outcome import score_outcomes
from sophiavl_mcore.rewards.trust_grpo import trust_grpo

ABLATIONS = Path(__file__).resolve().parents[2] / "examples" / "configs" / "ablations"


def _run(recipe: str | None, step: int = 50, total: int = 100):
    rewards = demo.rewards_from(ABLATIONS / recipe if recipe else None)
    samples, thinking = demo.build_samples()
    outcome = score_outcomes(samples).reward
    result = trust_grpo(outcome, thinking, group_size=demo.GROUP_SIZE, step=step, total_steps=total,
                        config=rewards.trust_grpo)
    return outcome, thinking, result


def test_full_trust_grpo_down_weights_the_untrustworthy_group() -> None:
    outcome, thinking, result = _run(None)
    # Numerical group: correct answers thought 0.6, 0.5; wrong ones 0.9, 0.8 -> gamma = e^(0.55-0.85).
    assert outcome[:4].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert result.gamma[0] == pytest.approx(math.exp(0.55 - 0.85), abs=1e-12)
    assert result.annealing == pytest.approx(math.exp(-0.5), abs=1e-12)
    expected = 1.0 + math.exp(0.55 - 0.85) * 0.3 * math.exp(-0.5) * 0.6
    assert result.reward[0] == pytest.approx(expected, abs=1e-12)


def test_plain_grpo_recipe_gives_outcome_only() -> None:
    outcome, _thinking, result = _run("plain_grpo.yaml")
    np.testing.assert_array_equal(result.reward, outcome)


def test_no_trust_recipe_sets_gamma_one() -> None:
    outcome, thinking, result = _run("no_trust.yaml")
    assert np.all(result.gamma == 1.0)
    scored = ~np.isnan(thinking)
    np.testing.assert_allclose(result.reward[scored], outcome[scored] + 0.3 * math.exp(-0.5) * thinking[scored])


def test_no_annealing_recipe_keeps_full_weight() -> None:
    _outcome, _thinking, result = _run("no_annealing.yaml", step=90)
    assert result.annealing == 1.0


def test_demo_main_prints_tables(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="sophiavl_mcore.demo")
    assert demo.main(["--step", "10", "rewards.trust_grpo.alpha=0.3"]) == 0
    text = caplog.text
    for problem_type in ("numerical", "multiple choice", "OCR", "free-form"):
        assert problem_type in text
    assert "gamma" in text and "annealing=" in text
