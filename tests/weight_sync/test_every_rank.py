"""The training path: every rank holds an SPMD vLLM engine (``spmd_world``) and
``MegatronWeightSync`` runs with its default ``engine_ranks`` (every rank); trainer
TP=2 (each rank receives the other TP rank's pieces) and PP=2 (each rank receives the
other stage's layers); float32 end to end."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from _cases import every_rank_case

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ATOL = 1e-4
logger = logging.getLogger(__name__)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_every_rank_engine_takes_the_weights(spmd_world, ws_model_dir, tp, pp):
    results = spmd_world.run(every_rank_case, str(ws_model_dir), tp, pp, 707 + tp)
    last = next(r for r in results if r["last_stage"])
    for r in results:
        # a misplaced engine is refused on every rank at set-up, with the same message
        assert len(r["setup_errors"]) == 2 and r["setup_errors"] == results[0]["setup_errors"]
        assert "rank 1 holds an engine" in r["setup_errors"][0]
        assert "rank 1 got an engine but engine_ranks=[0]" in r["setup_errors"][1]
        # every engine serves Megatron's weights, bit-equal on read-back
        diff = np.abs(r["vllm"] - last["mcore"]).max()
        logger.warning(f"tp={tp} pp={pp} rank {r['rank']}: max |vLLM - Megatron| = {diff:.2e}; "
                       f"received {r['report']['received']} of {r['bytes_model']} B")
        assert np.abs(r["vllm_before"] - last["mcore"]).max() > 0.05
        assert diff < ATOL
        assert r["report"]["debug"] == 0.0 and r["report"]["version"] == r["engine_version"] == 7
        # each rank receives what its replica holds elsewhere: some, never the whole model
        assert 0 < r["report"]["received"] < r["bytes_model"]
        assert r["report"]["sent"] > 0
        # refused before anything moved: same message everywhere, engines unchanged
        assert r["refused"] is not None and "before loading anything" in r["refused"]
        assert r["refused"] == results[0]["refused"]
        assert r["version_after_refusal"] == 7
        np.testing.assert_array_equal(r["vllm_after_refusal"], r["vllm"])
        # a failure inside the engines is raised on every rank; a good sync repairs
        assert r["engine_error"] is not None and "inside an engine" in r["engine_error"]
        assert r["engine_error"] == results[0]["engine_error"]
        assert r["repaired"]["debug"] == 0.0 and r["repaired"]["version"] == 8
        assert np.abs(r["vllm_repaired"] - last["mcore"]).max() < ATOL
