"""Weight sync from real Megatron-Core (gloo TP=2 / PP=2) into a real in-process vLLM
engine living in rank 0 of the same gloo world; float32 end to end.

Max abs log-prob differences are logged (WARNING level, shown by pytest) and asserted below 1e-4.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from _cases import failing_case, text_case, vl_case

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ATOL = 1e-4
logger = logging.getLogger(__name__)


def _last(results):
    return next(r for r in results if r["last_stage"])


def test_tp2_sync_matches_megatron_then_optimizer_step(engine_world, ws_model_dir):
    results = engine_world.run(text_case, str(ws_model_dir), 2, 1, 101, True)
    r0, last = results[0], _last(results)
    before, mcore, vllm = r0["vllm_before"], last["mcore"], r0["vllm"]
    diff = np.abs(vllm - mcore).max()
    logger.warning(f"TP=2: max |vLLM - Megatron| log-prob = {diff:.2e} over {len(mcore)} tokens; "
          f"sync {r0['report']}")
    assert mcore.shape == vllm.shape == (15,)
    assert np.abs(before - mcore).max() > 0.05  # the engine really held other weights
    assert diff < ATOL
    assert r0["report"]["debug"] == 0.0  # engine weights bit-equal to the trainer's
    assert r0["report"]["buckets"] > 3 and r0["report"]["tensors"] > 20
    assert r0["engine_version"] == r0["version_before"] + 1
    assert results[1]["policy_version"] == 100  # every rank learns the engine's version
    assert results[1]["report"]["sent"] > 0

    # after one SGD step: outputs move, and the engine still matches Megatron
    stepped, vstep = last["mcore_step"], r0["vllm_step"]
    moved = np.abs(stepped - mcore).max()
    diff2 = np.abs(vstep - stepped).max()
    logger.warning(f"after step: Megatron moved {moved:.3f}, max |vLLM - Megatron| = {diff2:.2e}, "
          f"version {r0['report_step']['version']}")
    assert moved > 0.01 and np.abs(vstep - vllm).max() > 0.01
    assert diff2 < ATOL
    assert r0["report_step"]["version"] == 100


def test_pp2_sync_global_layer_indices(engine_world, ws_model_dir):
    results = engine_world.run(text_case, str(ws_model_dir), 1, 2, 202, False)
    r0, last = results[0], _last(results)
    assert last["rank"] == 1 and not r0["last_stage"]
    diff = np.abs(r0["vllm"] - last["mcore"]).max()
    logger.warning(f"PP=2: max |vLLM - Megatron| log-prob = {diff:.2e}; peak RSS delta per rank "
          f"{[r['report']['rss'] for r in results]} B")
    assert np.abs(r0["vllm_before"] - last["mcore"]).max() > 0.05
    assert diff < ATOL
    assert r0["report"]["debug"] == 0.0
    assert results[1]["report"]["sent"] > 0  # stage 1's layers came from rank 1


def test_qwen2_5_vl_with_image(engine_world, ws_model_dir):
    results = engine_world.run(vl_case, str(ws_model_dir), 2, 1, 303)
    r0, last = results[0], _last(results)
    assert r0["vllm_ids"] == r0["ids"]  # same expanded image tokens on both sides
    diff = np.abs(r0["vllm"] - last["mcore"]).max()
    logger.warning(f"VL TP=2 with image ({len(r0['ids'])} tokens): max |vLLM - Megatron| = {diff:.2e}")
    assert np.abs(r0["vllm_before"] - last["mcore"]).max() > 0.05
    assert diff < ATOL
    assert r0["report"]["debug"] == 0.0


def test_failed_sync_leaves_engine_unchanged(engine_world, ws_model_dir, ws_wide_config_dir):
    results = engine_world.run(failing_case, str(ws_model_dir), str(ws_wide_config_dir), 404)
    r0 = results[0]
    for r in results:  # every rank raised, with the same message
        assert len(r["errors"]) == 2, r["errors"]
        assert r["errors"] == r0["errors"]
    name_err, shape_err = r0["errors"]
    assert "before loading anything" in name_err and r0["renamed"] in name_err
    assert r0["renamed"].replace("down_prj", "down_proj") in name_err  # closest-name hint
    assert "shape mismatch" in shape_err and "[768, 256]" in shape_err and "[512, 256]" in shape_err
    assert r0["version_after"] == r0["version_before"]
    np.testing.assert_array_equal(r0["vllm_after"], r0["vllm_before"])
    # a failure inside the engine (past validation): the senders are drained, every
    # rank raises the same error, and the next good sync works
    for r in results:
        assert r["engine_error"] is not None and r["engine_error"] == r0["engine_error"]
        assert "inside an engine: rank 0:" in r["engine_error"]
        assert r["repaired"]["debug"] == 0.0 and r["repaired"]["version"] == r0["version_after"] + 1


def test_vision_update_reaches_cached_images(engine_world, ws_model_dir):
    """After each weight update the next requests for an already-seen image neither miss
    the encoder cache (an exception) nor get the old tower's embedding: outputs follow
    the weights exactly (perturbed → different and equal to Megatron, restored →
    identical to the original)."""
    from _cases import encoder_cache_case

    results = engine_world.run(encoder_cache_case, str(ws_model_dir), 505)
    r0, last = results[0], _last(results)
    assert r0["vision_params"] > 0
    assert np.abs(r0["perturbed"] - r0["original"]).max() > 1e-3  # not a stale embedding
    for phase in ("original", "perturbed", "restored"):
        assert np.abs(r0[phase] - last[f"mcore_{phase}"]).max() < ATOL, phase
    assert np.abs(r0["restored"] - r0["original"]).max() < 1e-6
