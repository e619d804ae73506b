"""The trainer's shared config sections: the ``model`` section both jobs read
(:class:`ModelConfig`) and the optimizer / LR schedule (:class:`OptimConfig`).

The job configs compose them: ``GRPOTrainConfig`` (:mod:`.grpo.config`, what
``python -m sophiavl_mcore.train`` reads) and ``TRMTrainConfig`` (:mod:`.sft.config`, what
``python -m sophiavl_mcore.trm_train`` reads). Sections owned by other packages come from
their ``config`` modules. Unknown keys and ill-typed values are errors
(:mod:`sophiavl_mcore.config`); each ``__post_init__`` checks what the types cannot.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

# ------------------------------------------------------------------ optimizer


@dataclasses.dataclass
class OptimConfig:
    """Megatron's Adam (or SGD) + LR schedule. ``lr`` is the peak; steps count updates.

    Attributes:
        optimizer: ``adam`` (AdamW) or ``sgd`` (with ``sgd_momentum``). SGD moves each
            weight in proportion to its gradient, where Adam moves every weight with a
            non-zero gradient by about ``lr``: for tiny models at large learning rates
            that difference decides whether updates stay on the few weights that carry
            the reward signal.
        lr: peak learning rate (after warmup).
        min_lr: floor of the decay (cosine / linear end at ``min_lr``).
        weight_decay: decoupled (AdamW) weight decay; Megatron skips biases and norms.
        adam_beta1, adam_beta2, adam_eps: Adam moments.
        clip_grad: global L2 gradient-norm clip; 0 disables clipping.
        warmup_steps: linear warmup from 0 to ``lr`` over this many updates.
        decay_style: ``cosine`` / ``linear`` to ``min_lr`` after warmup, or ``constant``.
        decay_steps: updates over which the LR decays (warmup included, Megatron's
            convention); 0 = the run's total steps.
        use_distributed_optimizer: shard optimizer state over data-parallel ranks.
    """

    optimizer: Literal["adam", "sgd"] = "adam"
    sgd_momentum: float = 0.9
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int = 0
    use_distributed_optimizer: bool = False

    def __post_init__(self) -> None:
        errors = []
        if not self.lr > 0:
            errors.append(f"lr={self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            errors.append(f"need 0 <= min_lr={self.min_lr} <= lr={self.lr}")
        if self.weight_decay < 0:
            errors.append(f"weight_decay={self.weight_decay} must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 0 <= self.sgd_momentum < 1:
            errors.append(f"sgd_momentum={self.sgd_momentum} must be in [0, 1)")
        if not self.adam_eps > 0:
            errors.append(f"adam_eps={self.adam_eps} must be > 0")
        if self.clip_grad < 0:
            errors.append(f"clip_grad={self.clip_grad} must be >= 0 (0 disables)")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            errors.append(f"warmup_steps={self.warmup_steps} and decay_steps={self.decay_steps} "
                          "must be >= 0")
        if self.decay_steps and self.warmup_steps >= self.decay_steps:
            errors.append(f"warmup_steps={self.warmup_steps} must be < decay_steps={self.decay_steps}")
        if errors:
            raise ValueError("optim: " + "; ".join(errors))


def decay_horizon(cfg: OptimConfig, total_steps: int) -> int:
    """Updates over which the LR decays: ``decay_steps``, else the run's ``total_steps``.

    A ``constant`` schedule without ``decay_steps`` never decays, so its horizon only has
    to clear the warmup (Megatron's scheduler asserts warmup < horizon): a short debug
    run of a recipe with a 10-step warmup then simply ends while still warming up.
    """
    if cfg.decay_steps:
        return cfg.decay_steps
    if cfg.decay_style == "constant":
        return max(total_steps, cfg.warmup_steps + 1)
    return total_steps


def check_schedule(cfg: OptimConfig, total_steps: int) -> int:
    """Megatron's scheduler needs warmup_steps < the decay horizon (strictly); returns
    that horizon (:func:`decay_horizon`)."""
    decay_steps = decay_horizon(cfg, total_steps)
    if total_steps < 1 or cfg.warmup_steps >= decay_steps:
        raise ValueError(f"optim: warmup_steps={cfg.warmup_steps} must be < the decay horizon "
                         f"{decay_steps} (decay_steps={cfg.decay_steps}, total_steps={total_steps})")
    return decay_steps



# ------------------------------------------------------------------ model


@dataclasses.dataclass
class ModelConfig:
    """The ``model`` section of both jobs: an HF Qwen2.5-VL checkpoint (``hf_dir``) and
    how to hold it — the GRPO policy, or the TRM that ``trm_train`` fine-tunes.

    ``tiny`` (GRPO only): a tiny random policy built into ``<output_dir>/tiny_model``
    instead (hidden 128, head_dim 64; the CPU main job).
    """

    hf_dir: str = ""
    tiny: bool = False
    tiny_layers: int = 2
    dtype: Literal["float32", "bfloat16"] = "float32"
    vocab_divisible_by: int = 1
    freeze_vision: bool = False
    # Transformer Engine FP8 linear layers (GPU + TE only; rejected on the local spec).
    fp8: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] | None = None
    # Megatron activation recompute of the decoder ("selective": attention core only;
    # "full": whole layers, ``recompute_method`` over ``recompute_num_layers`` layers).
    recompute_granularity: Literal["selective", "full"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None

    def __post_init__(self) -> None:
        errors = []
        if self.fp8_recipe is not None and self.fp8 is None:
            errors.append(f"model.fp8_recipe={self.fp8_recipe!r} needs model.fp8 (e4m3 or hybrid)")
        full = self.recompute_granularity == "full"
        if full and (self.recompute_method is None or not self.recompute_num_layers):
            errors.append("model.recompute_granularity='full' needs model.recompute_method "
                          f"(got {self.recompute_method!r}) and model.recompute_num_layers >= 1 "
                          f"(got {self.recompute_num_layers!r})")
        if not full and (self.recompute_method is not None or self.recompute_num_layers):
            errors.append(f"model.recompute_method={self.recompute_method!r} / "
                          f"recompute_num_layers={self.recompute_num_layers!r} apply only to "
                          f"recompute_granularity='full' (got {self.recompute_granularity!r})")
        if errors:
            raise ValueError("; ".join(errors))

    def transformer_overrides(self) -> dict[str, Any]:
        """FP8 + recompute keyword arguments for ``build_qwen2_lm`` (unset ones left out)."""
        keys = ("fp8", "fp8_recipe", "recompute_granularity", "recompute_method",
                "recompute_num_layers")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

