"""Trust-GRPO reward aggregation and GRPO advantages (Python API over ``_C``).

SophiaVL-R1 (arXiv 2505.17018) rewards response i of group g as

    R_i = R^o_i + γ_g · α · e^(−step/T) · R^t_i

- R^o: rule-based outcome reward; the response is *correct* iff R^o ≥ correct_threshold.
- R^t: thinking reward from the Thinking Reward Model; NaN marks a missing score, which
  is left out of the group means and contributes 0 to R_i.
- γ_g (Trust-GRPO): μc, μw = mean R^t of the scored correct / wrong members of g;
  γ = 1 if μc ≥ μw else e^(μc − μw).
- Unpaired groups (no scored correct member, or no scored wrong member, e.g. all wrong):
  γ = ``unpaired_gamma`` (default 1.0). The paper leaves this case open; 1.0 keeps the
  thinking reward at full weight, which matters most in an all-wrong group, where it is
  the only signal that separates the responses (their outcome rewards are all equal).
- Annealing: e^(−step/T) with T = total_steps, or a fixed T (``annealing_steps``).

Ablation switches: ``use_trust=False`` ⇒ γ = 1; ``use_annealing=False`` ⇒ factor 1;
``use_thinking=False`` ⇒ R = R^o (plain GRPO; γ and μ are still reported).

Faithful modes (how the published code differs from the paper; defaults: the paper's):

- ``thinking_min_outcome=θ`` (published code: 0.2): only responses with R^o ≥ θ keep
  their thinking score; the others get R^t = 0, *counted* as 0 in μc/μw (the published
  code sends them to the TRM not at all). With binary outcomes and θ ≤ the correct
  threshold every wrong response then has R^t = 0, so μw = 0 ≤ μc and γ ≡ 1.
- ``skip_uniform_groups=True`` (published code): a group whose outcomes are all ≥
  ``skip_high`` (0.9) or all ≤ ``skip_low`` (0.1) gets no thinking reward (R = R^o);
  its γ is still computed and reported, and :attr:`TrustGRPOResult.skipped` marks it.
- ``correct_threshold`` (0.5): which responses count as correct for μc/μw.
- ``annealing_steps`` (None): T of e^(−step/T); None = the run's total steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from sophiavl_mcore import _C
from sophiavl_mcore.checks import check_int
from sophiavl_mcore.rewards.config import TrustGRPOConfig

__all__ = [
    "TrustGRPOResult",
    "group_advantages",
    "needs_thinking_score",
    "resolve_groups",
    "trust_grpo",
    "uniform_groups",
]

logger = logging.getLogger(__name__)


@dataclass
class TrustGRPOResult:
    """Output of :func:`trust_grpo`.

    Attributes:
        reward: f64[N] final rewards R_i.
        gamma: f64[G] trust weight per group.
        mu_correct: f64[G] mean thinking score of scored correct members (NaN if none).
        mu_wrong: f64[G] mean thinking score of scored wrong members (NaN if none).
        annealing: the factor e^(−step/T) applied (1.0 when annealing is off).
        num_groups: G.
        skipped: bool[G] groups left without thinking reward by ``skip_uniform_groups``.
        thinking: f64[N] the thinking scores used (after ``thinking_min_outcome``).
    """

    reward: np.ndarray
    gamma: np.ndarray
    mu_correct: np.ndarray
    mu_wrong: np.ndarray
    annealing: float
    num_groups: int
    skipped: np.ndarray | None = None
    thinking: np.ndarray | None = None


def _as_1d(values: ArrayLike, name: str, dtype: type) -> np.ndarray:
    """Converts an array-like to a contiguous 1-D array of ``dtype``."""
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D array of numbers: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if dtype is np.int64:
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    elif arr.size and not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


def resolve_groups(
    n: int,
    group_ids: ArrayLike | None,
    group_size: int | None,
    num_groups: int | None = None,
) -> tuple[np.ndarray, int]:
    """Group ids i64[n] and the group count G from exactly one of ``group_ids`` /
    ``group_size``.

    ``group_size=k`` means consecutive blocks of k responses: ids = arange(n) // k.
    With ``group_ids``, G is ``num_groups`` when given, else max(id) + 1 (0 when n = 0).
    """
    if (group_ids is None) == (group_size is None):
        raise ValueError("pass exactly one of group_ids and group_size")
    if group_size is not None:
        k = check_int("group_size", group_size)
        if k <= 0:
            raise ValueError(f"group_size must be > 0, got {k}")
        if n % k != 0:
            raise ValueError(f"the number of responses {n} is not a multiple of group_size {k}")
        if num_groups is not None and check_int("num_groups", num_groups) != n // k:
            raise ValueError(
                f"num_groups={num_groups} disagrees with {n} responses / group_size {k}"
            )
        return np.arange(n, dtype=np.int64) // k, n // k
    ids = _as_1d(group_ids, "group_ids", np.int64)
    if len(ids) != n:
        raise ValueError(f"group_ids has length {len(ids)} but there are {n} responses")
    if num_groups is None:
        num_groups = int(ids.max()) + 1 if n else 0
    else:
        num_groups = check_int("num_groups", num_groups)
        if num_groups < 0:
            raise ValueError(f"num_groups must be >= 0, got {num_groups}")
    return ids, max(num_groups, 0)


def trust_grpo(
    outcome: ArrayLike,
    thinking: ArrayLike | None,
    *,
    group_ids: ArrayLike | None = None,
    group_size: int | None = None,
    num_groups: int | None = None,
    step: int,
    total_steps: int,
    config: TrustGRPOConfig | None = None,
) -> TrustGRPOResult:
    """Trust-GRPO rewards R_i = R^o_i + γ_g · α · e^(−step/T) · R^t_i.

    Args:
        outcome: [N] outcome rewards R^o (finite).
        thinking: [N] thinking rewards R^t in [0, 1], NaN = missing; None = all missing.
        group_ids: [N] integer group of each response (or use ``group_size``).
        group_size: k responses per group, consecutive (ids = arange(N) // k).
        num_groups: G when ``group_ids`` is given (default max id + 1).
        step: current optimizer step (≥ 0).
        total_steps: the total number of steps (> 0): T unless ``config.annealing_steps``.
        config: α, threshold, switches; default :class:`TrustGRPOConfig()`.

    Returns:
        :class:`TrustGRPOResult`.
    """
    cfg = config if config is not None else TrustGRPOConfig()
    out = _as_1d(outcome, "outcome", np.float64)
    n = len(out)
    if thinking is None:
        think = np.full(n, np.nan)
    else:
        think = _as_1d(thinking, "thinking", np.float64)
        if len(think) != n:
            raise ValueError(f"thinking has length {len(think)} but outcome has length {n}")
    ids, groups = resolve_groups(n, group_ids, group_size, num_groups)
    step = check_int("step", step)
    total_steps = check_int("total_steps", total_steps)
    if cfg.thinking_min_outcome is not None:  # published code: low outcomes get R^t = 0
        think = np.where(out >= cfg.thinking_min_outcome, think, 0.0)
    horizon = cfg.annealing_steps if cfg.annealing_steps is not None else total_steps
    reward, gamma, mu_c, mu_w, annealing = _C.trust_grpo(
        out,
        think,
        ids,
        groups,
        float(cfg.correct_threshold),
        float(cfg.alpha),
        step,
        horizon,
        cfg.use_trust,
        cfg.use_annealing,
        cfg.use_thinking,
        float(cfg.unpaired_gamma),
    )
    skipped = np.zeros(groups, dtype=bool)
    if cfg.skip_uniform_groups and n:
        skipped = uniform_groups(out, ids, groups, cfg.skip_low, cfg.skip_high)
        members = skipped[ids]
        reward = np.where(members, out, reward)
    logger.debug("trust_grpo: N=%d G=%d annealing=%.4g skipped=%d", n, groups, annealing,
                 int(skipped.sum()))
    return TrustGRPOResult(reward, gamma, mu_c, mu_w, float(annealing), groups, skipped, think)


def uniform_groups(outcome: np.ndarray, group_ids: np.ndarray, num_groups: int, low: float,
                   high: float) -> np.ndarray:
    """bool[G]: groups whose outcomes f64[N] are all ≥ ``high`` or all ≤ ``low`` (a group
    without members is neither)."""
    size = np.bincount(group_ids, minlength=num_groups)
    high_n = np.bincount(group_ids, weights=outcome >= high, minlength=num_groups)
    low_n = np.bincount(group_ids, weights=outcome <= low, minlength=num_groups)
    return (size > 0) & ((high_n == size) | (low_n == size))


def needs_thinking_score(outcome: ArrayLike, well_formed: ArrayLike,
                         config: TrustGRPOConfig | None = None) -> np.ndarray:
    """bool[N]: the responses worth sending to the TRM — well-formed (there is a
    ``<think>`` block to grade) and R^o ≥ ``thinking_min_outcome`` when that is set
    (:func:`trust_grpo` gives the others 0 without a TRM call)."""
    cfg = config if config is not None else TrustGRPOConfig()
    mask = np.asarray(well_formed, dtype=bool).copy()
    if cfg.thinking_min_outcome is not None:
        mask &= np.asarray(outcome, dtype=np.float64) >= cfg.thinking_min_outcome
    return mask


def group_advantages(
    rewards: ArrayLike,
    *,
    group_ids: ArrayLike | None = None,
    group_size: int | None = None,
    num_groups: int | None = None,
    config: TrustGRPOConfig | None = None,
) -> np.ndarray:
    """GRPO advantages f64[N] = (R − mean_g) / (std_g + ε), or R − mean_g when
    ``config.scale_by_std`` is False (Dr.GRPO). One-member and all-equal groups get 0.

    Args:
        rewards: [N] rewards (finite).
        group_ids / group_size / num_groups: as in :func:`trust_grpo`.
        config: ``adv_eps``, ``scale_by_std``, ``std_ddof`` are used.
    """
    cfg = config if config is not None else TrustGRPOConfig()
    r = _as_1d(rewards, "rewards", np.float64)
    ids, groups = resolve_groups(len(r), group_ids, group_size, num_groups)
    return _C.group_advantages(
        r, ids, groups, float(cfg.adv_eps), cfg.scale_by_std, int(cfg.std_ddof)
    )
