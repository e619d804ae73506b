"""Trust-GRPO and group advantages: C++ kernels against the numpy references, and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sophiavl_mcore import _C
from sophiavl_mcore.rewards.config import TrustGRPOConfig
from sophiavl_mcore.rewards.oracle import group_advantages_oracle, trust_grpo_oracle
from sophiavl_mcore.rewards.trust_grpo import (
    TrustGRPOResult,
    group_advantages,
    resolve_groups,
    trust_grpo,
)


def _random_batch(rng: np.random.Generator, n: int, num_groups: int, nan_frac: float):
    outcome = rng.choice([0.0, 0.2, 0.5, 0.7, 1.0], size=n) if rng.random() < 0.5 else rng.random(n)
    thinking = rng.random(n)
    thinking[rng.random(n) < nan_frac] = np.nan
    ids = rng.integers(0, max(num_groups, 1), size=n).astype(np.int64)
    return outcome, thinking, ids


def _assert_same(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 64),
    num_groups=st.integers(1, 9),
    nan_frac=st.sampled_from([0.0, 0.3, 1.0]),
    use_trust=st.booleans(),
    use_annealing=st.booleans(),
    use_thinking=st.booleans(),
    step=st.integers(0, 500),
    unpaired_gamma=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_trust_grpo_matches_reference(
    seed, n, num_groups, nan_frac, use_trust, use_annealing, use_thinking, step, unpaired_gamma
):
    rng = np.random.default_rng(seed)
    outcome, thinking, ids = _random_batch(rng, n, num_groups, nan_frac)
    kwargs = dict(
        correct_threshold=0.5,
        alpha=0.3,
        step=step,
        total_steps=200,
        use_trust=use_trust,
        use_annealing=use_annealing,
        use_thinking=use_thinking,
        unpaired_gamma=unpaired_gamma,
    )
    got = _C.trust_grpo(outcome, thinking, ids, num_groups, *kwargs.values())
    exp = trust_grpo_oracle(outcome, thinking, ids, num_groups, **kwargs)
    for g, e in zip(got[:4], exp[:4], strict=True):
        _assert_same(g, e)
    assert got[4] == pytest.approx(exp[4], rel=1e-15)
    assert got[0].shape == (n,) and got[1].shape == (num_groups,)


def test_trust_grpo_large_batch_parallel_path():
    rng = np.random.default_rng(0)
    outcome, thinking, ids = _random_batch(rng, 200_000, 25_000, 0.1)
    args = (0.5, 0.3, 10, 100, True, True, True, 1.0)
    got = _C.trust_grpo(outcome, thinking, ids, 25_000, *args)
    exp = trust_grpo_oracle(
        outcome[:2000],
        thinking[:2000],
        ids[:2000] % 7,
        7,
        correct_threshold=0.5,
        alpha=0.3,
        step=10,
        total_steps=100,
        use_trust=True,
        use_annealing=True,
        use_thinking=True,
        unpaired_gamma=1.0,
    )
    small = _C.trust_grpo(outcome[:2000], thinking[:2000], ids[:2000] % 7, 7, *args)
    _assert_same(small[0], exp[0])
    # Rewards of the large batch, recomputed from its own gamma.
    t = np.nan_to_num(thinking)
    expected = outcome + got[1][ids] * 0.3 * math.exp(-0.1) * t
    np.testing.assert_allclose(got[0], expected, rtol=1e-12, atol=1e-12)


def test_trust_grpo_empty_batch():
    res = trust_grpo([], [], group_ids=[], step=0, total_steps=10)
    assert res.reward.shape == (0,) and res.gamma.shape == (0,) and res.num_groups == 0
    res = trust_grpo([], None, group_size=4, step=0, total_steps=10)
    assert res.reward.shape == (0,)


def test_python_api_group_size_equals_ids():
    rng = np.random.default_rng(3)
    outcome, thinking, _ = _random_batch(rng, 24, 1, 0.2)
    a = trust_grpo(outcome, thinking, group_size=8, step=5, total_steps=50)
    b = trust_grpo(outcome, thinking, group_ids=np.arange(24) // 8, step=5, total_steps=50)
    assert isinstance(a, TrustGRPOResult) and a.num_groups == 3
    np.testing.assert_array_equal(a.reward, b.reward)
    np.testing.assert_array_equal(a.gamma, b.gamma)


def test_python_api_accepts_lists_and_int_arrays():
    res = trust_grpo(
        [1, 0, 1, 0],
        [0.5, 0.9, 0.4, 0.8],
        group_ids=[0, 0, 1, 1],
        step=0,
        total_steps=1,
        config=TrustGRPOConfig(use_annealing=False),
    )
    assert res.reward.dtype == np.float64
    assert res.gamma == pytest.approx([math.exp(0.5 - 0.9), math.exp(0.4 - 0.8)])


def test_thinking_none_means_plain_outcome():
    res = trust_grpo([1.0, 0.0], None, group_size=2, step=0, total_steps=1)
    np.testing.assert_array_equal(res.reward, [1.0, 0.0])
    assert np.isnan(res.mu_correct).all() and res.gamma[0] == 1.0


def test_explicit_num_groups_with_empty_group():
    res = trust_grpo(
        [1.0, 0.0],
        [0.2, 0.3],
        group_ids=[0, 0],
        num_groups=3,
        step=0,
        total_steps=1,
        config=TrustGRPOConfig(unpaired_gamma=0.25),
    )
    assert res.gamma.shape == (3,) and res.gamma[1] == 0.25 and np.isnan(res.mu_wrong[2])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(outcome=[0.0, np.nan]), r"outcome\[1\] is nan; outcome rewards must be finite"),
        (dict(outcome=[np.inf, 0.0]), r"outcome\[0\] is inf"),
        (dict(thinking=[0.1, np.inf]), r"thinking\[1\] is inf"),
        (dict(thinking=[0.1, 0.2, 0.3]), r"thinking has length 3 but outcome has length 2"),
        (dict(group_ids=[0, -1]), r"group_ids\[1\] is -1"),
        (
            dict(group_ids=[0, 5], num_groups=2),
            r"group_ids\[1\] is 5; group ids must lie in \[0, 2\)",
        ),
        (dict(group_ids=[0]), r"group_ids has length 1"),
        (dict(group_ids=[0.0, 1.0]), r"group_ids must hold integers"),
        (dict(group_ids=None, group_size=-2), r"group_size must be > 0, got -2"),
        (dict(group_ids=None, group_size=0), r"group_size must be > 0, got 0"),
        (
            dict(group_ids=None, group_size=3),
            r"number of responses 2 is not a multiple of group_size 3",
        ),
        (dict(group_size=2), r"exactly one of group_ids and group_size"),
        (dict(group_ids=None), r"exactly one of group_ids and group_size"),
        (dict(total_steps=0), r"total_steps must be > 0, got 0"),
        (dict(step=-1), r"step must be >= 0, got -1"),
        (dict(outcome=[[0.0, 1.0]]), r"outcome must be 1-D"),
        (dict(outcome=["a", "b"]), r"outcome must hold real numbers"),
    ],
)
def test_trust_grpo_errors(kwargs, match):
    base = dict(outcome=[0.0, 1.0], thinking=[0.1, 0.2], group_ids=[0, 0], step=0, total_steps=10)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        trust_grpo(**base)


def test_config_errors():
    with pytest.raises(ValueError, match=r"alpha must be >= 0.0, got -0.1"):
        TrustGRPOConfig(alpha=-0.1)
    with pytest.raises(ValueError, match=r"unpaired_gamma must be finite"):
        TrustGRPOConfig(unpaired_gamma=float("nan"))
    with pytest.raises(ValueError, match=r"std_ddof must be 0 or 1"):
        TrustGRPOConfig(std_ddof=2)


def test_cxx_checks_dtype_and_scalars():
    f = np.zeros(2)
    ids = np.zeros(2, dtype=np.int64)
    with pytest.raises(ValueError, match=r"outcome must have dtype float64, got float32"):
        _C.trust_grpo(f.astype(np.float32), f, ids, 1, 0.5, 0.3, 0, 1, True, True, True, 1.0)
    with pytest.raises(ValueError, match=r"group_ids must have dtype int64, got int32"):
        _C.trust_grpo(f, f, ids.astype(np.int32), 1, 0.5, 0.3, 0, 1, True, True, True, 1.0)
    with pytest.raises(ValueError, match=r"must be C-contiguous"):
        _C.trust_grpo(np.zeros(4)[::2], f, ids, 1, 0.5, 0.3, 0, 1, True, True, True, 1.0)
    with pytest.raises(ValueError, match=r"alpha must be finite and >= 0, got -1"):
        _C.trust_grpo(f, f, ids, 1, 0.5, -1.0, 0, 1, True, True, True, 1.0)
    with pytest.raises(ValueError, match=r"same length, got 2, 2 and 1"):
        _C.trust_grpo(f, f, ids[:1], 1, 0.5, 0.3, 0, 1, True, True, True, 1.0)


# ---------------------------------------------------------------- advantages


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 48),
    num_groups=st.integers(1, 8),
    scale_by_std=st.booleans(),
    std_ddof=st.sampled_from([0, 1]),
    discrete=st.booleans(),
)
def test_group_advantages_match_reference(seed, n, num_groups, scale_by_std, std_ddof, discrete):
    rng = np.random.default_rng(seed)
    rewards = rng.choice([0.0, 0.1, 1.0], size=n) if discrete else rng.normal(size=n)
    ids = rng.integers(0, num_groups, size=n).astype(np.int64)
    got = _C.group_advantages(rewards, ids, num_groups, 1e-6, scale_by_std, std_ddof)
    exp = group_advantages_oracle(
        rewards, ids, num_groups, eps=1e-6, scale_by_std=scale_by_std, std_ddof=std_ddof
    )
    np.testing.assert_allclose(got, exp, rtol=1e-10, atol=1e-12)


def test_group_advantages_hand_values():
    # group 0: [1, 0, 0, 1] mean 0.5, unbiased std sqrt(1/3); group 1: one member; group 2: equal
    rewards = [1.0, 0.0, 0.0, 1.0, 0.7, 0.1, 0.1, 0.1]
    ids = [0, 0, 0, 0, 1, 2, 2, 2]
    cfg = TrustGRPOConfig(adv_eps=0.0)
    adv = group_advantages(rewards, group_ids=ids, config=cfg)
    s = math.sqrt(1.0 / 3.0)
    np.testing.assert_allclose(adv, [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0], rtol=1e-12)
    assert adv[5:].tolist() == [0.0, 0.0, 0.0]  # exactly 0 for an all-equal group
    dr = group_advantages(rewards, group_ids=ids, config=TrustGRPOConfig(scale_by_std=False))
    np.testing.assert_allclose(dr, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], atol=1e-15)
    pop = group_advantages(
        rewards[:4], group_size=4, config=TrustGRPOConfig(std_ddof=0, adv_eps=0.0)
    )
    np.testing.assert_allclose(pop, [1, -1, -1, 1], rtol=1e-12)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match=r"rewards\[1\] is nan; rewards must be finite"):
        group_advantages([0.0, np.nan], group_size=2)
    with pytest.raises(ValueError, match=r"group_ids\[0\] is -3"):
        group_advantages([0.0, 1.0], group_ids=[-3, 0])
    with pytest.raises(ValueError, match=r"not a multiple of group_size 4"):
        group_advantages([0.0, 1.0], group_size=4)
    with pytest.raises(ValueError, match=r"std_ddof must be 0 or 1, got 3"):
        _C.group_advantages(np.zeros(2), np.zeros(2, dtype=np.int64), 1, 1e-6, True, 3)
    with pytest.raises(ValueError, match=r"eps must be finite and >= 0"):
        _C.group_advantages(np.zeros(2), np.zeros(2, dtype=np.int64), 1, -1.0, True, 1)


def test_resolve_groups():
    ids, g = resolve_groups(6, None, 3)
    assert ids.tolist() == [0, 0, 0, 1, 1, 1] and g == 2
    ids, g = resolve_groups(3, [2, 0, 2], None)
    assert ids.dtype == np.int64 and g == 3
    with pytest.raises(ValueError, match=r"group_size must be an int"):
        resolve_groups(4, None, 2.0)
