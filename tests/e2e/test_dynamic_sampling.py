"""Dynamic sampling (DAPO's filter) in the real job: groups whose rewards are all equal
are dropped and replaced by further prompts, the batch keeps its size, and engines that
already have their quota sit later rounds out while the others generate."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import launch

PROMPTS, N, STEPS, ROUNDS = 8, 4, 3, 6


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dynamic")
    # a partial warm start: replies are sometimes right, so some groups have variance
    # and some (all right or all wrong) do not; outcome reward only (plain GRPO): a
    # thinking score spreads nearly every group's final rewards, leaving nothing to filter
    proc = launch(out, f"train.total_steps={STEPS}", "warm_start.steps=60",
                  f"train.prompts_per_step={PROMPTS}", f"rollout.sampling.n={N}",
                  "train.dynamic_sampling=true", f"train.max_sampling_rounds={ROUNDS}",
                  "train.val_every=0", "train.log_samples_every=0", "export_hf=false", "rewards.trust_grpo.use_thinking=false")
    log = proc.stdout + proc.stderr
    (out / "launcher.log").write_text(log)
    if proc.returncode != 0:
        pytest.fail(f"exited with {proc.returncode}; last output:\n{log[-6000:]}")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kept_batch_has_its_size_and_no_zero_variance_group(dynamic_run) -> None:
    assert len(dynamic_run) == STEPS
    for s in dynamic_run:
        assert s["rollout/rows_trained"] == PROMPTS * N
        assert s["rollout/responses"] == PROMPTS * N
        assert 1 <= s["rollout/sampling_rounds"] <= 1 + ROUNDS
        if s["rollout/sampling_rounds"] < 1 + ROUNDS:  # rounds to spare: every group kept has signal
            assert s["rollout/zero_variance_kept"] == 0
        generated = s["rollout/groups_generated"]
        assert generated >= PROMPTS
        # the groups with signal that were kept were generated (and no more were kept)
        with_signal = round(generated * (1 - s["rollout/filtered_frac"]))
        assert with_signal >= PROMPTS - s["rollout/zero_variance_kept"]


@pytest.mark.slow
def test_the_filter_acted(dynamic_run) -> None:
    """Over the run some groups were filtered and replaced (else the test shows nothing)."""
    assert sum(s["rollout/filtered_frac"] for s in dynamic_run) > 0
    assert max(s["rollout/sampling_rounds"] for s in dynamic_run) > 1
