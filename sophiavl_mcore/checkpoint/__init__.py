"""Everything on disk: HF ⇄ Megatron checkpoints (name/layout map, streaming conversion,
per-rank load/save), training checkpoints (:mod:`.training`: ``CheckpointManager``) and
the atomic HF export of the policy (:mod:`.hf`: ``export_hf``, ``load_hf_weights``).

Public API::

    build_plan(dims, tp, pp, *, layers_per_stage, te, hf_prefix, vocab_divisible_by,
               config_json) -> ConversionPlan          (rules, rank_specs, shard, merge)
    register_extra_rules(model_type, provider)          (hook; Qwen2.5-VL visual.* is built in)
    convert_hf_to_mcore(hf_dir, out_dir, tp, pp, ...) ; convert_mcore_to_hf(mcore_dir, out)
    load_mcore_shard / save_mcore_shard / load_hf_into_model  (live models)

Training checkpoints and the HF export are imported from their modules
(``from sophiavl_mcore.checkpoint.hf import export_hf``).
"""

from sophiavl_mcore.checkpoint.convert import (
    FORMAT,
    convert_hf_to_mcore,
    convert_mcore_to_hf,
    load_hf_into_model,
    load_mcore_shard,
    plan_from_meta,
    rank_file,
    read_meta,
    save_mcore_shard,
)
from sophiavl_mcore.checkpoint.mapping import (
    ConversionPlan,
    Rule,
    build_plan,
    default_hf_prefix,
    register_extra_rules,
)
from sophiavl_mcore.checkpoint.st_io import CheckpointError, StreamingWriter, open_hf_dir

__all__ = [
    "FORMAT",
    "CheckpointError",
    "ConversionPlan",
    "Rule",
    "StreamingWriter",
    "build_plan",
    "convert_hf_to_mcore",
    "convert_mcore_to_hf",
    "default_hf_prefix",
    "load_hf_into_model",
    "load_mcore_shard",
    "open_hf_dir",
    "plan_from_meta",
    "rank_file",
    "read_meta",
    "register_extra_rules",
    "save_mcore_shard",
]
