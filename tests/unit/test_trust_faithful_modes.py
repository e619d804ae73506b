"""The published code's modes of Trust-GRPO on hand-made groups, against the formulas.

Every expected number is written out by hand from R = R^o + γ·α·e^(−step/T)·R^t with
γ = min(1, e^(μc − μw)); none is computed by the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sophiavl_mcore.rewards.config import TrustGRPOConfig
from sophiavl_mcore.rewards.trust_grpo import needs_thinking_score, trust_grpo

NO_ANNEAL = dict(use_annealing=False, alpha=0.3)


def _run(outcome, thinking, **cfg):
    kw = {**NO_ANNEAL, **cfg}
    return trust_grpo(outcome, thinking, group_size=4, step=0, total_steps=10,
                      config=TrustGRPOConfig(**kw))


def test_paper_default_scores_every_response() -> None:
    # correct: 0.6, 0.4 -> mu_c 0.5; wrong: 0.9, 0.7 -> mu_w 0.8; gamma = e^-0.3
    res = _run([1, 1, 0, 0], [0.6, 0.4, 0.9, 0.7])
    g = 0.7408182206817179
    assert res.gamma[0] == pytest.approx(g, abs=1e-12)
    np.testing.assert_allclose(res.reward, [1 + g * 0.3 * 0.6, 1 + g * 0.3 * 0.4,
                                            g * 0.3 * 0.9, g * 0.3 * 0.7], atol=1e-12)


def test_min_outcome_zeroes_low_outcomes_and_makes_gamma_one() -> None:
    # Published code (0.2): the wrong replies get R^t = 0, so mu_w = 0 <= mu_c = 0.5, gamma 1.
    res = _run([1, 1, 0, 0], [0.6, 0.4, 0.9, 0.7], thinking_min_outcome=0.2)
    assert res.gamma[0] == 1.0
    assert res.mu_wrong[0] == 0.0 and res.mu_correct[0] == pytest.approx(0.5)
    np.testing.assert_allclose(res.reward, [1.18, 1.12, 0.0, 0.0], atol=1e-12)
    # A partial outcome at the threshold keeps its score; one below it (0.1) does not,
    # even when the TRM had no score for it (NaN -> 0).
    res = _run([0.2, 0.1, 1, 0.1], [0.5, np.nan, 0.3, 0.8], thinking_min_outcome=0.2)
    # correct (>= 0.5): 0.3 -> mu_c 0.3; wrong: 0.5 (kept), 0, 0 -> mu_w 1/6; gamma 1
    assert res.mu_wrong[0] == pytest.approx(0.5 / 3) and res.gamma[0] == 1.0
    np.testing.assert_allclose(res.reward, [0.2 + 0.15, 0.1, 1.09, 0.1], atol=1e-12)


def test_skip_uniform_groups() -> None:
    outcome = [1, 0.95, 0.9, 1,      # all >= 0.9: skipped
               0, 0.1, 0.05, 0,      # all <= 0.1: skipped
               1, 0, 0.95, 0.1]      # mixed: thinking reward as usual
    thinking = [0.5, 0.5, 0.5, 0.5, 0.9, 0.9, 0.9, 0.9, 0.2, 0.8, 0.4, 0.6]
    res = _run(outcome, thinking, skip_uniform_groups=True)
    assert res.skipped.tolist() == [True, True, False]
    np.testing.assert_allclose(res.reward[:8], outcome[:8], atol=0)
    # group 2: mu_c = (0.2 + 0.4) / 2 = 0.3, mu_w = (0.8 + 0.6) / 2 = 0.7, gamma = e^-0.4
    g = 0.6703200460356393
    assert res.gamma[2] == pytest.approx(g, abs=1e-12)
    np.testing.assert_allclose(res.reward[8:], [1 + g * 0.06, g * 0.24, 0.95 + g * 0.12,
                                                0.1 + g * 0.18], atol=1e-12)
    # Off (the paper): the all-correct group gets gamma 1 (unpaired) and 0.3 * 0.5 on top.
    off = _run(outcome, thinking)
    assert not off.skipped.any()
    np.testing.assert_allclose(off.reward[:4], np.array(outcome[:4]) + 0.15, atol=1e-12)
    # Other bounds: 0.95 is not >= 0.99, so group 0 is no longer skipped.
    res = _run(outcome, thinking, skip_uniform_groups=True, skip_high=0.99)
    assert res.skipped.tolist() == [False, True, False]


@pytest.mark.parametrize("threshold, gamma", [
    # outcome [0.6, 0.4, 0.8, 0.2], thinking [0.5, 0.9, 0.3, 0.1]
    (0.5, math.exp(-0.1)),   # mu_c = (0.5+0.3)/2 = 0.4, mu_w = (0.9+0.1)/2 = 0.5
    (0.7, math.exp(-0.2)),   # mu_c = 0.3, mu_w = (0.5+0.9+0.1)/3 = 0.5
    (0.3, 1.0),              # mu_c = (0.5+0.9+0.3)/3 = 0.567 >= mu_w = 0.1
])
def test_correct_threshold(threshold: float, gamma: float) -> None:
    res = _run([0.6, 0.4, 0.8, 0.2], [0.5, 0.9, 0.3, 0.1], correct_threshold=threshold)
    assert res.gamma[0] == pytest.approx(gamma, abs=1e-12)
    np.testing.assert_allclose(res.reward, np.array([0.6, 0.4, 0.8, 0.2])
                               + gamma * 0.3 * np.array([0.5, 0.9, 0.3, 0.1]), atol=1e-12)


def test_annealing_horizon_total_or_fixed() -> None:
    outcome, thinking = [1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]  # mu_c = mu_w: gamma 1
    total = trust_grpo(outcome, thinking, group_size=4, step=10, total_steps=100)
    assert total.annealing == pytest.approx(0.9048374180359595, abs=1e-15)  # e^(-10/100)
    fixed = trust_grpo(outcome, thinking, group_size=4, step=10, total_steps=100,
                       config=TrustGRPOConfig(annealing_steps=20))
    assert fixed.annealing == pytest.approx(0.6065306597126334, abs=1e-15)  # e^(-10/20)
    np.testing.assert_allclose(fixed.reward, [1 + 0.3 * 0.6065306597126334 * 0.5] * 2
                               + [0.3 * 0.6065306597126334 * 0.5] * 2, atol=1e-12)


def test_needs_thinking_score() -> None:
    outcome, formed = [1.0, 0.1, 0.2, 0.0], [True, True, True, False]
    assert needs_thinking_score(outcome, formed).tolist() == [True, True, True, False]
    cfg = TrustGRPOConfig(thinking_min_outcome=0.2)
    assert needs_thinking_score(outcome, formed, cfg).tolist() == [True, False, True, False]


@pytest.mark.parametrize("kwargs, match", [
    (dict(annealing_steps=0), "annealing_steps must be > 0"),
    (dict(thinking_min_outcome=float("nan")), "thinking_min_outcome must be finite"),
    (dict(skip_uniform_groups=1), "skip_uniform_groups must be a bool"),
])
def test_faithful_mode_config_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        TrustGRPOConfig(**kwargs)
