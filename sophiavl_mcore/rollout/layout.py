"""Where the rollout engines live: ``world / RTP`` SPMD vLLM engines, one per block of
``rollout.tensor_parallel_size`` (RTP) consecutive ranks, and which prompts each takes.

Pure arithmetic (no process group), so ``--dry-run``, ``tools/plan.py`` and the trainer
agree on the layout before anything is built. Engine ``e`` is ranks
``[e·RTP, (e+1)·RTP)`` — vLLM's ``external_launcher`` orders its data-parallel replicas
outermost, so this is the block it forms from the shared world. Its leader is the
first of them. The step's prompts are dealt to engines as whole groups: engine ``e``
answers prompts ``[e·P/E, (e+1)·P/E)`` with all N samples of each.
"""

from __future__ import annotations

import dataclasses


class EngineLayoutError(ValueError):
    """An impossible rollout layout; the message carries every number involved."""


@dataclasses.dataclass(frozen=True)
class EngineLayout:
    """``world`` ranks in ``world / rtp`` engines; ``prompts`` prompts per step of
    ``n`` samples each."""

    world: int
    rtp: int
    prompts: int
    n: int

    @property
    def num_engines(self) -> int:
        return self.world // self.rtp

    @property
    def prompts_per_engine(self) -> int:
        return self.prompts // self.num_engines

    @property
    def responses_per_engine(self) -> int:
        return self.prompts_per_engine * self.n

    def engine_of(self, rank: int) -> int:
        return rank // self.rtp

    def ranks_of(self, engine: int) -> list[int]:
        return list(range(engine * self.rtp, (engine + 1) * self.rtp))

    def leader(self, engine: int) -> int:
        return engine * self.rtp

    def prompt_range(self, engine: int) -> range:
        """Indices (into the step's prompts) that ``engine`` answers."""
        per = self.prompts_per_engine
        return range(engine * per, (engine + 1) * per)

    def response_range(self, engine: int) -> range:
        """Indices (into the step's group-major responses) that ``engine`` produces."""
        per = self.responses_per_engine
        return range(engine * per, (engine + 1) * per)

    def describe(self) -> str:
        engines = "; ".join(f"engine {e}: ranks {self.ranks_of(e)} prompts "
                            f"{self.prompt_range(e).start}-{self.prompt_range(e).stop - 1}"
                            for e in range(self.num_engines))
        return (f"{self.num_engines} rollout engine(s) of TP={self.rtp} over {self.world} ranks, "
                f"{self.prompts_per_engine} prompts × n={self.n} each: {engines}")


def check_engine_layout(world: int, rtp: int, prompts: int, n: int, *, num_heads: int,
                        num_kv_heads: int, vision_heads: int | None = None,
                        ranks_per_node: int | None = None) -> EngineLayout:
    """Validate the rollout layout; raises :class:`EngineLayoutError` naming every number.

    ``num_heads`` / ``num_kv_heads``: the language model's; ``vision_heads``: the vision
    tower's (vLLM shards it ``rtp`` ways too); ``ranks_per_node``: an engine must not
    span nodes (its TP all-reduces run every token).
    """
    problems = []
    if rtp < 1:
        problems.append(f"rollout.tensor_parallel_size={rtp} must be >= 1")
    else:
        if world % rtp:
            problems.append(f"rollout.tensor_parallel_size={rtp} does not divide world_size={world}")
        elif prompts % (world // rtp):
            problems.append(f"train.prompts_per_step={prompts} does not split into "
                            f"{world // rtp} engines (world_size={world} / rollout TP={rtp})")
        if num_heads % rtp:
            problems.append(f"num_attention_heads={num_heads} is not divisible by rollout TP={rtp}")
        if (num_kv_heads % rtp) if rtp <= num_kv_heads else (rtp % num_kv_heads):
            problems.append(f"num_key_value_heads={num_kv_heads} and rollout TP={rtp}: one must "
                            "divide the other (vLLM splits or replicates KV heads)")
        if vision_heads is not None and vision_heads % rtp:
            problems.append(f"vision num_heads={vision_heads} is not divisible by rollout TP={rtp}")
        if ranks_per_node is not None and ranks_per_node % rtp:
            problems.append(f"rollout TP={rtp} does not divide the {ranks_per_node} ranks per node "
                            "(an engine would span nodes)")
    if problems:
        raise EngineLayoutError(
            f"impossible rollout layout (world_size={world}, rollout TP={rtp}, "
            f"prompts_per_step={prompts}, n={n}): " + "; ".join(problems))
    return EngineLayout(world, rtp, prompts, n)
