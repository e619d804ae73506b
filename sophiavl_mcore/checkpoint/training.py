"""Training checkpoints: atomic per-rank save, exact resume, retention (the HF export of
a checkpoint is :func:`sophiavl_mcore.checkpoint.hf.export_hf`).

A checkpoint is one directory under the run's checkpoint root::

    <root>/step_00000010/
        mp_rank_{tp:02d}_{pp:03d}/model.safetensors   this (TP, PP) rank's weights, written
                                                      by DP rank 0 (replicas are identical):
                                                      the layout of sophiavl_mcore.checkpoint
        mp_rank_{tp:02d}_{pp:03d}/<name>.safetensors  further named models, if any
        rank_state/tp{tp:02d}_pp{pp:03d}_dp{dp:03d}.pt every rank: optimizer, LR scheduler,
                                                      RNG streams, module extra states
                                                      (torch.save; loads with weights_only)
        mcore_checkpoint.json, config.json            conversion meta (when given), so that
                                                      ``convert_mcore_to_hf`` reads the dir
        trainer_state.json                            step + the caller's ``extra_state``
        manifest.json                                 layout, model config, every file with
                                                      its size and sha256
        COMPLETE                                      written last: step + manifest sha256
    <root>/latest                                     name of the newest checkpoint

Atomicity: every rank writes into ``step_XXXXXXXX.tmp-<nonce>/`` and fsyncs its files;
after a collective (which is the barrier) rank 0 writes the manifest and ``COMPLETE``,
fsyncs, renames the directory to ``step_XXXXXXXX`` (atomic on POSIX) and replaces
``latest`` by write-temp + rename. A process killed at any point therefore leaves either
no new ``step_`` directory or a complete one; stale ``.tmp-`` directories are ignored and
removed by the next save / :meth:`CheckpointManager.load_latest`. ``latest`` is a
convenience pointer: loading trusts only directories that carry ``COMPLETE``. The root
must be on a filesystem every rank sees (one shared directory across nodes).

Untrusted bytes: the rank state loads with ``torch.load(weights_only=True)``, and module
extra states (Transformer Engine's FP8 state, which TE's ``set_extra_state`` unpickles)
reach the modules only after :func:`sophiavl_mcore.checkpoint.extra_state.sanitize_extra_states`
has decoded them with a restricted unpickler (tensors and plain data) and re-encoded them;
anything else is refused with an error naming the tensor. Exports and conversions check
the manifest before reading (``checkpoint.manifest.verify_dir``).

Resume is exact: with the same layout, the next training step after
:meth:`CheckpointManager.load_latest` is bit-identical to the one an uninterrupted run
would take (weights, Adam moments and step counts, LR schedule position, python / numpy /
torch CPU / CUDA generators and Megatron's model-parallel RNG tracker are restored).

Corruption policy (``CheckpointConfig.on_corrupt``): a file of the newest checkpoint that
is missing or whose size / sha256 differs from the manifest is an error naming the file
(``"error"``, the default: silently training from an older state loses work unnoticed),
or, with ``"fallback"``, a warning and the previous complete checkpoint is tried. A
layout or model-config mismatch is always an error (it is not corruption).

Distributed optimizer (ZeRO-1, GPU only): its per-DP-rank parameter state is saved with
megatron-core's ``get_parameter_state_dp_reshardable`` (no gather) and restored with
``load_parameter_state_from_dp_reshardable``. That path cannot run on CPU (mcore 0.16
rejects CPU parameters), so it is untested here.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from sophiavl_mcore.atomic import atomic_write_text, fsync_path
from sophiavl_mcore.checkpoint.config import CheckpointConfig
from sophiavl_mcore.checkpoint.convert import META_FILE, copy_shard_into
from sophiavl_mcore.checkpoint.extra_state import sanitize_extra_states
from sophiavl_mcore.checkpoint.layout import (
    RankLayout,
    all_gather_object,
    barrier,
    broadcast_object,
    current_layout,
)
from sophiavl_mcore.checkpoint.manifest import (
    COMPLETE,
    MANIFEST,
    TRAIN_FORMAT,
    CheckpointCorruptError,
    check_files,
    read_training_manifest,
    sha256_file,
)
from sophiavl_mcore.checkpoint.st_io import CheckpointError, StreamingWriter
from sophiavl_mcore.checkpoint.train_state import (
    capture_rng_state,
    dict_diff,
    json_default,
    load_optimizer_state,
    model_config,
    optimizer_state,
    restore_rng_state,
)
from sophiavl_mcore.models.unwrap import checkpoint_view

logger = logging.getLogger(__name__)

__all__ = ["LATEST", "TRAINER_STATE", "CheckpointManager", "LoadedCheckpoint",
           "complete_checkpoints"]

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
_STEP_RE = re.compile(r"^step_(\d{8})$")
_STALE_RE = re.compile(r"^step_\d{8}\.(tmp|old)-[0-9a-f]+$")


@dataclasses.dataclass
class LoadedCheckpoint:
    """What :meth:`CheckpointManager.load_latest` restored.

    ``extra_state`` is the caller's dict as saved (JSON types); training continues with
    step ``step + 1``.
    """

    step: int
    path: Path
    extra_state: dict[str, Any]


# ------------------------------------------------------------------ filesystem


def complete_checkpoints(root: Path) -> dict[int, Path]:
    """Complete checkpoints under ``root`` by step (directories with ``COMPLETE``)."""
    matches = [(_STEP_RE.match(p.name), p) for p in root.iterdir()] if root.is_dir() else []
    return {int(m.group(1)): p for m, p in matches if m and (p / COMPLETE).is_file()}


def _remove_stale(root: Path) -> list[str]:
    """Delete leftovers of interrupted saves (``.tmp-`` / ``.old-`` dirs); rank 0 only."""
    removed = [p.name for p in root.iterdir() if _STALE_RE.match(p.name)] if root.is_dir() else []
    for name in removed:
        shutil.rmtree(root / name, ignore_errors=True)
    if removed:
        logger.warning("removed %d interrupted checkpoint dir(s) in %s: %s", len(removed), root,
                       removed)
    return removed


# ------------------------------------------------------------------ models / optimizer


def _named_models(models: torch.nn.Module | Mapping[str, torch.nn.Module]
                  ) -> dict[str, torch.nn.Module]:
    named = {"model": models} if isinstance(models, torch.nn.Module) else dict(models)
    for name in named:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"model name {name!r} must match [A-Za-z0-9_]+ (it becomes a file name)")
    return {name: checkpoint_view(m) for name, m in named.items()}


def _split_state(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, extra states) of ``module.state_dict()``; extra states only if tensors."""
    tensors, extra = {}, {}
    for k, v in module.state_dict().items():
        if k.endswith("_extra_state"):
            if isinstance(v, torch.Tensor):
                extra[k] = v.detach().cpu().clone()
        elif isinstance(v, torch.Tensor):
            tensors[k] = v
    return tensors, extra


def _write_tensors(module: torch.nn.Module, path: Path) -> dict[str, Any]:
    tensors, extra = _split_state(module)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    with StreamingWriter(path, specs) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return extra


def _read_tensors(module: torch.nn.Module, path: Path, extra: Mapping[str, Any],
                  extra_from: Path) -> None:
    """Copy a shard into ``module`` in place (optimizer references stay valid); extra
    states (saved in ``extra_from``) only through the restricted decoder."""
    own, _ = _split_state(module)
    copy_shard_into(own, path)
    if extra:
        module.load_state_dict(sanitize_extra_states(extra, str(extra_from)), strict=False)


# ------------------------------------------------------------------ the manager


def _rank_state_name(layout: RankLayout) -> str:
    return f"rank_state/tp{layout.tp_rank:02d}_pp{layout.pp_rank:03d}_dp{layout.dp_rank:03d}.pt"


def _model_file(layout: RankLayout, name: str) -> str:
    return f"mp_rank_{layout.tp_rank:02d}_{layout.pp_rank:03d}/{name}.safetensors"


class CheckpointManager:
    """Save / resume training state under one root directory (see the module docstring).

    Every rank constructs it with the same arguments and calls :meth:`save` and
    :meth:`load_latest` collectively.

    Args:
        root: checkpoint root (shared by all ranks).
        keep_last: complete checkpoints kept after each save.
        save_interval: :meth:`should_save` is true every this many steps (0: only last).
        on_corrupt: ``error`` or ``fallback`` (see the module docstring).
        checksum: ``sha256`` or ``size``.
        model_meta: conversion meta of the model named ``model`` (see
            :func:`conversion_meta`); written as ``mcore_checkpoint.json`` + ``config.json``
            so that checkpoints export to HF, and its HF config is checked at load.
        on_file_written: called with each file's path once it is written and fsynced
            (progress reporting; the kill-safety test pauses here).
    """

    def __init__(self, root: str | Path, keep_last: int = 2, save_interval: int = 0, *,
                 on_corrupt: Literal["error", "fallback"] = "error",
                 checksum: Literal["sha256", "size"] = "sha256",
                 model_meta: Mapping[str, Any] | None = None,
                 on_file_written: Callable[[Path], None] | None = None) -> None:
        CheckpointConfig(dir=str(root), save_interval=save_interval, keep_last=keep_last,
                         on_corrupt=on_corrupt, checksum=checksum)  # validates
        self.root = Path(root)
        self.keep_last = keep_last
        self.save_interval = save_interval
        self.on_corrupt = on_corrupt
        self.checksum = checksum
        self.model_meta = dict(model_meta) if model_meta is not None else None
        self.on_file_written = on_file_written
        self.resume_mode: Literal["auto", "never", "must"] = "auto"

    @classmethod
    def from_config(cls, cfg: CheckpointConfig, model_meta: Mapping[str, Any] | None = None
                    ) -> CheckpointManager:
        if not cfg.dir:
            raise ValueError("checkpoint.dir is empty: checkpointing is disabled")
        mgr = cls(cfg.dir, cfg.keep_last, cfg.save_interval, on_corrupt=cfg.on_corrupt,
                  checksum=cfg.checksum, model_meta=model_meta)
        mgr.resume_mode = cfg.resume
        return mgr

    def resume(self, models: torch.nn.Module | Mapping[str, torch.nn.Module], optimizer: Any = None,
               scheduler: Any = None) -> LoadedCheckpoint | None:
        """Start-of-run restore per ``resume_mode`` (``CheckpointConfig.resume``)."""
        if self.resume_mode == "never":
            return None
        loaded = self.load_latest(models, optimizer, scheduler)
        if loaded is None and self.resume_mode == "must":
            raise CheckpointError(f"checkpoint.resume=must but {self.root} holds no complete "
                                  "checkpoint")
        return loaded

    def should_save(self, step: int, total_steps: int | None = None) -> bool:
        """True every ``save_interval`` steps and after the last step."""
        return (self.save_interval > 0 and step % self.save_interval == 0) or step == total_steps

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(complete_checkpoints(self.root))

    # -- save ----------------------------------------------------------------------------

    def _record(self, tmp: Path, rel: str) -> tuple[str, dict[str, Any]]:
        path = tmp / rel
        fsync_path(path)
        info: dict[str, Any] = {"size": path.stat().st_size}
        if self.checksum == "sha256":
            info["sha256"] = sha256_file(path)
        if self.on_file_written is not None:
            self.on_file_written(path)
        return rel, info

    def _write_rank_files(self, tmp: Path, layout: RankLayout, models: dict[str, torch.nn.Module],
                          optimizer: Any, scheduler: Any) -> dict[str, dict[str, Any]]:
        files: dict[str, dict[str, Any]] = {}
        extras: dict[str, Any] = {}
        for name, module in models.items():
            if layout.dp_rank == 0:  # DP replicas hold identical weights
                rel = _model_file(layout, name)
                extras[name] = _write_tensors(module, tmp / rel)
                files.update([self._record(tmp, rel)])
            else:
                extras[name] = _split_state(module)[1]
        state = {
            "optimizer": optimizer_state(optimizer) if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": capture_rng_state(),
            "model_extra_state": extras,
        }
        rel = _rank_state_name(layout)
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp / rel)
        files.update([self._record(tmp, rel)])
        return files

    def save(self, step: int, models: torch.nn.Module | Mapping[str, torch.nn.Module],
             optimizer: Any = None, scheduler: Any = None,
             extra_state: Mapping[str, Any] | None = None) -> Path:
        """Write checkpoint ``step`` atomically (collective: every rank calls it).

        Args:
            step: optimizer steps completed (the run continues with ``step + 1``).
            models: this rank's model (named ``model``, the one exported to HF) or a
                mapping name → model; DDP wrappers are unwrapped.
            optimizer: Megatron optimizer (or any torch optimizer); scheduler likewise.
            extra_state: JSON-serialisable run state, identical on every rank (data
                sampler position, Trust-GRPO step/total steps, policy version, config
                snapshot; dataclasses are converted). Saved by rank 0.

        Returns:
            The checkpoint directory ``root/step_XXXXXXXX``.
        """
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
        layout = current_layout()
        named = _named_models(models)
        try:
            extra_json = json.dumps({"step": step, "extra_state": dict(extra_state or {})},
                                    default=json_default, indent=1)
        except TypeError as err:
            raise CheckpointError(f"extra_state for step {step} cannot be saved as JSON: {err}") from err
        if layout.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            _remove_stale(self.root)
        nonce = broadcast_object(secrets.token_hex(6) if layout.rank == 0 else None)
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"{final.name}.tmp-{nonce}"
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            files, error = self._write_rank_files(tmp, layout, named, optimizer, scheduler), None
        except Exception as err:  # reported on every rank instead of hanging the others
            files, error = {}, f"rank {layout.rank}: {err!r}"
        gathered = all_gather_object((files, error))  # also the barrier: every rank's files are durable
        errors = [e for _, e in gathered if e is not None]
        if errors:
            if layout.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"saving checkpoint step {step} to {tmp} failed: "
                                  + "; ".join(errors))
        if layout.rank == 0:
            merged = {rel: info for part, _ in gathered for rel, info in part.items()}
            self._finish(step, tmp, final, layout, named, merged, extra_json)
        barrier()  # nobody returns (or starts the next save) before the rename
        return final

    def _finish(self, step: int, tmp: Path, final: Path, layout: RankLayout,
                named: dict[str, torch.nn.Module], files: dict[str, dict[str, Any]],
                extra_json: str) -> None:
        """Rank 0: shared files, manifest, COMPLETE, rename, ``latest``, retention."""
        texts = {TRAINER_STATE: extra_json}
        if self.model_meta is not None:
            texts[META_FILE] = json.dumps(self.model_meta, indent=1)
            texts["config.json"] = json.dumps(self.model_meta["hf_config"], indent=2)
        for rel, text in texts.items():
            (tmp / rel).write_text(text)
            files.update([self._record(tmp, rel)])
        manifest = {
            "format": TRAIN_FORMAT, "version": 1, "step": step, "layout": layout.sizes(),
            "model_config": model_config(named, self.model_meta),
            "models": sorted(named), "checksum": self.checksum,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "files": dict(sorted(files.items())),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        fsync_path(tmp / MANIFEST)
        (tmp / COMPLETE).write_text(json.dumps({"step": step,
                                                "manifest_sha256": sha256_file(tmp / MANIFEST)}))
        fsync_path(tmp / COMPLETE)
        for d in {(tmp / rel).parent for rel in files} | {tmp}:
            fsync_path(d)
        old = None
        if final.exists():  # re-saving a step (e.g. after falling back to an older one)
            old = final.with_name(f"{final.name}.old-{secrets.token_hex(6)}")
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_path(self.root)
        atomic_write_text(self.root / LATEST, final.name + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._retain(step)
        logger.info("saved checkpoint %s (%d files, %.1f MiB)", final, len(files),
                    sum(f["size"] for f in files.values()) / 2**20)

    def _retain(self, step: int) -> None:
        steps = complete_checkpoints(self.root)
        for s in sorted(steps):
            if s > step:  # a newer checkpoint of an abandoned timeline would win at resume
                logger.warning("removing %s: newer than the checkpoint just saved (step %d)",
                               steps[s], step)
                shutil.rmtree(steps[s], ignore_errors=True)
        kept = [s for s in sorted(steps) if s <= step]
        for s in kept[:-self.keep_last]:
            shutil.rmtree(steps[s], ignore_errors=True)
            logger.info("removed old checkpoint %s (keep_last=%d)", steps[s], self.keep_last)

    # -- load ----------------------------------------------------------------------------

    def _read_manifest(self, path: Path) -> dict[str, Any]:
        return read_training_manifest(path)

    def _check_compatible(self, path: Path, manifest: Mapping[str, Any], layout: RankLayout,
                          named: dict[str, torch.nn.Module]) -> None:
        saved = manifest["layout"]
        if saved != layout.sizes():
            raise CheckpointError(
                f"checkpoint {path} was written with layout {RankLayout.describe(saved)}, this run "
                f"has {RankLayout.describe(layout.sizes())}; resume needs the same layout "
                "(to change it: export_hf the checkpoint, then convert_hf_to_mcore)")
        if sorted(named) != manifest["models"]:
            raise CheckpointError(f"checkpoint {path} holds models {manifest['models']}, this run "
                                  f"passes {sorted(named)}")
        diff = dict_diff(manifest["model_config"], model_config(named, self.model_meta))
        if diff:
            raise CheckpointError(f"checkpoint {path} was written for another model config: "
                                  + "; ".join(diff[:10]))

    def _verify(self, path: Path, manifest: Mapping[str, Any], mine: list[str], rank: int
                ) -> list[str]:
        """Problems with this rank's files (rank 0: every file's presence and size too)."""
        files = manifest["files"]
        problems = check_files(path, files, mine)
        if rank == 0:
            problems += check_files(path, files, [f for f in files if f not in mine], sha256=False)
        return problems

    def load(self, path: str | Path, models: torch.nn.Module | Mapping[str, torch.nn.Module],
             optimizer: Any = None, scheduler: Any = None, *, restore_rng: bool = True
             ) -> LoadedCheckpoint:
        """Restore one checkpoint directory (collective). Raises :class:`CheckpointError`."""
        path = Path(path)
        layout = current_layout()
        named = _named_models(models)
        manifest = self._read_manifest(path)
        self._check_compatible(path, manifest, layout, named)
        mine = [_model_file(RankLayout(tp_rank=layout.tp_rank, pp_rank=layout.pp_rank), n)
                for n in named] + [_rank_state_name(layout), TRAINER_STATE]
        problems = [p for part in all_gather_object(self._verify(path, manifest, mine, layout.rank))
                    for p in part]
        if problems:
            raise CheckpointCorruptError(f"checkpoint {path} is damaged: " + "; ".join(sorted(set(problems))[:10]))
        state = torch.load(path / _rank_state_name(layout), map_location="cpu", weights_only=True)
        for name, module in named.items():
            _read_tensors(module, path / mine[list(named).index(name)],
                          state["model_extra_state"].get(name, {}), path / _rank_state_name(layout))
        if optimizer is not None:
            if state["optimizer"] is None:
                raise CheckpointError(f"{path / _rank_state_name(layout)} holds no optimizer state")
            load_optimizer_state(optimizer, state["optimizer"], path / _rank_state_name(layout))
        if scheduler is not None:
            if state["scheduler"] is None:
                raise CheckpointError(f"{path / _rank_state_name(layout)} holds no scheduler state")
            scheduler.load_state_dict(state["scheduler"])
        if restore_rng:
            restore_rng_state(state["rng"])
        trainer = json.loads((path / TRAINER_STATE).read_text())
        barrier()
        if layout.rank == 0:
            logger.info("resumed from %s (step %d)", path, trainer["step"])
        return LoadedCheckpoint(int(trainer["step"]), path, trainer["extra_state"])

    def load_latest(self, models: torch.nn.Module | Mapping[str, torch.nn.Module],
                    optimizer: Any = None, scheduler: Any = None, *, restore_rng: bool = True
                    ) -> LoadedCheckpoint | None:
        """Restore the newest complete checkpoint; ``None`` when there is none.

        Leftovers of interrupted saves are removed first. A damaged newest checkpoint
        raises (``on_corrupt="error"``) or is skipped with a warning (``"fallback"``).
        """
        rank = current_layout().rank
        if rank == 0:
            _remove_stale(self.root)
        steps = broadcast_object(self.complete_steps() if rank == 0 else None)
        pointer = self.root / LATEST
        if rank == 0 and steps and pointer.is_file() \
                and pointer.read_text().strip() != f"step_{steps[-1]:08d}":
            logger.warning("%s names %s but the newest complete checkpoint is step_%08d",
                           pointer, pointer.read_text().strip(), steps[-1])
        for i, step in enumerate(reversed(steps)):
            path = self.root / f"step_{step:08d}"
            try:
                return self.load(path, models, optimizer, scheduler, restore_rng=restore_rng)
            except CheckpointCorruptError as err:
                if self.on_corrupt != "fallback" or i == len(steps) - 1:
                    raise
                if rank == 0:
                    logger.warning("skipping damaged checkpoint (on_corrupt=fallback): %s", err)
        return None
