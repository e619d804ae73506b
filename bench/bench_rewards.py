"""Reward-stage benchmark: C++ batch kernels vs the plain per-sample Python path.

8192 responses (512 prompts × 16 samples) of mixed problem types with realistic lengths
(free-form ~300 words, OCR ~50 words, numerical, multiple choice). Both paths run in this
process on the same inputs; their numbers must agree (ROUGE/WER max abs diff ≤ 1e-9).

Baseline: rouge-score (use_stemmer=True) and jiwer per sample, math-verify for every
numerical answer, Python loops for γ and advantages — what a straightforward
implementation (and the authors' reference code) does. Ours: sophiavl_mcore.rewards
(score_outcomes + trust_grpo + group_advantages). The TRM is excluded (its own bench).

    python bench/bench_rewards.py [--prompts 512] [--group-size 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass

import numpy as np

from sophiavl_mcore.rewards.config import TrustGRPOConfig
from sophiavl_mcore.rewards.outcome import (
    OutcomeSample,
    math_verify_equal,
    option_letters,
    parse_response,
    score_outcomes,
    solution_answer,
)
from sophiavl_mcore.rewards.text_metrics import batch_rouge, batch_wer
from sophiavl_mcore.rewards.trust_grpo import group_advantages, trust_grpo

TYPES = ("free-form", "OCR", "numerical", "multiple choice")
STEMS = ["run", "jump", "calculat", "measur", "observ", "connect", "generat", "reason", "triangl",
         "circl", "rotat", "multipl", "divid", "estimat", "compar", "analys", "differ", "increas",
         "decreas", "posit", "relat", "condit", "structur", "happi", "famili", "organ", "nation"]
SUFFIXES = ["", "s", "ed", "ing", "ion", "ions", "ive", "ness", "ly", "ful", "ement", "ational",
            "izer", "ies", "e", "es", "ate", "ability", "ism", "ous"]
COMMON = ["the", "a", "of", "and", "is", "to", "in", "that", "we", "so", "it", "this", "for",
          "angle", "area", "value", "because", "therefore", "then", "image", "shows", "number"]


def _vocabulary(rng: random.Random) -> list[str]:
    words = [s + x for s in STEMS for x in SUFFIXES] + COMMON * 8
    rng.shuffle(words)
    return words


def _sentence(rng: random.Random, vocab: list[str], n_words: int) -> str:
    words = [rng.choice(vocab) for _ in range(n_words)]
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def _perturb(rng: random.Random, vocab: list[str], text: str, rate: float) -> str:
    out = []
    for word in text.split():
        roll = rng.random()
        if roll < rate / 3:
            continue
        if roll < 2 * rate / 3:
            out.append(rng.choice(vocab))
        elif roll < rate:
            out.extend([word, rng.choice(vocab)])
        else:
            out.append(word)
    return " ".join(out)


def _numeric_pair(rng: random.Random) -> tuple[str, str]:
    gold_value = rng.randint(-50, 500)
    style = rng.random()
    if style < 0.05:  # symbolic answers that only math-verify can judge
        return f"\\sqrt{{{gold_value * gold_value}}}", f"{abs(gold_value)}"
    answer = gold_value if rng.random() < 0.5 else gold_value + rng.randint(1, 9)
    if style < 0.25:
        return str(gold_value), f"\\frac{{{2 * answer}}}{{2}}"
    if style < 0.45:
        return f"{gold_value}", f"\\boxed{{{answer}}}"
    return str(gold_value), f"{answer}.0" if rng.random() < 0.3 else str(answer)


@dataclass
class Batch:
    samples: list[OutcomeSample]
    thinking: np.ndarray
    group_size: int


def make_batch(prompts: int, group_size: int, seed: int) -> Batch:
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    samples: list[OutcomeSample] = []
    for p in range(prompts):
        problem_type = TYPES[p % len(TYPES)]
        options: tuple[str, ...] = ()
        if problem_type == "free-form":
            gold = _sentence(rng, vocab, rng.randint(250, 350))
        elif problem_type == "OCR":
            gold = _sentence(rng, vocab, rng.randint(40, 60))
        elif problem_type == "multiple choice":
            options = tuple(f"{chr(65 + i)}. {rng.choice(vocab)}" for i in range(4))
            gold = rng.choice(["A", "B", "C", "D", "B, D"])
        for _ in range(group_size):
            if problem_type == "numerical":
                gold, answer = _numeric_pair(rng)
            elif problem_type == "multiple choice":
                answer = rng.choice(["A", "(B)", "C.", "d", "B, D", gold])
            else:
                answer = _perturb(rng, vocab, gold, rate=rng.uniform(0.0, 0.6))
            think = _sentence(rng, vocab, rng.randint(30, 80))
            response = f"<think>{think}</think><answer>{answer}</answer>"
            if rng.random() < 0.05:
                response = answer  # format violation
            samples.append(OutcomeSample(problem_type, f"<answer>{gold}</answer>", response, options))
    thinking = np.round(np.array([rng.random() for _ in samples]), 1)
    thinking[np.array([rng.random() < 0.02 for _ in samples])] = np.nan  # TRM failures
    return Batch(samples, thinking, group_size)


# ------------------------------------------------------------------ baseline


def baseline_outcomes(samples: list[OutcomeSample], timings: dict[str, float]) -> np.ndarray:
    import jiwer
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    reward = np.zeros(len(samples))
    for index, sample in enumerate(samples):
        parsed = parse_response(sample.response)
        if not parsed.well_formed:
            continue
        gold = solution_answer(sample.solution)
        start = time.perf_counter()
        if sample.problem_type == "free-form":
            scores = scorer.score(gold, parsed.answer)
            reward[index] = (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3
        elif sample.problem_type == "OCR":
            wer = jiwer.wer(gold, parsed.answer) if parsed.answer.strip() else 1.0
            reward[index] = math.exp(-wer)
        elif sample.problem_type == "numerical":
            reward[index] = float(math_verify_equal(gold, parsed.answer))
        else:
            g = option_letters(gold, sample.options)
            reward[index] = float(bool(g) and g == option_letters(parsed.answer, sample.options))
        timings[sample.problem_type] = timings.get(sample.problem_type, 0.0) + time.perf_counter() - start
    return reward


def baseline_trust_grpo(outcome, thinking, group_size, step, total_steps, cfg: TrustGRPOConfig):
    rewards, gammas = [], []
    annealing = math.exp(-step / total_steps) if cfg.use_annealing else 1.0
    for start in range(0, len(outcome), group_size):
        o = outcome[start:start + group_size]
        t = thinking[start:start + group_size]
        correct = [t[i] for i in range(len(o)) if o[i] >= cfg.correct_threshold and not math.isnan(t[i])]
        wrong = [t[i] for i in range(len(o)) if o[i] < cfg.correct_threshold and not math.isnan(t[i])]
        if correct and wrong:
            mu_c, mu_w = sum(correct) / len(correct), sum(wrong) / len(wrong)
            gamma = 1.0 if mu_c >= mu_w else math.exp(mu_c - mu_w)
        else:
            gamma = cfg.unpaired_gamma
        gammas.append(gamma)
        for i in range(len(o)):
            bonus = 0.0 if math.isnan(t[i]) else gamma * cfg.alpha * annealing * t[i]
            rewards.append(o[i] + bonus)
    advantages = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        mean = sum(group) / len(group)
        var = sum((r - mean) ** 2 for r in group) / max(len(group) - cfg.std_ddof, 1)
        advantages.extend((r - mean) / (math.sqrt(var) + cfg.adv_eps) for r in group)
    return np.array(rewards), np.array(gammas), np.array(advantages)


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=50.0)
    args = parser.parse_args()

    batch = make_batch(args.prompts, args.group_size, args.seed)
    cfg = TrustGRPOConfig()
    step, total_steps = 37, 200
    n = len(batch.samples)
    print(f"reward stage on {n} responses ({args.prompts} prompts x {args.group_size})")
    # Warm both paths (imports, math-verify's grammar, stem caches are per call so stay cold).
    warm = batch.samples[: 4 * args.group_size]
    baseline_outcomes(warm, {})
    score_outcomes(warm)

    base_parts: dict[str, float] = {}
    t0 = time.perf_counter()
    base_outcome = baseline_outcomes(batch.samples, base_parts)
    t1 = time.perf_counter()
    base_reward, base_gamma, base_adv = baseline_trust_grpo(
        base_outcome, batch.thinking, batch.group_size, step, total_steps, cfg)
    t2 = time.perf_counter()

    t3 = time.perf_counter()
    ours = score_outcomes(batch.samples)
    t4 = time.perf_counter()
    result = trust_grpo(ours.reward, batch.thinking, group_size=batch.group_size, step=step,
                        total_steps=total_steps, config=cfg)
    advantages = group_advantages(result.reward, group_size=batch.group_size, config=cfg)
    t5 = time.perf_counter()

    # Per-kernel timings on exactly the texts the stage graded.
    ff = [(solution_answer(s.solution), parse_response(s.response)) for s in batch.samples if s.problem_type == "free-form"]
    ff = [(g, p.answer) for g, p in ff if p.well_formed]
    ocr = [(solution_answer(s.solution), parse_response(s.response)) for s in batch.samples if s.problem_type == "OCR"]
    ocr = [(g, p.answer) for g, p in ocr if p.well_formed]
    t6 = time.perf_counter()
    batch_rouge([g for g, _ in ff], [a for _, a in ff])
    t7 = time.perf_counter()
    batch_wer([g for g, _ in ocr], [a for _, a in ocr])
    t8 = time.perf_counter()

    diffs = {
        "outcome": float(np.max(np.abs(base_outcome - ours.reward))),
        "reward": float(np.max(np.abs(base_reward - result.reward))),
        "gamma": float(np.max(np.abs(base_gamma - result.gamma))),
        "advantage": float(np.max(np.abs(base_adv - advantages))),
    }
    rows = [
        ("free-form ROUGE", base_parts.get("free-form", 0.0), t7 - t6),
        ("OCR WER", base_parts.get("OCR", 0.0), t8 - t7),
        ("numerical", base_parts.get("numerical", 0.0), None),
        ("outcome stage (all types)", t1 - t0, t4 - t3),
        ("trust-grpo + advantages", t2 - t1, t5 - t4),
        ("whole reward stage", t2 - t0, t5 - t3),
    ]
    print(f"{'part':<28}{'baseline s':>12}{'ours s':>10}{'ratio':>10}")
    for name, base, our in rows:
        ratio = f"{base / our:>10.1f}" if our else f"{'-':>10}"
        print(f"{name:<28}{base:>12.3f}{(our if our is not None else float('nan')):>10.4f}{ratio}")
    print(f"numerical slow-path (math-verify) fraction: {ours.stats.slow_path_fraction:.3f}")
    print("max abs diff vs baseline: " + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    speedup = (t2 - t0) / (t5 - t3)
    rouge_speedup = base_parts.get("free-form", 0.0) / (t7 - t6)
    exact = all(v <= 1e-9 for v in diffs.values())
    status = "ok" if speedup >= args.target and rouge_speedup >= 100 and exact else "short"
    print(f"rouge speedup {rouge_speedup:.1f}x (target 100), whole stage {speedup:.1f}x (target {args.target:g}), exact={exact}")
    print(f"RESULT rewards speedup={speedup:.1f} baseline=per-sample-python target={args.target:g} status={status}")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
