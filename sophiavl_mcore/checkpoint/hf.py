"""The policy in Hugging Face format: loaded into this rank's Megatron stage at start-up
(:func:`load_hf_weights`), exported at the end (:func:`export_hf`).

There is one export, and it is atomic. Its HF directory is always written by
:func:`~sophiavl_mcore.checkpoint.convert.convert_mcore_to_hf`, which builds it in a temp
sibling (serving files copied from the source HF dir, ``checksums.json`` written inside)
and renames it into place, replacing an old export only once the new one is complete; a
crash leaves the old export (or none), and the next export removes the crashed one's temp
dir (:mod:`.atomic`). The source is either

- a training checkpoint directory (one process): checked against its manifest (every
  file's size and sha256, ``COMPLETE``'s seal on the manifest) before anything is read; or
- the live, sharded model (collective): each DP-rank-0 writes its (TP, PP) shard into a
  temp sibling of ``mcore_dir``, rank 0 adds the meta and ``checksums.json`` and renames
  it into place (the Megatron shards, kept), then merges them into the HF export.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sophiavl_mcore.atomic import publish_dir, remove_stale_siblings, tmp_sibling
from sophiavl_mcore.checkpoint.convert import (
    FORMAT,
    META_FILE,
    convert_mcore_to_hf,
    load_hf_into_model,
    save_mcore_shard,
    verify_mcore_dir,
)
from sophiavl_mcore.checkpoint.layout import all_gather_object, broadcast_object, current_layout
from sophiavl_mcore.checkpoint.manifest import write_checksums
from sophiavl_mcore.checkpoint.st_io import CheckpointError
from sophiavl_mcore.checkpoint.training import complete_checkpoints
from sophiavl_mcore.models.hf_config import load_config_json
from sophiavl_mcore.models.unwrap import checkpoint_view

if TYPE_CHECKING:
    from sophiavl_mcore.parallel import ParallelInfo

logger = logging.getLogger(__name__)

MAX_SHARD_BYTES = 4 * 2**30


def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path, info: ParallelInfo,
                    vocab_divisible_by: int = 1) -> dict[str, Any]:
    """Fill this rank's Qwen2.5-VL stage from an HF checkpoint via the conversion plan.

    Returns the checkpoint meta (layout, prefix, HF config) that :func:`export_hf`
    needs to export the live model later, and that is written next to its shards.
    """
    plan = load_hf_into_model(
        checkpoint_view(model), hf_dir, info.tp, info.pp, info.tp_rank, info.pp_rank,
        layers_per_stage=list(info.layers_per_stage) if info.layers_per_stage else None,
        vocab_divisible_by=vocab_divisible_by)
    return {
        "format": FORMAT, "version": 1, "tp": info.tp, "pp": info.pp,
        "layers_per_stage": plan.layers_per_stage, "te": plan.te, "hf_prefix": plan.hf_prefix,
        "vocab_divisible_by": vocab_divisible_by, "vocab_padded": plan.vocab_padded,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "hf_config": load_config_json(hf_dir),
    }


def export_hf(source: str | Path | torch.nn.Module, out_dir: str | Path, *,
              source_hf_dir: str | Path | None = None,
              model_meta: Mapping[str, Any] | None = None,
              mcore_dir: str | Path | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the policy as an HF checkpoint dir (config.json + safetensors + serving files
    + ``checksums.json``), atomically (see the module docstring).

    Args:
        source: a checkpoint directory (``step_XXXXXXXX``; a root means its newest
            complete checkpoint; verified against its manifest first, a damaged file
            raises ``CheckpointCorruptError`` naming it) — call on one process; or this
            rank's live model — collective, every rank calls it.
        out_dir: the HF directory to create (an existing one is replaced).
        source_hf_dir: HF dir whose tokenizer / processor / generation files are copied
            (so that ``vllm serve`` and ``transformers`` load the result).
        model_meta: conversion meta (:func:`load_hf_weights` or
            :func:`~sophiavl_mcore.checkpoint.convert.conversion_meta`); live model only.
        mcore_dir: where the live model's Megatron shards are kept (replaced atomically);
            live model only.
        max_shard_bytes: largest HF safetensors file.

    Returns:
        ``out_dir`` (on every rank).
    """
    out_dir = Path(out_dir)
    if isinstance(source, torch.nn.Module):
        if model_meta is None or mcore_dir is None:
            raise ValueError("export_hf of a live model needs model_meta (see load_hf_weights) "
                             "and mcore_dir (where its Megatron shards go)")
        return _export_live(source, out_dir, Path(mcore_dir), model_meta, source_hf_dir,
                            max_shard_bytes)
    src = Path(source)
    steps = complete_checkpoints(src)
    if steps:
        src = steps[max(steps)]
    if not (src / META_FILE).is_file():
        raise CheckpointError(
            f"{src / META_FILE} is missing: the checkpoint was saved without model_meta "
            "(pass CheckpointManager(model_meta=conversion_meta(...)))")
    verify_mcore_dir(src, require=True)  # before the meta is trusted or a shard is read
    return convert_mcore_to_hf(src, out_dir, max_shard_bytes=max_shard_bytes, progress=False,
                               verify=False, serving_files_from=source_hf_dir)


def _export_live(model: torch.nn.Module, out_dir: Path, mcore_dir: Path,
                 meta: Mapping[str, Any], source_hf_dir: str | Path | None,
                 max_shard_bytes: int) -> Path:
    """Collective: shards into a temp ``mcore_dir`` sibling, renamed into place by rank 0,
    which then converts them. Any rank's error is raised on every rank (none hangs)."""
    layout = current_layout()
    if (meta["tp"], meta["pp"]) != (layout.tp, layout.pp):
        raise ValueError(f"export_hf: model_meta is for tp={meta['tp']} pp={meta['pp']}, "
                         f"the live model has tp={layout.tp} pp={layout.pp}")
    if layout.rank == 0:
        mcore_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(mcore_dir)
    staging = tmp_sibling(mcore_dir, broadcast_object(
        secrets.token_hex(4) if layout.rank == 0 else None))
    error = None
    try:
        if layout.dp_rank == 0:  # DP replicas hold identical weights
            save_mcore_shard(checkpoint_view(model), staging, layout.tp_rank, layout.pp_rank,
                             meta=meta if layout.rank == 0 else None)
    except Exception as err:  # reported on every rank instead of hanging the others
        error = f"rank {layout.rank}: {err!r}"
    errors = [e for e in all_gather_object(error) if e is not None]  # every shard is written
    cause = None
    if layout.rank == 0:
        try:
            if not errors:
                write_checksums(staging)
                publish_dir(staging, mcore_dir)
                # The shards were written a moment ago by this job: converted without re-hashing.
                convert_mcore_to_hf(mcore_dir, out_dir, max_shard_bytes=max_shard_bytes,
                                    progress=False, verify=False, serving_files_from=source_hf_dir)
                logger.info("saved Megatron shards to %s and the HF export to %s", mcore_dir,
                            out_dir)
        except Exception as err:
            cause = err
            errors.append(f"rank 0: {err!r}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    errors = broadcast_object(errors)
    if errors:
        raise CheckpointError(f"exporting the live model to {mcore_dir} and {out_dir} failed: "
                              + "; ".join(errors)) from cause
    return out_dir
