"""SPMD rollout at 4 processes: every rank holds a vLLM engine shard, ``world / RTP``
engines answer their share of the step, responses reach the trainer's data-parallel
layout as tensors, and every sync leaves each engine computing Megatron's log-probs.

One short run per layout (tiny random Qwen2.5-VL, no warm start): the assertions are
about placement and exactness, not learning.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import IN_PROCESS_TRM, launch

PROMPTS, N, STEPS, VAL_SIZE = 8, 4, 2, 3
VAL_EVERY = STEPS  # validation at the last step only

LAYOUTS = {
    # trainer TP=2 × DP=2, two engines of rollout TP=2 (RTP = trainer TP)
    "tp2dp2_rtp2": ["parallel.tp=2", "parallel.pp=1", "rollout.tensor_parallel_size=2"],
    # trainer TP=2 × PP=2, four engines of rollout TP=1
    "tp2pp2_rtp1": ["parallel.tp=2", "parallel.pp=2", "rollout.tensor_parallel_size=1"],
    # trainer TP=1 × DP=4, two engines of rollout TP=2
    "tp1dp4_rtp2": ["parallel.tp=1", "parallel.pp=1", "rollout.tensor_parallel_size=2"],
}
ENGINES = {"tp2dp2_rtp2": 2, "tp2pp2_rtp1": 4, "tp1dp4_rtp2": 2}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def spmd_run(request, tmp_path_factory) -> tuple[str, list[dict], str, list[dict]]:
    name = request.param
    out = tmp_path_factory.mktemp(name)
    proc = launch(out, *LAYOUTS[name], f"train.total_steps={STEPS}", "warm_start.steps=0",
                  f"train.prompts_per_step={PROMPTS}", f"rollout.sampling.n={N}",
                  "rollout.sampling.max_tokens=12", "train.micro_batch_size=8",
                  # 3 held-out records over 2 or 4 engines: uneven work, one engine idle
                  f"train.val_every={VAL_EVERY}", f"train.val_size={VAL_SIZE}",
                  "train.log_samples_every=0", "export_hf=false", "rollout.cpu_kv_cache_gb=1",
                  *IN_PROCESS_TRM, nproc=4, timeout_s=1200)
    log = proc.stdout + proc.stderr
    (out / "launcher.log").write_text(log)
    if proc.returncode != 0:
        pytest.fail(f"{name}: exited with {proc.returncode}; last output:\n{log[-6000:]}")
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # the held-out records the job validated on: the first val_size of its task's split
    val = [json.loads(x) for x in (out / "task" / "val.jsonl").read_text().splitlines()]
    return name, steps, log, val[:VAL_SIZE]


@pytest.mark.slow
def test_every_engine_generates_its_share(spmd_run) -> None:
    name, steps, _, _ = spmd_run
    assert len(steps) == STEPS
    share = PROMPTS // ENGINES[name] * N
    for s in steps:
        assert s["rollout/engines"] == ENGINES[name]
        assert s["rollout/engine_responses_min"] == s["rollout/engine_responses_max"] == share
        assert s["rollout/responses"] == PROMPTS * N


@pytest.mark.slow
def test_engines_with_uneven_or_no_work_do_not_wait_for_each_other(spmd_run) -> None:
    """Validation deals 3 records to the engines (2+1, or 1+1+1+0): every engine runs a
    different number of forwards (vLLM must not all-reduce across them) and all 3
    records are graded."""
    _, steps, _, records = spmd_run
    assert steps[-1]["val/size"] == VAL_SIZE == len(records)
    assert "val/failed" not in steps[-1], steps[-1]


def _count(frac: float, size: int) -> int:
    """``frac`` of ``size`` records as the whole number it must be."""
    count = round(frac * size)
    assert abs(frac * size - count) < 1e-9 and 0 <= count <= size, (frac, size)
    return count


@pytest.mark.slow
def test_validation_metrics_are_counts_of_graded_records(spmd_run) -> None:
    """val/ metrics only at validation steps (train.val_every, and the last step); each is
    a count over the graded records (one greedy answer per record, binary for the dots
    task's numerical answers); the per-type accuracies, weighted by the type's records,
    make up val/accuracy; and an answer is only correct when well formed (the format gate)."""
    _, steps, _, records = spmd_run
    for s in steps:
        validated = s["step"] % VAL_EVERY == 0 or s["step"] == STEPS  # as train.py decides
        val_keys = sorted(k for k in s if k.startswith("val/"))
        assert bool(val_keys) == validated, (s["step"], val_keys)
    last = steps[-1]
    size = int(last["val/size"])
    correct = _count(last["val/accuracy"], size)
    well_formed = _count(last["val/format_ok_frac"], size)
    assert correct <= well_formed
    types = sorted({r["problem_type"] for r in records})
    per_type = {k for k in last if k.startswith("val/") and k.endswith("/accuracy")
                and k != "val/accuracy"}
    assert per_type == {f"val/{t.replace(' ', '_')}/accuracy" for t in types}, per_type
    by_type = [_count(last[f"val/{t.replace(' ', '_')}/accuracy"],
                      sum(r["problem_type"] == t for r in records)) for t in types]
    assert sum(by_type) == correct, (by_type, correct)


@pytest.mark.slow
def test_each_response_trained_exactly_once(spmd_run) -> None:
    _, steps, _, _ = spmd_run
    total = PROMPTS * N
    for s in steps:
        assert s["rollout/rows_trained"] == total
        assert s["rollout/rows_index_sum"] == total * (total - 1) / 2
        assert s["rollout/rows_index_sumsq"] == (total - 1) * total * (2 * total - 1) / 6


@pytest.mark.slow
def test_engines_match_megatron_after_each_sync(spmd_run) -> None:
    """Step k's responses come from the engines synced after step k−1 (step 1: the
    initial sync); their log-probs must equal Megatron's recomputation (float32)."""
    _, steps, _, _ = spmd_run
    for s in steps:
        assert s["train/logprob_mismatch_max"] <= 1e-5, s["train/logprob_mismatch_max"]


@pytest.mark.slow
def test_sync_bytes_are_reported_and_replica_local(spmd_run) -> None:
    name, steps, _, _ = spmd_run
    for s in steps:
        model, worst = s["weight_sync/bytes_model"], s["weight_sync/bytes_max_rank"]
        assert model > 0
        if name == "tp1dp4_rtp2":  # every rank holds the whole model: nothing to move
            assert worst == 0
        elif name == "tp2dp2_rtp2":  # the other TP half of the split tensors, at most
            assert 0 < worst <= model / 2
        else:  # TP=2 × PP=2: the other stage and the other TP half, never the whole model
            assert 0 < worst < model


@pytest.mark.slow
def test_log_is_not_flooded_by_a_repeated_library_warning(spmd_run) -> None:
    """vLLM's CPU worker warns on every refused torch.set_num_threads, which its own
    renderer calls around each request: once per rank, not once per request."""
    _, _, log, _ = spmd_run
    assert log.count("torch.set_num_threads") <= 4, log.count("torch.set_num_threads")
