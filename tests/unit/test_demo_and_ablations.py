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


def test_no_trust_no_annealing_recipe_is_full_weight() -> None:
    outcome, thinking, result = _run("no_trust_no_annealing.yaml", step=90)
    assert result.annealing == 1.0 and np.all(result.gamma == 1.0)
    scored = ~np.isnan(thinking)
    np.testing.assert_allclose(result.reward[scored], outcome[scored] + 0.3 * thinking[scored])


def test_trm_agreement_figures_by_hand() -> None:
    from sophiavl_mcore.testing.tiny_trm import agreement

    scores = np.array([1.0, 0.4, 0.8, 0.2, np.nan, 0.9])
    labels = np.array([1, 0.5, 0.5, 0, 1, 0.5])    # what it was trained to say
    true = np.array([1, 0.5, 0.5, 0, 1, 1.0])      # the hacked record's truth differs
    got = agreement(scores, labels, true, np.array(["c", "c", "c", "c", "h", "h"]))
    # nearest levels of {0, 1/2, 1}: 1, 1/2, 1 (wrong: 0.5), 0 | nan | 1
    assert got["c"]["agree_true"] == 0.75 and got["c"]["missing"] == 0
    assert got["h"]["missing"] == 1 and got["h"]["n"] == 2
    assert got["h"]["agree_true"] == 1.0 and got["h"]["agree_label"] == 0.0
    assert got["all"]["agree_true"] == pytest.approx(4 / 5)
    assert got["c"]["mae_true"] == pytest.approx((0 + 0.1 + 0.3 + 0.2) / 4)


def test_ablation_summary_and_table() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablate", ABLATIONS.parents[2] / "tools" / "ablate.py")
    ablate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablate)
    steps = [{"step": i, "reward/outcome_mean": i / 10,
              "reward/source/dots_hacked/gamma_mean": 0.5,
              "reward/source/dots_clean/gamma_mean": 1.0} for i in range(1, 11)]
    steps[-1]["val/accuracy"] = 0.9
    s = ablate.summarize(steps)
    assert s["final_outcome"] == pytest.approx(0.8)      # mean of 0.6 ... 1.0
    assert s["auc_outcome"] == pytest.approx(0.55)
    assert s["val_accuracy"] == 0.9 and s["gamma_hacked"] == 0.5 and s["gamma_clean"] == 1.0
    assert np.isnan(s["gap_hacked"])
    text = ablate.table({"trust_grpo": {1: s, 2: {**s, "final_outcome": 0.6}}})
    assert "| trust_grpo | 0.700 ± 0.100 | 0.550 ± 0.000 |" in text and "n/a" in text
