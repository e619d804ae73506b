"""Typed config: defaults, recipes as diffs, overrides, and early clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sophiavl_mcore.config import ConfigError, apply_overrides, load_config, to_dict

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "examples" / "configs").rglob("*.yaml"))


def load(recipe=None, overrides=()):
    """The training config with the least it needs (a tiny model, the synthetic task)."""
    from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig

    return load_config(recipe, ["model.tiny=true", "task.enabled=true", *overrides],
                       cls=GRPOTrainConfig)


def test_defaults_match_the_paper() -> None:
    cfg = load()
    assert cfg.rewards.trust_grpo.alpha == 0.3
    assert cfg.rewards.trust_grpo.use_trust and cfg.rewards.trust_grpo.use_annealing
    assert cfg.rewards.format_weight == 0.0


def test_overrides_are_typed() -> None:
    cfg = load(None, ["rewards.trust_grpo.alpha=0.5", "rewards.trust_grpo.use_trust=false", "seed=7"])
    assert cfg.rewards.trust_grpo.alpha == 0.5
    assert cfg.rewards.trust_grpo.use_trust is False
    assert cfg.seed == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("rewards.trust_grpo.alpah=0.5", r"unknown key\(s\) rewards\.trust_grpo\.alpah.*valid keys.*alpha"),
        ("rewards.trust_grpo.use_trust=maybe", r"rewards\.trust_grpo\.use_trust: expected true/false, got 'maybe'"),
        ("seed=1.5", r"seed: expected an integer, got 1\.5"),
        ("rewards=3", r"rewards: expected a mapping"),
        ("nonsense", r"not of the form key\.sub=value"),
    ],
)
def test_bad_overrides_fail_with_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(None, [override])


def test_recipe_base_chain_and_unknown_recipe(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("seed: 3\nrewards:\n  format_weight: 0.1\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nrewards:\n  trust_grpo:\n    alpha: 0.2\n")
    cfg = load(tmp_path / "child.yaml")
    assert (cfg.seed, cfg.rewards.format_weight, cfg.rewards.trust_grpo.alpha) == (3, 0.1, 0.2)
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "missing.yaml")


def test_override_into_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="seed is a value"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_round_trip_through_dict() -> None:
    cfg = load(None, ["rewards.trust_grpo.alpha=0.25"])
    assert load(None, []).rewards.trust_grpo.alpha != cfg.rewards.trust_grpo.alpha
    data = to_dict(cfg)
    assert data["rewards"]["trust_grpo"]["alpha"] == 0.25


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_loads(recipe: Path) -> None:
    if recipe.name.startswith("trm_"):
        # TRM fine-tuning is its own job with its own config; paths come from the CLI.
        from sophiavl_mcore.trainer.sft.config import TRMTrainConfig

        load_config(recipe, ["model.hf_dir=hf", "data.path=d.jsonl", "output_dir=out"], cls=TRMTrainConfig)
    else:
        from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig

        load_config(recipe, cls=GRPOTrainConfig)


@pytest.mark.parametrize("recipe", sorted((REPO / "examples" / "configs" / "ablations").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_ablation_is_the_main_job_with_its_switches(recipe: Path) -> None:
    """Paper Table 3 from one recipe: each ablation differs from tiny_cpu.yaml only in
    its output directory and the Trust-GRPO switches its name says (no_trust_no_annealing
    flips two, the others one)."""
    from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig

    base = to_dict(load_config(REPO / "examples" / "configs" / "tiny_cpu.yaml", cls=GRPOTrainConfig))
    ablation = to_dict(load_config(recipe, cls=GRPOTrainConfig))
    assert ablation.pop("output_dir") != base.pop("output_dir")
    base_switches = base["rewards"].pop("trust_grpo")
    switches = ablation["rewards"].pop("trust_grpo")
    assert ablation == base
    flipped = sorted(k for k in switches if switches[k] != base_switches[k])
    expected = {"no_trust": ["use_trust"], "no_annealing": ["use_annealing"],
                "plain_grpo": ["use_thinking"],
                "no_trust_no_annealing": ["use_annealing", "use_trust"]}[recipe.stem]
    assert flipped == expected, flipped


def test_recipes_exist() -> None:
    assert RECIPES, "examples/configs has no recipes"


def test_sections_compose_and_lists_of_sections_are_checked() -> None:
    cfg = load(None, ["parallel.tp=2", "data.sources=[{path: a.jsonl, weight: 2}]",
                             "images.image_mean=[0.5, 0.5, 0.5]", "loss.kl_coef=0.01"])
    assert (cfg.parallel.tp, cfg.data.sources[0].path, cfg.data.sources[0].weight) == (2, "a.jsonl", 2.0)
    assert cfg.images.image_mean == (0.5, 0.5, 0.5) and cfg.loss.kl_coef == 0.01
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.pth"):
        load(None, ["data.sources=[{pth: a.jsonl}]"])
    with pytest.raises(ConfigError, match=r"parallel\.backend: 'mpi' is not one of"):
        load(None, ["parallel.backend=mpi"])


def test_logprob_micro_batch_size_is_checked() -> None:
    from sophiavl_mcore.trainer.grpo.config import GRPORunConfig

    assert GRPORunConfig(logprob_micro_batch_size=64).logprob_micro_batch_size == 64
    with pytest.raises(ValueError, match="logprob_micro_batch_size=-1 must be >= 0"):
        GRPORunConfig(logprob_micro_batch_size=-1)
