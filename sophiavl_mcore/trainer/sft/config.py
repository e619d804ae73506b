"""The TRM job's config (SFT of the Thinking Reward Model): batch geometry, the
SophiaVL-R1-Thinking records, and :class:`TRMTrainConfig`, everything
``python -m sophiavl_mcore.trm_train`` reads.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from sophiavl_mcore.data.config import ImageConfig
from sophiavl_mcore.parallel.config import ParallelConfig
from sophiavl_mcore.rewards.config import ThinkingRewardConfig
from sophiavl_mcore.trainer.config import ModelConfig, OptimConfig, check_schedule

# ------------------------------------------------------------------ TRM job (SFT)


@dataclasses.dataclass
class SFTConfig:
    """SFT batch geometry (sizes in examples / tokens).

    Attributes:
        global_batch_size: examples per optimizer update, over all DP ranks.
        micro_batch_size: examples per forward/backward on one rank.
        max_seq_len: longest example (prompt + target tokens, image tokens included);
            longer ones are dropped and counted by the data code.
        pad_to_multiple_of: micro-batch length is rounded up to this.
        train_steps: optimizer updates in the run.
        log_every: console metrics every this many updates.
    """

    global_batch_size: int = 32
    micro_batch_size: int = 4
    max_seq_len: int = 4096
    pad_to_multiple_of: int = 8
    train_steps: int = 100
    log_every: int = 1

    def __post_init__(self) -> None:
        errors = []
        for name in ("global_batch_size", "micro_batch_size", "max_seq_len",
                     "pad_to_multiple_of", "train_steps", "log_every"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.micro_batch_size > self.global_batch_size:
            errors.append(f"micro_batch_size={self.micro_batch_size} exceeds "
                          f"global_batch_size={self.global_batch_size}")
        if errors:
            raise ValueError("sft: " + "; ".join(errors))

    def check_dp(self, dp: int) -> None:
        """The global batch must split evenly over ``dp`` data-parallel ranks."""
        if self.global_batch_size % dp:
            raise ValueError(f"sft.global_batch_size={self.global_batch_size} is not divisible by "
                             f"the data-parallel size dp={dp}")


@dataclasses.dataclass
class TRMDataConfig:
    """SophiaVL-R1-Thinking records; ``image_root`` defaults to the file's directory.

    The prompt is the TRM client's (:func:`~sophiavl_mcore.rewards.thinking.build_messages`):
    ``prompt_template`` / ``system_prompt`` are passed to it as they are (empty / None =
    the client's defaults), so serve the trained model with the same two settings
    (``rewards.thinking.prompt_template`` / ``system_prompt``).
    """

    path: str = ""
    image_root: str = ""
    seed: int = 1234
    shuffle: bool = True
    max_reasoning_chars: int = 12000  # as the TRM client truncates at inference
    prompt_template: str = ""
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        self.thinking_config()  # a template that cannot be read fails here, named

    def thinking_config(self) -> ThinkingRewardConfig:
        """The client settings that shape the prompt (everything else: defaults)."""
        extra = {} if self.system_prompt is None else {"system_prompt": self.system_prompt}
        return ThinkingRewardConfig(max_reasoning_chars=self.max_reasoning_chars,
                                    prompt_template=self.prompt_template, **extra)


@dataclasses.dataclass
class TRMTrainConfig:
    """Everything ``trm_train`` reads; unknown keys are errors (see :mod:`sophiavl_mcore.config`).

    ``images`` was ``image`` before the GRPO and TRM recipes shared section names; a
    recipe that still says ``image:`` is refused with a message naming the new key.
    """

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"image": "images"}

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: TRMDataConfig = dataclasses.field(default_factory=TRMDataConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    images: ImageConfig = dataclasses.field(default_factory=ImageConfig)
    output_dir: str = ""
    export_hf: bool = True

    def __post_init__(self) -> None:
        missing = [k for k, v in (("model.hf_dir", self.model.hf_dir), ("data.path", self.data.path),
                                  ("output_dir", self.output_dir)) if not v]
        if missing:
            raise ValueError(f"trm_train: {', '.join(missing)} must be set")
        if self.model.tiny:
            raise ValueError("trm_train: model.tiny is the GRPO job's stand-in policy; "
                             "set model.hf_dir to the checkpoint to fine-tune")
        check_schedule(self.optim, self.sft.train_steps)
