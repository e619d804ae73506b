"""Per-step metrics of the GRPO loop (names in the agreed TensorBoard namespaces)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

CONSOLE_KEYS = ("reward/outcome_mean", "reward/thinking_mean", "reward/total_mean",
                "reward/gamma_mean", "train/kl", "train/entropy", "train/clip_fraction",
                "rollout/response_len_mean", "train/logprob_mismatch", "perf/tokens_per_s",
                "timing/step_s")


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


def reward_metrics(roll: Any, trust: Any, advantages: np.ndarray) -> dict[str, float]:
    """Rewards per problem type, outcome vs thinking, γ, annealing, advantages.

    ``roll``: :class:`~sophiavl_mcore.trainer.loop.Rollout`; ``trust``: the
    :class:`~sophiavl_mcore.rewards.trust_grpo.TrustGRPOResult` of the step.
    """
    out: dict[str, float] = {}
    outcome, total, thinking = roll.outcome, trust.reward, roll.thinking
    out.update(_stats("reward/outcome", outcome))
    out.update(_stats("reward/total", total))
    out["reward/accuracy_mean"] = float(np.mean(roll.accuracy))
    out["reward/format_ok_frac"] = float(np.mean(roll.well_formed))
    formed = np.asarray(roll.well_formed, dtype=bool)
    if formed.any():  # learning to answer, told apart from learning the format
        out["reward/accuracy_well_formed"] = float(np.mean(roll.accuracy[formed]))
    scored = thinking[np.isfinite(thinking)]
    out["reward/thinking_mean"] = float(scored.mean()) if scored.size else float("nan")
    out["reward/thinking_scored_frac"] = scored.size / max(thinking.size, 1)
    n = len(outcome) // max(len(roll.records), 1)
    types = np.repeat([r.problem_type for r in roll.records], n)
    for t in sorted(set(types)):
        key = t.replace(" ", "_")
        out[f"reward/{key}/outcome_mean"] = float(outcome[types == t].mean())
        out[f"reward/{key}/outcome_std"] = float(outcome[types == t].std())
        out[f"reward/{key}/total_mean"] = float(total[types == t].mean())
    gamma = np.asarray(trust.gamma, dtype=np.float64)
    out["reward/gamma_mean"] = float(gamma.mean()) if gamma.size else 1.0
    out["reward/gamma_lt1_frac"] = float((gamma < 1.0).mean()) if gamma.size else 0.0
    out["reward/annealing"] = float(trust.annealing)
    out.update(_stats("reward/advantage", advantages))
    out["reward/advantage_zero_frac"] = float((np.abs(advantages) < 1e-9).mean())
    out.update(roll.trm_metrics)
    out.setdefault("reward/trm_failures", 0.0)
    return out


def rollout_metrics(roll: Any) -> dict[str, float]:
    """Response lengths (tokens), truncations, prompt count."""
    lens = np.array([len(s["ids"]) for g in roll.responses for s in g], dtype=np.float64)
    finish = [s["finish"] for g in roll.responses for s in g]
    out = _stats("rollout/response_len", lens)
    out["rollout/truncated_frac"] = finish.count("length") / max(len(finish), 1)
    out["rollout/prompts"] = float(len(roll.records))
    out["rollout/responses"] = float(len(finish))
    out.update(answer_metrics([[s["text"] for s in g] for g in roll.responses]))
    return out


def answer_metrics(groups: list[list[str]]) -> dict[str, float]:
    """How varied the well-formed answers are: ``rollout/answer_top_frac`` is the share
    of the most common answer over the step, ``rollout/answer_distinct`` the mean number
    of distinct answers per group (1 everywhere = no group can produce an advantage)."""
    from sophiavl_mcore.rewards.outcome import parse_response

    answers = [[p.answer for p in map(parse_response, g) if p.well_formed] for g in groups]
    flat = [a for g in answers for a in g]
    if not flat:
        return {}
    _, counts = np.unique(flat, return_counts=True)
    return {"rollout/answer_top_frac": float(counts.max() / len(flat)),
            "rollout/answer_distinct": float(np.mean([len(set(g)) for g in answers if g]))}


def sample_text(roll: Any, k: int = 4) -> str:
    """Markdown of the first ``k`` responses of the first group, with their rewards."""
    if not roll.responses:
        return ""
    r = roll.records[0]
    lines = [f"**{r.problem_id}** gold `{r.answer}`: {r.problem}", ""]
    for j, s in enumerate(roll.responses[0][:k]):
        lines.append(f"- R^o={roll.outcome[j]:.2f} R^t={roll.thinking[j]:.2f}: `{s['text'][:300]}`")
    return "\n".join(lines)


def log_step(writer: Any, step: int, metrics: dict[str, float], roll: Any, trust: Any,
             samples_every: int) -> None:
    """Scalars + γ histogram every step; every ``samples_every`` steps (0 = never) the
    first group's responses as text and the first prompt's image."""
    writer.log(step, metrics)
    writer.add_histogram(step, "reward/gamma_hist", np.asarray(trust.gamma))
    if samples_every and step % samples_every == 0:
        writer.add_text(step, "rollout/samples", sample_text(roll))
        if roll.images and roll.images[0] is not None:
            writer.add_image(step, "rollout/sample_image", roll.images[0].convert("RGB"))
