"""Per-step metrics of the GRPO loop (names in the agreed TensorBoard namespaces)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sophiavl_mcore.logging import MetricsWriter
    from sophiavl_mcore.rollout.batch import StepBatch
    from sophiavl_mcore.rollout.layout import EngineLayout

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


def step_metrics(view: StepBatch, layout: EngineLayout) -> dict[str, float]:
    """Every metric the step's columns give (:func:`reward_metrics`,
    :func:`rollout_metrics`); ``view``: the whole step's generated responses
    (:func:`~sophiavl_mcore.trainer.grpo.step_data.gather_step`)."""
    return {**reward_metrics(view), **rollout_metrics(view, layout)}


def reward_metrics(view: StepBatch) -> dict[str, float]:
    """Rewards per problem type, outcome vs thinking, γ, annealing, advantages, and the
    thinking / trust metrics of :func:`thinking_metrics` per data source, plus the TRM
    client's counters (``view.scalars``)."""
    c = view.columns
    out: dict[str, float] = {}
    outcome, total, advantages = c["outcome"], c["reward"], c["advantage"]
    out.update(_stats("reward/outcome", outcome))
    out.update(_stats("reward/total", total))
    out["reward/accuracy_mean"] = float(np.mean(c["accuracy"]))
    out["reward/format_ok_frac"] = float(np.mean(c["well_formed"]))
    formed = np.asarray(c["well_formed"], dtype=bool)
    if formed.any():  # learning to answer, told apart from learning the format
        out["reward/accuracy_well_formed"] = float(np.mean(c["accuracy"][formed]))
    types = np.array([view.records[g].problem_type for g in view.group_of.tolist()])
    for t in sorted(set(types.tolist())):
        key = t.replace(" ", "_")
        out[f"reward/{key}/outcome_mean"] = float(outcome[types == t].mean())
        out[f"reward/{key}/outcome_std"] = float(outcome[types == t].std())
        out[f"reward/{key}/total_mean"] = float(total[types == t].mean())
    out.update(thinking_metrics(view))
    out.update(_stats("reward/advantage", advantages))
    out["reward/advantage_zero_frac"] = float((np.abs(advantages) < 1e-9).mean())
    out.update({k: v for k, v in view.scalars.items() if k != "reward/annealing"})
    out.setdefault("reward/trm_failures", 0.0)
    return out


def rollout_metrics(view: StepBatch, layout: EngineLayout) -> dict[str, float]:
    """Response lengths (tokens), truncations, answer diversity, engines; ``view`` needs
    the columns ``length``, ``truncated``, ``answer``, ``engine``."""
    c = view.columns
    lens = c["length"]
    per_engine = np.bincount(c["engine"].astype(np.int64), minlength=layout.num_engines)
    out = {"rollout/engines": float(layout.num_engines), "rollout/prompts": float(view.num_groups),
           "rollout/responses": float(lens.size),
           "rollout/engine_responses_min": float(per_engine.min()),
           "rollout/engine_responses_max": float(per_engine.max())}
    if lens.size:
        out.update({"rollout/response_len_mean": float(lens.mean()),
                    "rollout/response_len_std": float(lens.std()),
                    "rollout/response_len_min": float(lens.min()),
                    "rollout/response_len_max": float(lens.max()),
                    "rollout/truncated_frac": float(c["truncated"].mean())})
    answers = c["answer"]
    formed = answers[answers >= 0]
    if formed.size:
        _, counts = np.unique(formed, return_counts=True)
        out["rollout/answer_top_frac"] = float(counts.max() / formed.size)
        groups = [answers[view.group_of == g] for g in range(view.num_groups)]
        out["rollout/answer_distinct"] = float(np.mean(
            [len(set(a[a >= 0].tolist())) for a in groups if (a >= 0).any()]))
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


def thinking_metrics(view: StepBatch, by_source: bool = True) -> dict[str, float]:
    """Thinking reward and trust metrics of one step, overall and per data source.

    ``view``: the step's columns ``outcome`` (R^o), ``thinking`` (TRM scores, NaN = not
    scored), optionally ``true_quality`` (the task's, NaN = unknown; all NaN = the task
    has none) [N]; group columns ``gamma``, ``mu_correct``, ``mu_wrong``, ``skipped``
    [G]; scalar ``reward/annealing``; each group's data source is its record's.

    Returns ``reward/<name>`` overall and, with ``by_source``,
    ``reward/source/<label>/<name>`` per source, for names ``thinking_mean``/
    ``thinking_std`` (over scored responses), ``thinking_scored_frac``,
    ``gamma_mean``/``gamma_lt1_frac`` (over groups), ``mu_gap_mean`` (μc − μw over
    groups with both), ``paired_groups``, ``thinking_true_mean`` and ``trm_true_corr``
    (Pearson correlation of TRM score and true quality) where the task has a true
    quality; plus ``reward/annealing`` and ``reward/skipped_groups_frac``.
    """
    c, gc = view.columns, view.group_columns
    outcome, thinking = c["outcome"], c["thinking"]
    gamma, gap = gc["gamma"], gc["mu_correct"] - gc["mu_wrong"]
    tq = c.get("true_quality")
    tq = tq if tq is not None and np.isfinite(tq).any() else None
    out = _thinking_block("reward", outcome, thinking, gamma, gap, tq)
    out.pop("reward/outcome_mean")  # the overall one comes with its std etc. (_stats)
    out["reward/annealing"] = float(view.scalars.get("reward/annealing", 1.0))
    skipped = gc.get("skipped")
    out["reward/skipped_groups_frac"] = (float(np.mean(skipped)) if skipped is not None
                                         and len(skipped) else 0.0)
    if not by_source:
        return out
    group_sources = np.array([r.data_source for r in view.records])
    sources = group_sources[view.group_of]
    for label in sorted(set(group_sources.tolist())):
        r, g = sources == label, group_sources == label
        out.update(_thinking_block(f"reward/source/{label}", outcome[r], thinking[r], gamma[g],
                                   gap[g], None if tq is None else tq[r]))
    return out


def sample_text(sample: StepBatch, k: int = 4) -> str:
    """Markdown of the first ``k`` responses of the first group, with their rewards."""
    if not sample.num_groups:
        return ""
    r = sample.records[0]
    lines = [f"**{r.problem_id}** gold `{r.answer}`: {r.problem}", ""]
    first = np.flatnonzero(sample.group_of == 0)[:k]
    for j in first.tolist():
        lines.append(f"- R^o={sample.columns['outcome'][j]:.2f} "
                     f"R^t={sample.columns['thinking'][j]:.2f}: `{sample.texts[j][:300]}`")
    return "\n".join(lines)


def first_generated_group(batch: StepBatch) -> StepBatch:
    """The first generated group of an engine's batch (none: an empty batch), the one the
    TensorBoard sample text/image shows."""
    generated = np.flatnonzero(batch.group_columns["generated"] > 0)
    return batch.select_groups(generated[:1].tolist())


def log_step(writer: MetricsWriter, step: int, metrics: dict[str, float], view: StepBatch,
             samples_every: int, sample: StepBatch) -> None:
    """Scalars + γ histograms (all groups, and per data source) every step; every
    ``samples_every`` steps (0 = never) ``sample``'s first group's responses as text and
    its image. ``view``: the step's generated groups (:func:`step_metrics`'s)."""
    writer.log(step, metrics)
    gamma = view.group_columns["gamma"]
    writer.add_histogram(step, "reward/gamma_hist", gamma)
    sources = np.array([r.data_source for r in view.records])  # one per group
    for label in sorted(set(sources.tolist())):
        if (sources == label).any():
            writer.add_histogram(step, f"reward/source/{label}/gamma_hist", gamma[sources == label])
    if samples_every and step % samples_every == 0:
        writer.add_text(step, "rollout/samples", sample_text(sample))
        if sample.images and sample.images[0] is not None:
            writer.add_image(step, "rollout/sample_image", sample.images[0].convert("RGB"))
