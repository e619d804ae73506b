"""Session fixtures of the weight-sync tests: ONE tiny Qwen2.5-VL checkpoint, a
persistent 2-rank gloo world whose rank 0 holds one vLLM engine (``engine_world``), and
a 2-rank world with an SPMD engine on every rank, as training builds it (``spmd_world``).

The checkpoint is GQA (4 heads, 2 KV groups, head_dim 64) with 4 layers so that TP=2
and PP=2 both split it; text-only tests sync a Megatron Qwen2.5 LM into the engine's
language model (M-RoPE on text tokens is plain RoPE), the VL test syncs everything.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # _world / _cases for spawned ranks

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

logger = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def ws_model_dir(tmp_path_factory) -> Path:
    from sophiavl_mcore.testing.tiny_models import TinyModelSpec, build_tiny_qwen2_5_vl

    spec = TinyModelSpec(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                         intermediate_size=512, vision_hidden_size=128, vision_heads=2, seed=11)
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("ws_tiny_vl"), spec)


@pytest.fixture(scope="session")
def ws_wide_config_dir(ws_model_dir, tmp_path_factory) -> Path:
    """The same config with a wider FFN (768 instead of 512): shapes the engine rejects."""
    cfg = json.loads((ws_model_dir / "config.json").read_text())
    for section in (cfg, cfg.get("text_config") or {}):
        if "intermediate_size" in section:
            section["intermediate_size"] = 768
    out = tmp_path_factory.mktemp("ws_wide")
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="session")
def engine_world(ws_model_dir):
    from _world import EngineWorld

    world = EngineWorld(2, dict(model=str(ws_model_dir), dtype="float32", enforce_eager=True,
                                max_model_len=512, max_num_seqs=4, seed=0,
                                enable_prefix_caching=False))
    yield world
    world.close()


@pytest.fixture(scope="session")
def spmd_world(ws_model_dir):
    from _world import EngineWorld

    world = EngineWorld(2, dict(model=str(ws_model_dir), dtype="float32", enforce_eager=True,
                                max_model_len=512, max_num_seqs=4, seed=0,
                                enable_prefix_caching=False), spmd=True)
    yield world
    world.close()
