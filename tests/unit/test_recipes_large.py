"""The shipped 7B / 72B recipes load into GRPOTrainConfig, pass the project's layout checks
(trainer and rollout engines) at their intended world size, run the rollout topology their
comments describe, and carry the paper's hyperparameters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sophiavl_mcore.config import load_config
from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig
from sophiavl_mcore.trainer.setup import check_world

ROOT = Path(__file__).resolve().parents[2]
RECIPES = [
    ("qwen2_5_vl_7b_8xh100.yaml", "qwen2_5_vl_7b_instruct.json", 8),
    ("qwen2_5_vl_72b_64xh100.yaml", "qwen2_5_vl_72b_instruct.json", 64),
]
# What the recipes' comments say: (rollout TP, engines, prompts per engine, dp).
# 7B: one engine per TP=2 pair of 8 GPUs → 4 engines, 64 / 4 = 16 prompts; dp = 8 / 4.
# 72B: one engine per node of 8 → 8 engines, 64 / 8 = 8 prompts; dp = 64 / (8·4).
TOPOLOGY = {"qwen2_5_vl_7b_8xh100.yaml": (2, 4, 16, 2), "qwen2_5_vl_72b_64xh100.yaml": (8, 8, 8, 2)}


@pytest.mark.parametrize("recipe,config_json,world", RECIPES)
def test_recipe_loads_and_validates(recipe: str, config_json: str, world: int, tmp_path: Path) -> None:
    path = ROOT / "examples" / "configs" / recipe
    cfg = load_config(path, cls=GRPOTrainConfig)
    assert cfg.model.hf_dir.startswith("/path/to/")  # documented placeholder
    # the placeholder stands for a checkpoint dir; give it the public config.json
    shutil.copy(ROOT / "tools" / "configs" / config_json, tmp_path / "config.json")
    cfg = load_config(path, [f"model.hf_dir={tmp_path}"], cls=GRPOTrainConfig)
    dp = check_world(cfg, world)
    assert dp * cfg.parallel.tp * cfg.parallel.pp == world
    assert cfg.parallel.sequence_parallel and cfg.optim.use_distributed_optimizer
    assert cfg.model.dtype == "bfloat16"
    assert 8 % cfg.rollout.tensor_parallel_size == 0  # an engine stays inside a node
    # paper: group 8, α 0.3, β_KL 0.04, lr 5e-7..6e-7, temperature 1.0
    assert cfg.rollout.sampling.n == 8
    assert cfg.rewards.trust_grpo.alpha == 0.3
    assert cfg.loss.kl_coef == 0.04 and cfg.reference.enabled
    assert 5e-7 <= cfg.optim.lr <= 6e-7
    assert cfg.rollout.sampling.temperature == 1.0
    # a wrong world size is refused by the same check
    with pytest.raises(ValueError, match="world_size"):
        check_world(cfg, world + 1)


@pytest.mark.parametrize("recipe,config_json,world", RECIPES)
def test_recipe_runs_the_topology_its_comments_describe(recipe: str, config_json: str,
                                                        world: int, caplog, monkeypatch) -> None:
    from sophiavl_mcore.rollout.layout import check_engine_layout
    from sophiavl_mcore.trainer import setup
    from sophiavl_mcore.trainer.setup import model_config

    monkeypatch.setattr(setup, "_CONFIG_FALLBACKS_LOGGED", set())

    path = ROOT / "examples" / "configs" / recipe
    assert "engine_rank" not in path.read_text()  # obsolete: every rank holds an engine
    cfg = load_config(path, cls=GRPOTrainConfig)
    # the placeholder hf_dir has no config.json: the shipped one is read, by its name
    with caplog.at_level("WARNING"):
        cfg_json = model_config(cfg)
        model_config(cfg)
    shipped = ROOT / "tools" / "configs" / config_json
    assert [r.getMessage() for r in caplog.records if "has no config.json" in r.getMessage()] == [
        f"model.hf_dir={cfg.model.hf_dir} has no config.json: using the shipped {shipped} for "
        "the model's dimensions"]  # once per directory
    assert cfg_json == json.loads(shipped.read_text())
    rtp, engines, per_engine, dp = TOPOLOGY[recipe]
    assert check_world(cfg, world) == dp
    layout = check_engine_layout(
        world, cfg.rollout.tensor_parallel_size, cfg.train.prompts_per_step, cfg.rollout.sampling.n,
        num_heads=cfg_json["num_attention_heads"], num_kv_heads=cfg_json["num_key_value_heads"],
        vision_heads=cfg_json["vision_config"]["num_heads"], ranks_per_node=8)
    assert (layout.rtp, layout.num_engines, layout.prompts_per_engine) == (rtp, engines, per_engine)
    assert cfg.responses_per_step % dp == 0


@pytest.mark.parametrize("recipe,config_json,world", RECIPES)
def test_recipe_fp8_and_recompute_build_a_megatron_config(recipe: str, config_json: str,
                                                          world: int) -> None:
    """The FP8 and recompute keys are Megatron TransformerConfig-valid for the real model
    dims and layout (the TE layers themselves need a GPU: tests/gpu)."""
    import torch

    from sophiavl_mcore.models.hf_config import make_transformer_config, read_lm_dims

    cfg = load_config(ROOT / "examples" / "configs" / recipe, cls=GRPOTrainConfig)
    assert cfg.model.fp8 == "e4m3" and cfg.model.fp8_recipe in ("tensorwise", "blockwise")
    assert cfg.model.recompute_granularity == "full"
    dims = read_lm_dims(ROOT / "tools" / "configs" / config_json)
    tc = make_transformer_config(dims, cfg.parallel, dtype=torch.bfloat16, cpu=True,
                                 perform_initialization=False, **cfg.model.transformer_overrides())
    assert (tc.fp8, tc.fp8_recipe) == ("e4m3", cfg.model.fp8_recipe)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == (
        "full", "uniform", 1)
    assert tc.tensor_model_parallel_size == cfg.parallel.tp and tc.sequence_parallel
