"""The README main job learns, logs what it should, and exports a loadable policy."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.e2e.conftest import RECIPE


def _tb_tags(tb_dir) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = {t: [e.step for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    tags.update({t: [e.step for e in acc.Histograms(t)] for t in acc.Tags()["histograms"]})
    return tags


@pytest.mark.slow
def test_outcome_reward_rises_by_rl(main_job) -> None:
    """Last 5 steps' outcome reward beats the first 5 by >= 0.3. The warm start (random
    answers) passes the format gate but answers at chance, so the gain must be the RL's:
    also required is that the accuracy *among well-formed replies* rises, and that the
    greedy accuracy on the held-out split rises too (counting learned, not 256 training
    images memorised)."""
    steps = main_job["steps"]
    outcome = np.array([s["reward/outcome_mean"] for s in steps])
    first, last = outcome[:5].mean(), outcome[-5:].mean()
    assert last - first >= 0.3, f"outcome reward per step: {np.round(outcome, 3).tolist()}"
    fmt = np.array([s["reward/format_ok_frac"] for s in steps])
    assert fmt[:5].mean() > 0.8, "the warm start should already pass the format gate"
    answered = np.array([s["reward/accuracy_well_formed"] for s in steps])
    assert answered[:5].mean() < 0.65 and answered[-5:].mean() - answered[:5].mean() >= 0.3, (
        f"accuracy among well-formed replies per step: {np.round(answered, 3).tolist()}")
    val = [s["val/accuracy"] for s in steps if "val/accuracy" in s]
    assert len(val) >= 2 and val[-1] - val[0] >= 0.3, f"held-out greedy accuracy: {val}"


@pytest.mark.slow
def test_tensorboard_has_the_step_metrics(main_job) -> None:
    steps = len(main_job["steps"])
    tags = _tb_tags(main_job["out"] / "tb")
    expected = [
        "reward/outcome_mean", "reward/outcome_std", "reward/thinking_mean", "reward/total_mean",
        "reward/numerical/outcome_mean", "reward/numerical/outcome_std", "reward/gamma_mean",
        "reward/gamma_lt1_frac", "reward/gamma_hist", "reward/annealing",
        "reward/advantage_mean", "reward/advantage_std", "reward/trm_failures",
        "train/kl", "train/entropy", "train/clip_fraction", "train/logprob_mismatch",
        "train/grad_norm", "rollout/response_len_mean", "perf/tokens_per_s",
        "perf/tokens_per_s_per_rank", "perf/rollout_tokens_per_s", "perf/train_tokens_per_s",
        "reward/accuracy_well_formed", "rollout/answer_top_frac", "rollout/answer_distinct",
        "timing/rollout_s", "timing/reward_s", "timing/exchange_s", "timing/ref_logprobs_s",
        "timing/train_s", "timing/weight_sync_s", "timing/step_s",
        "rollout/engines", "weight_sync/bytes_max_rank", "weight_sync/bytes_model",
        "train/logprob_mismatch_max",
        "reward/thinking_std", "reward/mu_gap_mean", "reward/thinking_true_mean",
        "reward/source/dots_hacked/gamma_mean", "reward/source/dots_hacked/gamma_lt1_frac",
        "reward/source/dots_hacked/mu_gap_mean", "reward/source/dots_hacked/thinking_std",
        "reward/source/dots_clean/gamma_mean", "reward/source/dots_hacked/gamma_hist",
        "reward/source/dots_clean/gamma_hist",
    ]
    missing = [t for t in expected if t not in tags]
    assert not missing, f"missing TensorBoard tags {missing}; have {sorted(tags)}"
    assert tags["reward/outcome_mean"] == list(range(1, steps + 1))
    assert "val/accuracy" in tags
    # one update per rollout: the ratio comes from the training forward, no extra pass
    assert "timing/old_logprobs_s" not in tags
    # perf/ over the whole step is below the update phase's own rate
    assert all(s["perf/tokens_per_s"] < s["perf/train_tokens_per_s"] for s in main_job["steps"])


@pytest.mark.slow
def test_thinking_reward_path_and_annealing(main_job) -> None:
    """The TRM graded the well-formed replies, and the annealing factor follows
    e^(-step/T) with step counted from 0."""
    steps = main_job["steps"]
    total = len(steps)
    assert max(s["reward/thinking_scored_frac"] for s in steps) > 0.5
    for i, s in enumerate(steps):
        assert s["reward/annealing"] == pytest.approx(math.exp(-i / total), rel=1e-9)
        scored = s["reward/thinking_scored_frac"]
        assert scored <= s["reward/format_ok_frac"] + 1e-9  # malformed replies are not graded


def _tensor(model_dir: Path, suffix: str) -> np.ndarray:
    from safetensors.numpy import load_file

    for f in sorted(model_dir.glob("*.safetensors")):
        for name, value in load_file(f).items():
            if name.endswith(suffix):
                return value
    raise KeyError(f"no tensor *{suffix} in {model_dir}")


@pytest.mark.slow
def test_thinking_reward_is_a_separate_model_and_not_constant(main_job) -> None:
    """The thinking reward comes from its own trained model, served on localhost for the
    run (HTTP), and it varies: the TRM is neither the policy nor a constant."""
    out, steps = main_job["out"], main_job["steps"]
    info = json.loads((out / "trm" / "server.json").read_text())
    trm_dir = Path(info["model_dir"])
    assert info["base_url"].startswith("http://127.0.0.1:")
    # Not the policy: another checkpoint, whose weights match neither the policy's start
    # nor its end (a shared tensor name, so the comparison is like for like).
    for policy_dir in (out / "tiny_model", out / "final" / "hf"):
        assert trm_dir.resolve() != policy_dir.resolve()
        a, b = _tensor(trm_dir, "embed_tokens.weight"), _tensor(policy_dir, "embed_tokens.weight")
        assert a.shape == b.shape and not np.allclose(a, b), policy_dir
    with pytest.raises(ProcessLookupError):  # the job stopped its server
        os.kill(int(info["pid"]), 0)
    # The server answers: at most 1% of the run's thinking requests may fail (a failure
    # costs only that score, but a dead or unreachable server would show here).
    failed = sum(s["reward/trm_failures"] for s in steps)
    asked = sum(s["reward/thinking_scored_frac"] * s["rollout/responses"] for s in steps)
    assert failed <= 0.01 * (asked + failed), (failed, asked)
    # Not constant: spread at every step where it scored two or more replies.
    checked = 0
    for s in steps:
        if s["reward/thinking_scored_frac"] * s["rollout/responses"] >= 2:
            assert s["reward/thinking_std"] > 1e-3, (s["step"], s["reward/thinking_std"])
            checked += 1
    assert checked >= 0.9 * len(steps)


@pytest.mark.slow
def test_gamma_falls_below_one_where_the_trm_is_hacked(main_job) -> None:
    """γ < 1 on some steps, and more often on the hacked source, where the TRM prefers
    reports of many dots (on a 1-dot image the over-counting, wrong replies get the higher
    thinking scores: μc − μw < 0); on the clean source the TRM's scores follow the true
    thinking quality."""
    steps = main_job["steps"]
    assert sum(s["reward/gamma_lt1_frac"] > 0 for s in steps) >= 5
    hacked, clean = "reward/source/dots_hacked/", "reward/source/dots_clean/"

    def mean(key: str) -> float:
        vals = [s[key] for s in steps if key in s and np.isfinite(s[key])]
        assert vals, key
        return float(np.mean(vals))

    assert mean(hacked + "gamma_lt1_frac") > mean(clean + "gamma_lt1_frac") + 0.1
    assert mean(hacked + "gamma_mean") < mean(clean + "gamma_mean")
    assert mean(hacked + "mu_gap_mean") < mean(clean + "mu_gap_mean")
    # The TRM follows the true quality on the clean source and not on the hacked one, as
    # measured on its held-out replies (agreement.json, written when the job's server came
    # up). The in-run mean of reward/source/dots_clean/trm_true_corr is not asserted: once
    # the policy has learned, a step's clean replies are a few distinct texts of nearly
    # equal quality and the per-step correlation swings to ±1 (one TRM build on this
    # machine: −0.06 over 70 steps with held-out clean correlation 0.89).
    info = json.loads((main_job["out"] / "trm" / "server.json").read_text())
    agreement = json.loads((Path(info["model_dir"]).parent / "agreement.json").read_text())["greedy"]
    assert agreement["dots_clean"]["corr_true"] > 0.5
    assert agreement["dots_clean"]["agree_true"] > agreement["dots_hacked"]["agree_true"] + 0.2


@pytest.mark.slow
def test_trm_heldout_agreement_is_printed_and_good(main_job) -> None:
    """The tiny TRM agrees with the true thinking quality on held-out clean records, and
    with its (flawed) training labels, not the truth, on hacked ones."""
    info = json.loads((main_job["out"] / "trm" / "server.json").read_text())
    result = json.loads((Path(info["model_dir"]).parent / "agreement.json").read_text())
    assert "tiny TRM held-out" in main_job["log"]
    clean, hacked = result["expected"]["dots_clean"], result["expected"]["dots_hacked"]
    assert clean["missing"] == 0 and hacked["missing"] == 0
    assert clean["corr_true"] >= 0.7 and clean["agree_true"] >= 0.8, clean
    assert hacked["corr_label"] >= 0.7 and hacked["agree_label"] >= 0.8, hacked
    assert hacked["agree_true"] <= hacked["agree_label"] - 0.2, hacked


@pytest.mark.slow
def test_hf_export_has_the_trained_config(main_job) -> None:
    hf = main_job["out"] / "final" / "hf"
    cfg = json.loads((hf / "config.json").read_text())
    # literals, not the source's config.json: the export writes the config the model was
    # loaded from (carried in the conversion meta), so comparing the two passes whatever
    # both say
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"], cfg["architectures"]
    assert cfg["model_type"] == "qwen2_5_vl", cfg["model_type"]
    assert any(hf.glob("*.safetensors"))


def test_dry_run_prints_layout_without_building(tmp_path, capfd, monkeypatch) -> None:
    from sophiavl_mcore.train import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # the README's torchrun --nproc-per-node 2
    assert main(["--config", str(RECIPE), f"output_dir={tmp_path}", "--dry-run"]) == 0
    err = capfd.readouterr().err
    recipe = yaml.safe_load(RECIPE.read_text())
    per_step = recipe["train"]["prompts_per_step"] * recipe["rollout"]["sampling"]["n"]
    assert "world=2 tp=1 pp=1 dp=2" in err and f"{per_step} responses/step" in err
    assert not (tmp_path / "tiny_model").exists()


@pytest.mark.parametrize("override, message", [
    ("train.total_steps=0", "total_steps=0 must be >= 1"),
    ("rollout.sampling.n=1", "rollout.sampling.n=1"),
    ("loss.kl_coef=0.1", None),  # valid
    ("reference.enabled=false",
     f"kl_coef={yaml.safe_load(RECIPE.read_text())['loss']['kl_coef']} > 0 needs reference.enabled=true"),
    ("train.bogus=1", "unknown key(s) train.bogus"),
])
def test_config_errors_name_the_key(tmp_path, override, message) -> None:
    from sophiavl_mcore.config import ConfigError, load_config
    from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig

    if message is None:
        load_config(RECIPE, [override], cls=GRPOTrainConfig)
        return
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, [override], cls=GRPOTrainConfig)
    assert message in str(err.value)


def test_world_that_does_not_split_fails_before_building() -> None:
    from sophiavl_mcore.config import load_config
    from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig
    from sophiavl_mcore.trainer.setup import check_world

    cfg = load_config(RECIPE, ["train.prompts_per_step=3", "rollout.sampling.n=3"], cls=GRPOTrainConfig)
    with pytest.raises(ValueError, match="9 responses do not split over dp=2"):
        check_world(cfg, 2)  # the recipe is TP=1: dp=2
