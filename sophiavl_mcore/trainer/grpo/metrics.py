"""Per-step metrics of the GRPO loop (names in the agreed TensorBoard namespaces)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sophiavl_mcore.logging import MetricsWriter
    from sophiavl_mcore.rewards.trust_grpo import TrustGRPOResult
    from sophiavl_mcore.trainer.grpo.step_data import SampleView, StepScalars

CONSOLE_KEYS = ("reward/outcome_mean", "reward/thinking_mean", "reward/total_mean",
                "reward/gamma_mean", "train/kl", "train/entropy", "train/clip_fraction",
                "rollout/response_len_mean", "train/logprob_mismatch", "perf/tokens_per_s",
                "timing/step_s")


def step_perf(metrics: dict[str, float], world: int) -> dict[str, float]:
    """Throughput over the whole step's wall time (``timing/step_s``, every phase):
    ``perf/tokens_per_s`` — prompt + response tokens trained this step (all ranks) per
    second; ``perf/tokens_per_s_per_rank`` — the same over ``world`` ranks;
    ``perf/rollout_tokens_per_s`` — tokens all engines generated per second of the
    rollout phase. The update phase alone is ``perf/train_tokens_per_s``."""
    step_s = metrics.get("timing/step_s", 0.0)
    out: dict[str, float] = {}
    if step_s > 0 and "train/input_tokens" in metrics:
        out["perf/tokens_per_s"] = metrics["train/input_tokens"] / step_s
        out["perf/tokens_per_s_per_rank"] = out["perf/tokens_per_s"] / world
    rollout_s = metrics.get("timing/rollout_s", 0.0)
    if rollout_s > 0 and "rollout/response_len_mean" in metrics:
        generated = metrics["rollout/response_len_mean"] * metrics.get("rollout/responses", 0.0)
        out["perf/rollout_tokens_per_s"] = generated / rollout_s
    return out


class PhaseTimer:
    """Wall-clock seconds per named phase of one step (``timing/<phase>_s``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        out = {f"timing/{k}_s": v for k, v in self.seconds.items()}
        out["timing/step_s"] = time.perf_counter() - self._start
        return out


def _stats(prefix: str, x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return {}
    return {f"{prefix}_mean": float(x.mean()), f"{prefix}_std": float(x.std()),
            f"{prefix}_min": float(x.min()), f"{prefix}_max": float(x.max())}


def reward_metrics(roll: StepScalars, trust: TrustGRPOResult, advantages: np.ndarray,
                   true_quality: np.ndarray | None = None) -> dict[str, float]:
    """Rewards per problem type, outcome vs thinking, γ, annealing, advantages, and the
    thinking / trust metrics of :func:`thinking_metrics` per data source.

    ``roll``: the step's :class:`~sophiavl_mcore.trainer.grpo.step_data.StepScalars`; ``trust``: the
    :class:`~sophiavl_mcore.rewards.trust_grpo.TrustGRPOResult` of the step;
    ``true_quality``: f64[N] oracle thinking quality when the task has one (NaN = none).
    """
    out: dict[str, float] = {}
    outcome, total = roll.outcome, trust.reward
    out.update(_stats("reward/outcome", outcome))
    out.update(_stats("reward/total", total))
    out["reward/accuracy_mean"] = float(np.mean(roll.accuracy))
    out["reward/format_ok_frac"] = float(np.mean(roll.well_formed))
    formed = np.asarray(roll.well_formed, dtype=bool)
    if formed.any():  # learning to answer, told apart from learning the format
        out["reward/accuracy_well_formed"] = float(np.mean(roll.accuracy[formed]))
    n = len(outcome) // max(len(roll.records), 1)
    types = np.repeat([r.problem_type for r in roll.records], n)
    for t in sorted(set(types)):
        key = t.replace(" ", "_")
        out[f"reward/{key}/outcome_mean"] = float(outcome[types == t].mean())
        out[f"reward/{key}/outcome_std"] = float(outcome[types == t].std())
        out[f"reward/{key}/total_mean"] = float(total[types == t].mean())
    sources = np.repeat([r.data_source for r in roll.records], n)
    out.update(thinking_metrics(outcome, roll.thinking, trust, n, sources, true_quality))
    out.update(_stats("reward/advantage", advantages))
    out["reward/advantage_zero_frac"] = float((np.abs(advantages) < 1e-9).mean())
    out.update(roll.trm_metrics)
    out.setdefault("reward/trm_failures", 0.0)
    return out


def _thinking_block(prefix: str, outcome: np.ndarray, thinking: np.ndarray, gamma: np.ndarray,
                    gap: np.ndarray, true_quality: np.ndarray | None) -> dict[str, float]:
    out: dict[str, float] = {}
    scored = np.isfinite(thinking)
    out[f"{prefix}/outcome_mean"] = float(outcome.mean()) if outcome.size else float("nan")
    out[f"{prefix}/thinking_mean"] = float(thinking[scored].mean()) if scored.any() else float("nan")
    out[f"{prefix}/thinking_std"] = float(thinking[scored].std()) if scored.any() else float("nan")
    out[f"{prefix}/thinking_scored_frac"] = float(scored.sum() / max(thinking.size, 1))
    out[f"{prefix}/gamma_mean"] = float(gamma.mean()) if gamma.size else 1.0
    out[f"{prefix}/gamma_lt1_frac"] = float((gamma < 1.0).mean()) if gamma.size else 0.0
    paired = np.isfinite(gap)
    out[f"{prefix}/mu_gap_mean"] = float(gap[paired].mean()) if paired.any() else float("nan")
    out[f"{prefix}/paired_groups"] = float(paired.sum())
    if true_quality is not None:
        known = np.isfinite(true_quality)
        out[f"{prefix}/thinking_true_mean"] = (float(true_quality[known].mean()) if known.any()
                                               else float("nan"))
        both = known & scored
        if both.sum() >= 2 and thinking[both].std() > 0 and true_quality[both].std() > 0:
            out[f"{prefix}/trm_true_corr"] = float(np.corrcoef(thinking[both],
                                                               true_quality[both])[0, 1])
    return out


def thinking_metrics(outcome: np.ndarray, thinking: np.ndarray, trust: TrustGRPOResult,
                     group_size: int,
                     sources: np.ndarray | None = None, true_quality: np.ndarray | None = None
                     ) -> dict[str, float]:
    """Thinking reward and trust metrics of one step, overall and per data source.

    Args:
        outcome: f64[N] outcome rewards R^o, groups of ``group_size`` consecutive responses.
        thinking: f64[N] TRM scores (NaN = not scored).
        trust: the step's TrustGRPOResult (``gamma``, ``mu_correct``, ``mu_wrong`` [G],
            ``annealing``; ``skipped`` [G] when present).
        sources: [N] data-source label per response (the group's label is its first
            member's); None = no per-source metrics.
        true_quality: f64[N] oracle thinking quality (NaN = unknown) or None.

    Returns ``reward/<name>`` overall and ``reward/source/<label>/<name>`` per source, for
    names ``thinking_mean``/``thinking_std`` (over scored responses), ``thinking_scored_frac``,
    ``gamma_mean``/``gamma_lt1_frac`` (over groups), ``mu_gap_mean`` (μc − μw over groups
    with both), ``paired_groups``, ``thinking_true_mean`` and ``trm_true_corr`` (Pearson
    correlation of TRM score and true quality) with ``true_quality``; plus
    ``reward/annealing`` and ``reward/skipped_groups_frac``.
    """
    outcome = np.asarray(outcome, dtype=np.float64)
    thinking = np.asarray(thinking, dtype=np.float64)
    gamma = np.asarray(trust.gamma, dtype=np.float64)
    gap = np.asarray(trust.mu_correct, dtype=np.float64) - np.asarray(trust.mu_wrong,
                                                                      dtype=np.float64)
    tq = None if true_quality is None else np.asarray(true_quality, dtype=np.float64)
    out = _thinking_block("reward", outcome, thinking, gamma, gap, tq)
    out.pop("reward/outcome_mean")  # the overall one comes with its std etc. (_stats)
    out["reward/annealing"] = float(trust.annealing)
    skipped = getattr(trust, "skipped", None)
    out["reward/skipped_groups_frac"] = (float(np.mean(skipped)) if skipped is not None
                                         and len(skipped) else 0.0)
    if sources is None:
        return out
    sources = np.asarray(sources)
    group_sources = sources[::group_size][:len(gamma)]
    for label in sorted(set(sources.tolist())):
        r, g = sources == label, group_sources == label
        out.update(_thinking_block(f"reward/source/{label}", outcome[r], thinking[r], gamma[g],
                                   gap[g], None if tq is None else tq[r]))
    return out


def sample_text(roll: SampleView, k: int = 4) -> str:
    """Markdown of the first ``k`` responses of the first group, with their rewards."""
    if not roll.responses:
        return ""
    r = roll.records[0]
    lines = [f"**{r.problem_id}** gold `{r.answer}`: {r.problem}", ""]
    for j, s in enumerate(roll.responses[0][:k]):
        lines.append(f"- R^o={roll.outcome[j]:.2f} R^t={roll.thinking[j]:.2f}: `{s['text'][:300]}`")
    return "\n".join(lines)


def log_step(writer: MetricsWriter, step: int, metrics: dict[str, float], roll: StepScalars,
             trust: TrustGRPOResult, samples_every: int, samples: SampleView | None = None
             ) -> None:
    """Scalars + γ histograms (all groups, and per data source) every step; every
    ``samples_every`` steps (0 = never) the first group's responses as text and the first
    prompt's image. ``roll``: the step's groups (``records``, one per group);
    ``samples``: where the shown group comes from (default ``roll``)."""
    writer.log(step, metrics)
    writer.add_histogram(step, "reward/gamma_hist", np.asarray(trust.gamma))
    sources = np.array([r.data_source for r in roll.records])  # one per group
    for label in sorted(set(sources.tolist())):
        gamma = np.asarray(trust.gamma)[:len(sources)][sources == label]
        if gamma.size:
            writer.add_histogram(step, f"reward/source/{label}/gamma_hist", gamma)
    shown = roll if samples is None else samples
    if samples_every and step % samples_every == 0:
        writer.add_text(step, "rollout/samples", sample_text(shown))
        if shown.images and shown.images[0] is not None:
            writer.add_image(step, "rollout/sample_image", shown.images[0].convert("RGB"))
