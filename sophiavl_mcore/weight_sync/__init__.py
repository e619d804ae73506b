"""Weight sync: the trainer's Megatron weights (TP shards, PP stages) → the rollout engine.

Public API::

    WeightSync (interface: sync(version) -> SyncReport, policy_version)
    WeightSyncConfig, WeightSyncError, SyncReport
    MegatronWeightSync(model, hf_config, engine, cfg, *, engine_ranks=None)
        (every rank's engine shard by default, or one rank's engine; buckets)
    vllm_access: release_engine_default_group, close_colocated_engine, VllmReadBack
    vllm_inplace / vllm_repack: the engine write (``WeightSyncConfig.engine_update``)

``MegatronWeightSync`` imports Megatron lazily, so importing this package is cheap.
"""

from sophiavl_mcore.weight_sync.config import WeightSyncConfig
from sophiavl_mcore.weight_sync.interface import SyncReport, WeightSync, WeightSyncError

__all__ = ["MegatronWeightSync", "SyncReport", "WeightSync", "WeightSyncConfig", "WeightSyncError"]


def __getattr__(name: str):
    if name == "MegatronWeightSync":
        from sophiavl_mcore.weight_sync.megatron_sync import MegatronWeightSync

        return MegatronWeightSync
    raise AttributeError(name)
