"""Export a policy in Hugging Face format: from a training checkpoint directory (one
process) or from the live, sharded model (collective). Both go through the offline
converter (:func:`sophiavl_mcore.checkpoint.convert_mcore_to_hf`) into a temp directory
that is renamed into place, so a reader never sees a half-written export.

A checkpoint directory is checked against its manifest (every file's size and sha256,
``COMPLETE``'s seal on the manifest) before anything is read; the export carries
``checksums.json`` (size + sha256 of each of its files) for the next reader."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sophiavl_mcore.checkpoint import CheckpointError
from sophiavl_mcore.checkpoint.convert import verify_mcore_dir
from sophiavl_mcore.trainer.checkpointing import (
    _barrier,
    _broadcast,
    _model_file,
    _step_dirs,
    _unwrap,
    _write_tensors,
    current_layout,
)


def _convert_into(mcore_dir: Path, out_dir: Path, source_hf_dir: str | Path | None,
                  verify: bool) -> None:
    """convert_mcore_to_hf (+ serving files, checksums.json) into a temp dir, then rename
    into place."""
    from sophiavl_mcore.checkpoint import convert_mcore_to_hf

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{secrets.token_hex(4)}")
    try:
        convert_mcore_to_hf(mcore_dir, tmp, progress=False, verify=verify,
                            serving_files_from=source_hf_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_hf(source: str | Path | torch.nn.Module, out_dir: str | Path, *,
              source_hf_dir: str | Path | None = None,
              model_meta: Mapping[str, Any] | None = None) -> Path:
    """Write the policy as an HF checkpoint dir (config.json + safetensors + tokenizer).

    Args:
        source: a checkpoint directory (``step_XXXXXXXX``; a root means its newest
            complete checkpoint; verified against its manifest first, a damaged file
            raises ``CheckpointCorruptError`` naming it) — call on one process; or this
            rank's live model —
            collective, every rank calls it, each DP-rank-0 writes its shard, rank 0
            merges the shards.
        out_dir: the HF directory to create (replaced if it exists; written via a temp
            dir + rename).
        source_hf_dir: HF dir whose tokenizer / processor / generation files are copied
            (so that ``vllm serve`` and ``transformers`` load the result).
        model_meta: conversion meta (:func:`conversion_meta`); needed for a live model.

    Returns:
        ``out_dir``.
    """
    from sophiavl_mcore.checkpoint.convert import META_FILE

    out_dir = Path(out_dir)
    if not isinstance(source, torch.nn.Module):
        src = Path(source)
        steps = _step_dirs(src)
        if steps:
            src = steps[max(steps)]
        if not (src / META_FILE).is_file():
            raise CheckpointError(
                f"{src / META_FILE} is missing: the checkpoint was saved without model_meta "
                "(pass CheckpointManager(model_meta=conversion_meta(...)))")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        verify_mcore_dir(src, require=True)  # before the meta is trusted or a shard is read
        _convert_into(src, out_dir, source_hf_dir, verify=False)
        return out_dir
    if model_meta is None:
        raise ValueError("export_hf of a live model needs model_meta (see conversion_meta)")
    layout = current_layout()
    if (model_meta["tp"], model_meta["pp"]) != (layout.tp, layout.pp):
        raise ValueError(f"export_hf: model_meta is for tp={model_meta['tp']} pp={model_meta['pp']}, "
                         f"the live model has tp={layout.tp} pp={layout.pp}")
    nonce = _broadcast(secrets.token_hex(4) if layout.rank == 0 else None)
    staging = out_dir.with_name(f".{out_dir.name}.mcore-{nonce}")
    try:
        if layout.dp_rank == 0:
            _write_tensors(_unwrap(source), staging / _model_file(layout, "model"))
        if layout.rank == 0:
            (staging / META_FILE).write_text(json.dumps(dict(model_meta), indent=1))
        _barrier()
        if layout.rank == 0:  # files this job wrote a moment ago: nothing to verify
            _convert_into(staging, out_dir, source_hf_dir, verify=False)
        _barrier()
    finally:
        if layout.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
