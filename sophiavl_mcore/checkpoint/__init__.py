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

from sophiavl_mcore.lazy import lazy_attributes

# Imported on first use, so that importing the package (e.g. for one of its
# torch-free submodules) does not import torch: tools/plan.py needs only the name/layout map.
_EXPORTS = {
    "FORMAT": "sophiavl_mcore.checkpoint.convert",
    "convert_hf_to_mcore": "sophiavl_mcore.checkpoint.convert",
    "convert_mcore_to_hf": "sophiavl_mcore.checkpoint.convert",
    "load_hf_into_model": "sophiavl_mcore.checkpoint.convert",
    "load_mcore_shard": "sophiavl_mcore.checkpoint.convert",
    "plan_from_meta": "sophiavl_mcore.checkpoint.convert",
    "rank_file": "sophiavl_mcore.checkpoint.convert",
    "read_meta": "sophiavl_mcore.checkpoint.convert",
    "save_mcore_shard": "sophiavl_mcore.checkpoint.convert",
    "ConversionPlan": "sophiavl_mcore.checkpoint.mapping",
    "Rule": "sophiavl_mcore.checkpoint.mapping",
    "build_plan": "sophiavl_mcore.checkpoint.mapping",
    "default_hf_prefix": "sophiavl_mcore.checkpoint.mapping",
    "register_extra_rules": "sophiavl_mcore.checkpoint.mapping",
    "CheckpointError": "sophiavl_mcore.checkpoint.st_io",
    "StreamingWriter": "sophiavl_mcore.checkpoint.st_io",
    "open_hf_dir": "sophiavl_mcore.checkpoint.st_io",
}
__getattr__ = lazy_attributes(__name__, _EXPORTS)

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
