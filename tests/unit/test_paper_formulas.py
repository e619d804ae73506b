"""SophiaVL-R1's Trust-GRPO formulas on hand-computed groups.

    R_i = R^o_i + γ · α · e^(−step/T) · R^t_i,   γ = 1 if μc ≥ μw else e^(μc − μw)

Every expected number below is written out by hand (math.exp of explicit values); none
is computed by the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sophiavl_mcore.rewards.config import TrustGRPOConfig
from sophiavl_mcore.rewards.trust_grpo import trust_grpo

NAN = float("nan")


def test_paper_default_alpha_is_0_3():
    assert TrustGRPOConfig().alpha == 0.3
    assert TrustGRPOConfig().correct_threshold == 0.5
    assert TrustGRPOConfig().unpaired_gamma == 1.0


def test_gamma_decays_when_wrong_answers_think_better():
    # correct: 0.2, 0.4 -> μc = 0.3 ; wrong: 0.9, 0.7 -> μw = 0.8 ; γ = e^(0.3 − 0.8)
    res = trust_grpo([1, 1, 0, 0], [0.2, 0.4, 0.9, 0.7], group_size=4, step=100, total_steps=400)
    gamma = math.exp(-0.5)
    anneal = math.exp(-0.25)
    assert res.mu_correct[0] == pytest.approx(0.3, abs=1e-15)
    assert res.mu_wrong[0] == pytest.approx(0.8, abs=1e-15)
    assert res.gamma[0] == pytest.approx(gamma, rel=1e-14)
    assert res.annealing == pytest.approx(anneal, rel=1e-15)
    expected = [
        1 + gamma * 0.3 * anneal * 0.2,
        1 + gamma * 0.3 * anneal * 0.4,
        0 + gamma * 0.3 * anneal * 0.9,
        0 + gamma * 0.3 * anneal * 0.7,
    ]
    np.testing.assert_allclose(res.reward, expected, rtol=1e-14)


def test_gamma_is_one_when_correct_answers_think_better_or_equal():
    # group 0: μc = 0.8 > μw = 0.2 ; group 1: μc = μw = 0.5
    res = trust_grpo(
        [1, 0, 1, 0, 1, 0],
        [0.9, 0.1, 0.7, 0.3, 0.5, 0.5],
        group_ids=[0, 0, 0, 0, 1, 1],
        step=0,
        total_steps=10,
    )
    assert res.gamma.tolist() == [1.0, 1.0]
    # step 0 -> annealing e^0 = 1
    np.testing.assert_allclose(
        res.reward,
        [1 + 0.3 * 0.9, 0.3 * 0.1, 1 + 0.3 * 0.7, 0.3 * 0.3, 1 + 0.15, 0.15],
        rtol=1e-14,
    )


def test_annealing_factor_is_exp_minus_step_over_total():
    for step, total, expected in [
        (0, 100, 1.0),
        (50, 100, math.exp(-0.5)),
        (300, 100, math.exp(-3.0)),
    ]:
        res = trust_grpo([1.0, 0.0], [1.0, 0.0], group_size=2, step=step, total_steps=total)
        assert res.annealing == pytest.approx(expected, rel=1e-15)
        assert res.reward[0] == pytest.approx(1 + 0.3 * expected, rel=1e-14)


def test_correct_threshold_is_inclusive():
    # 0.5 is correct (>= 0.5), 0.49 is wrong: μc = 0.1, μw = 0.6 -> γ = e^(−0.5)
    res = trust_grpo([0.5, 0.49], [0.1, 0.6], group_size=2, step=0, total_steps=1)
    assert res.gamma[0] == pytest.approx(math.exp(-0.5), rel=1e-14)
    # with threshold 0.4 both are correct: an unpaired group, γ = unpaired_gamma
    cfg = TrustGRPOConfig(correct_threshold=0.4, unpaired_gamma=0.5)
    res = trust_grpo([0.5, 0.49], [0.1, 0.6], group_size=2, step=0, total_steps=1, config=cfg)
    assert res.gamma[0] == 0.5 and np.isnan(res.mu_wrong[0])


def test_unpaired_groups_use_unpaired_gamma():
    # all wrong: the thinking reward is the only signal separating the responses
    res = trust_grpo([0, 0, 0], [0.1, 0.5, 0.9], group_size=3, step=0, total_steps=1)
    assert res.gamma[0] == 1.0
    assert np.isnan(res.mu_correct[0]) and res.mu_wrong[0] == pytest.approx(0.5)
    np.testing.assert_allclose(res.reward, [0.03, 0.15, 0.27], rtol=1e-14)
    # all correct, custom policy
    cfg = TrustGRPOConfig(unpaired_gamma=0.5, use_annealing=False)
    res = trust_grpo([1, 1], [0.2, 0.4], group_size=2, step=7, total_steps=10, config=cfg)
    assert res.gamma[0] == 0.5
    np.testing.assert_allclose(res.reward, [1 + 0.5 * 0.3 * 0.2, 1 + 0.5 * 0.3 * 0.4], rtol=1e-14)


def test_missing_scores_are_excluded_from_means_and_contribute_zero():
    # correct scored: 0.1 ; wrong scored: 0.5 ; NaNs ignored -> γ = e^(0.1 − 0.5)
    res = trust_grpo([1, 1, 0, 0], [0.1, NAN, 0.5, NAN], group_size=4, step=0, total_steps=1)
    gamma = math.exp(-0.4)
    assert res.gamma[0] == pytest.approx(gamma, rel=1e-14)
    assert res.mu_correct[0] == pytest.approx(0.1) and res.mu_wrong[0] == pytest.approx(0.5)
    np.testing.assert_allclose(
        res.reward, [1 + gamma * 0.3 * 0.1, 1.0, 0 + gamma * 0.3 * 0.5, 0.0], rtol=1e-14
    )


def test_group_whose_wrong_members_are_all_unscored_is_unpaired():
    cfg = TrustGRPOConfig(unpaired_gamma=0.25)
    res = trust_grpo([1, 0, 0], [0.4, NAN, NAN], group_size=3, step=0, total_steps=1, config=cfg)
    assert res.gamma[0] == 0.25 and np.isnan(res.mu_wrong[0])
    np.testing.assert_allclose(res.reward, [1 + 0.25 * 0.3 * 0.4, 0.0, 0.0], rtol=1e-14)


def test_ablation_without_trust_gamma_is_one():
    cfg = TrustGRPOConfig(use_trust=False)
    res = trust_grpo([1, 0], [0.0, 1.0], group_size=2, step=0, total_steps=1, config=cfg)
    assert res.gamma[0] == 1.0  # would be e^(−1) with trust
    np.testing.assert_allclose(res.reward, [1.0, 0.3], rtol=1e-14)


def test_ablation_without_annealing_factor_is_one():
    cfg = TrustGRPOConfig(use_annealing=False)
    res = trust_grpo([1, 0], [0.5, 0.5], group_size=2, step=90, total_steps=100, config=cfg)
    assert res.annealing == 1.0
    np.testing.assert_allclose(res.reward, [1.15, 0.15], rtol=1e-14)


def test_ablation_without_thinking_is_plain_grpo():
    cfg = TrustGRPOConfig(use_thinking=False)
    res = trust_grpo([1, 0, 0.3], [0.0, 1.0, 0.5], group_size=3, step=0, total_steps=1, config=cfg)
    assert res.reward.tolist() == [1.0, 0.0, 0.3]
    # γ is still reported: μc = 0.0, μw = 0.75
    assert res.gamma[0] == pytest.approx(math.exp(-0.75), rel=1e-14)


def test_alpha_scales_linearly():
    cfg = TrustGRPOConfig(alpha=0.6, use_annealing=False)
    res = trust_grpo([0.0, 1.0], [0.5, 0.5], group_size=2, step=0, total_steps=1, config=cfg)
    np.testing.assert_allclose(res.reward, [0.3, 1.3], rtol=1e-14)
