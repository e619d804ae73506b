"""Score a built-in sample batch through the whole reward stage and print the tables.

    python -m sophiavl_mcore.rewards.demo [--step 0] [--total-steps 100] [key=value ...]

Four prompts (one per problem type) with four sampled responses each, plus thinking
scores as a TRM would return them (one missing, as after a TRM failure). The groups are
chosen to show Trust-GRPO at work: in the numerical group the wrong answers got *higher*
thinking scores than the right ones, so γ < 1 shrinks the thinking reward there.
``--config`` takes any training recipe (its ``rewards:`` section is used, e.g. the
ablations in examples/configs/ablations/; the other sections are not read, and are
validated only by the training job that owns them); overrides use the config's dotted
keys under ``rewards.``, e.g. ``rewards.trust_grpo.use_trust=false``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sophiavl_mcore.config import apply_overrides, from_dict, read_recipe
from sophiavl_mcore.rewards.config import DemoConfig, RewardsConfig
from sophiavl_mcore.rewards.outcome import OutcomeSample, score_outcomes
from sophiavl_mcore.rewards.trust_grpo import group_advantages, trust_grpo

logger = logging.getLogger("sophiavl_mcore.demo")

GROUP_SIZE = 4
_T = "<think>{}</think><answer>{}</answer>"

# (problem_type, solution, options, [(reasoning or None for an untagged reply, answer,
#  thinking score or None for a TRM failure)] * 4)
SAMPLE_BATCH: list[tuple[str, str, tuple[str, ...], list[tuple[str | None, str, float | None]]]] = [
    ("numerical", "<answer>12</answer>", (), [
        ("3 rows of 4 apples give 12.", "12", 0.6),
        ("Count: 4+4+4 = 12.", "\\boxed{12}", 0.5),
        ("There are three rows and four columns, so 3*4 ... I think 7.", "7", 0.9),
        ("Rows plus columns is 3+4=7.", "7", 0.8),
    ]),
    ("multiple choice", "<answer>B</answer>", ("A. circle", "B. triangle", "C. square", "D. hexagon"), [
        ("The shape has three sides.", "B", 0.9),
        ("Three corners, so a triangle.", "(B) triangle", 0.8),
        ("It looks round.", "A", 0.2),
        ("Four equal sides.", "C", None),
    ]),
    ("OCR", "<answer>SPEED LIMIT 40</answer>", (), [
        ("The sign reads speed limit forty.", "SPEED LIMIT 40", 0.7),
        ("Red sign with text.", "SPEED LIMIT 45", 0.5),
        ("The text is blurry.", "SPEED 40", 0.4),
        (None, "speed limit", 0.1),  # no tags: fails the format gate
    ]),
    ("free-form", "<answer>A dog is chasing a red ball across the park.</answer>", (), [
        ("I see an animal and a ball.", "A dog chases a red ball in the park.", 0.8),
        ("There is a dog.", "A dog is running.", 0.5),
        ("The picture shows a cat.", "A cat sleeps on a sofa.", 0.3),
        ("A ball and grass.", "A red ball lies on the grass of a park.", 0.6),
    ]),
]


def build_samples() -> tuple[list[OutcomeSample], np.ndarray]:
    """Flatten :data:`SAMPLE_BATCH` into samples [N] and thinking scores [N] (NaN = missing)."""
    samples, thinking = [], []
    for problem_type, solution, options, responses in SAMPLE_BATCH:
        for reasoning, answer, score in responses:
            text = answer if reasoning is None else _T.format(reasoning, answer)
            samples.append(OutcomeSample(problem_type, solution, text, options))
            thinking.append(np.nan if score is None else score)
    return samples, np.asarray(thinking, dtype=np.float64)


def rewards_from(recipe: str | Path | None, overrides: Sequence[str] = ()) -> RewardsConfig:
    """The ``rewards:`` section of a training recipe (``base:`` chains followed), or the
    defaults, with ``overrides`` applied and validated as a :class:`RewardsConfig`.

    Only that section is read: the rewards layer does not import the trainer's
    top-level config. An override outside ``rewards.`` is an unknown key (an error).
    """
    data = read_recipe(recipe) if recipe is not None else {}
    section = {"rewards": data["rewards"]} if "rewards" in data else {}
    return from_dict(DemoConfig, apply_overrides(section, overrides)).rewards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML recipe (defaults when omitted)")
    parser.add_argument("--step", type=int, default=0)
    parser.add_argument("--total-steps", type=int, default=100)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rewards = rewards_from(args.config, args.overrides)
    tg = rewards.trust_grpo

    samples, thinking = build_samples()
    outcome = score_outcomes(samples, format_weight=rewards.format_weight)
    # A reply without a <think> block has no reasoning for the TRM to grade.
    thinking[~outcome.well_formed] = np.nan
    result = trust_grpo(outcome.reward, thinking, group_size=GROUP_SIZE, step=args.step,
                        total_steps=args.total_steps, config=tg)
    advantages = group_advantages(result.reward, group_size=GROUP_SIZE, config=tg)

    logger.info("Trust-GRPO: alpha=%.2f step=%d/%d annealing=%.4f trust=%s thinking=%s",
                tg.alpha, args.step, args.total_steps, result.annealing, tg.use_trust, tg.use_thinking)
    logger.info("%-16s %5s %8s %8s %8s %8s %8s", "problem_type", "group", "mu_c", "mu_w", "gamma",
                "R_mean", "R^o_mean")
    for group, (problem_type, *_rest) in enumerate(SAMPLE_BATCH):
        members = slice(group * GROUP_SIZE, (group + 1) * GROUP_SIZE)
        logger.info("%-16s %5d %8.3f %8.3f %8.4f %8.4f %8.4f", problem_type, group,
                    result.mu_correct[group], result.mu_wrong[group], result.gamma[group],
                    result.reward[members].mean(), outcome.reward[members].mean())
    logger.info("%-16s %-5s %7s %7s %7s %7s %9s", "problem_type", "i", "format", "R^o", "R^t", "R", "advantage")
    for i, sample in enumerate(samples):
        logger.info("%-16s %-5d %7d %7.3f %7.2f %7.3f %9.3f", sample.problem_type, i,
                    outcome.well_formed[i], outcome.reward[i], thinking[i], result.reward[i], advantages[i])
    logger.info("numerical answers judged by math-verify: %d of %d", outcome.stats.numerical_slow_path,
                outcome.stats.numerical_total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
