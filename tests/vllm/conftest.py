"""Shared, expensive fixtures of the vLLM tests: ONE tiny Qwen2.5-VL checkpoint, ONE
in-process engine and ONE ``vllm serve`` subprocess for the whole session.

The server process starts as soon as the checkpoint exists, so it boots while the
in-process engine is being built; tests that need it call ``wait_healthy()``.
"""

from __future__ import annotations

import logging
import os

import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

logger = logging.getLogger(__name__)

API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory):
    from sophiavl_mcore.testing.tiny_models import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"))


@pytest.fixture(scope="session")
def trm_server(tiny_vl_dir, tmp_path_factory):
    """A real OpenAI-compatible vLLM server on a free localhost port (started, maybe
    not yet healthy: call ``wait_healthy()``)."""
    from sophiavl_mcore.rollout.server import VllmServer

    server = VllmServer(tiny_vl_dir, tmp_path_factory.mktemp("vllm_serve") / "server.log",
                        api_key=API_KEY).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def engine(tiny_vl_dir, trm_server):
    # trm_server is requested first so the server boots while this engine builds.
    from sophiavl_mcore.rollout import RolloutConfig, SamplingConfig
    from sophiavl_mcore.rollout.vllm_engine import VllmRolloutEngine

    cfg = RolloutConfig(model=str(tiny_vl_dir), dtype="float32", enforce_eager=True,
                        max_model_len=2048, max_num_seqs=64, seed=0,
                        sampling=SamplingConfig(n=2, max_tokens=8))
    eng = VllmRolloutEngine(cfg)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def healthy_server(trm_server):
    startup = trm_server.wait_healthy(timeout_s=400)
    logger.warning("vllm serve became healthy %.1f s after start", startup)
    return trm_server
