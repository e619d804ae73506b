"""HF safetensors ⇄ Megatron per-rank checkpoints, streaming; and live-model load/save.

Megatron-side format (``FORMAT``): a directory with

    mcore_checkpoint.json                  layout + the HF config.json it came from
    config.json                            copy of the HF config
    mp_rank_{tp:02d}_{pp:03d}/model.safetensors   one file per (TP, PP) rank, holding
                                           that rank's ``model.state_dict()`` tensors
    checksums.json                         size + sha256 of every file (checkpoint.manifest)

Trust: both converters check the source directory against its manifest before reading
(a training checkpoint's ``manifest.json``, else ``checksums.json``; sha256 of every
file; ``verify=False`` skips it, a directory without either is read with a warning),
and both write ``checksums.json`` beside what they produce, so that the next reader
can check it. Loading HF weights into a live model (every rank reads the directory)
compares file sizes only.

Why not ``megatron.core.dist_checkpointing``: it needs each rank's live
``sharded_state_dict`` (i.e. all TP×PP ranks' process groups and models) to write, so an
offline converter would have to start tp×pp processes (64 for 72B at TP8×PP8). The
per-rank layout is Megatron's classic ``mp_rank_XX_YYY`` layout with safetensors instead
of pickles: written offline for any layout from shape arithmetic, read lazily, no
``torch.load`` of untrusted pickles, and each rank reads exactly its own file
(:func:`load_mcore_shard`). Resharding = mcore→HF→mcore, both streaming.

Memory: both directions hold at most one rule's tensors (one layer's q/k/v, gate/up…)
at a time; writers stream bytes to planned offsets (:class:`StreamingWriter`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sophiavl_mcore.atomic import atomic_dir
from sophiavl_mcore.checkpoint.manifest import CHECKSUMS, verify_dir, write_checksums
from sophiavl_mcore.checkpoint.mapping import ConversionPlan, build_plan, default_hf_prefix
from sophiavl_mcore.checkpoint.st_io import (
    CheckpointError,
    LazyTensorFiles,
    StreamingWriter,
    dtype_from_code,
    open_hf_dir,
    open_safetensors,
)
from sophiavl_mcore.models.hf_config import load_config_json, read_lm_dims
from sophiavl_mcore.parallel.config import ParallelConfig
from sophiavl_mcore.parallel.layout import validate_layout

logger = logging.getLogger(__name__)

FORMAT = "sophiavl_mcore/per-rank-safetensors"
META_FILE = "mcore_checkpoint.json"
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
# Files besides the weights that ``vllm serve`` needs to serve an exported checkpoint.
SERVING_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)


def rank_file(ckpt_dir: str | Path, tp_rank: int, pp_rank: int) -> Path:
    return Path(ckpt_dir) / f"mp_rank_{tp_rank:02d}_{pp_rank:03d}" / "model.safetensors"


def plan_from_meta(meta: Mapping[str, Any]) -> ConversionPlan:
    cfg = meta["hf_config"]
    return build_plan(
        read_lm_dims(cfg), meta["tp"], meta["pp"], layers_per_stage=meta["layers_per_stage"],
        te=meta["te"], hf_prefix=meta["hf_prefix"],
        vocab_divisible_by=meta["vocab_divisible_by"], config_json=cfg,
    )


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: {META_FILE} is missing (not a {FORMAT} checkpoint)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format={meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _check_hf(plan: ConversionPlan, reader: LazyTensorFiles, hf_dir: Path) -> str:
    """All planned HF tensors exist with config.json's shapes, one dtype; returns it."""
    problems, dtypes = [], set()
    for name, shape in plan.hf_specs().items():
        if name not in reader.where:
            problems.append(f"{name} missing")
            continue
        code, got = reader.meta(name)
        dtypes.add(code)
        if got != tuple(shape):
            problems.append(f"{name} has shape {list(got)}, config.json implies {list(shape)}")
    planned = set(plan.hf_specs())
    tied_head = {"lm_head.weight"} if plan.dims.tie_word_embeddings else set()
    extra = sorted(
        n for n in reader.names()
        if n not in planned and n not in tied_head and not n.endswith(_IGNORED_HF_SUFFIXES)
    )
    if extra:
        problems.append(f"{len(extra)} tensor(s) not covered by the conversion plan, e.g. {extra[:5]}")
    if problems:
        raise CheckpointError(
            f"HF checkpoint {hf_dir} does not match its config.json: {len(problems)} problem(s): "
            + "; ".join(problems[:10])
        )
    if len(dtypes) > 1:
        logger.warning("HF checkpoint %s mixes dtypes %s", hf_dir, sorted(dtypes))
    return sorted(dtypes)[0] if dtypes else "F32"


def convert_hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    tp: int,
    pp: int,
    *,
    layers_per_stage: list[int] | None = None,
    te: bool = False,
    vocab_divisible_by: int = 1,
    dtype: torch.dtype | None = None,
    hf_prefix: str | None = None,
    progress: bool = True,
    verify: bool = True,
) -> Path:
    """Convert an HF Qwen2/Qwen2.5(-VL) checkpoint dir to per-rank Megatron shards.

    Everything (the source's checksums when it has them, layout vs config, every tensor
    name/shape, shard files) is validated before any tensor is read. ``dtype`` casts
    (default: keep the source's). Writes ``checksums.json`` into ``out_dir``.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if verify:
        verify_dir(hf_dir)
    cfg = load_config_json(hf_dir)
    dims = read_lm_dims(cfg)
    validate_layout(ParallelConfig(tp=tp, pp=pp, layers_per_stage=layers_per_stage), tp * pp,
                    dims.num_layers, dims.num_heads, dims.num_kv_heads)
    reader = open_hf_dir(hf_dir)
    prefix = hf_prefix if hf_prefix is not None else default_hf_prefix(cfg, reader.names())
    plan = build_plan(dims, tp, pp, layers_per_stage=layers_per_stage, te=te, hf_prefix=prefix,
                      vocab_divisible_by=vocab_divisible_by, config_json=cfg)
    src_dtype = dtype_from_code(_check_hf(plan, reader, hf_dir))
    out_dtype = dtype or src_dtype
    bar = tqdm(total=len(plan.rules), desc="hf->mcore", unit="tensor", disable=not progress)
    for stage in range(pp):
        rules = plan.rules_for_stage(stage)
        specs = {r.mcore: (out_dtype, plan.rank_shape(r)) for r in rules}
        writers = [StreamingWriter(rank_file(out_dir, t, stage), specs) for t in range(tp)]
        try:
            for rule in rules:
                full = [reader.get(n).to(out_dtype) for n in rule.hf]
                for t, w in enumerate(writers):
                    w.write(rule.mcore, plan.shard_pieces(rule, full, t))
                del full
                bar.update(1)
        finally:
            for w in writers:
                w.close()
    bar.close()
    meta = {
        "format": FORMAT, "version": 1, "tp": tp, "pp": pp,
        "layers_per_stage": plan.layers_per_stage, "te": te, "hf_prefix": prefix,
        "vocab_divisible_by": vocab_divisible_by, "vocab_padded": plan.vocab_padded,
        "dtype": str(out_dtype).removeprefix("torch."), "hf_config": cfg,
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    write_checksums(out_dir)
    return out_dir


def _open_rank_files(ckpt_dir: Path, plan: ConversionPlan) -> dict[tuple[int, int], LazyTensorFiles]:
    """Lazy readers for every rank file, with every planned name/shape checked."""
    readers, problems = {}, []
    for stage in range(plan.pp):
        specs = plan.rank_specs(stage)
        for t in range(plan.tp):
            path = rank_file(ckpt_dir, t, stage)
            if not path.is_file():
                problems.append(f"shard {path} is missing")
                continue
            with open_safetensors(path) as f:
                names = set(f.keys())
            lazy = LazyTensorFiles({n: path for n in names})
            for name, shape in specs.items():
                if name not in names:
                    problems.append(f"{path}: tensor {name} missing")
                elif lazy.meta(name)[1] != tuple(shape):
                    problems.append(f"{path}: {name} shape {list(lazy.meta(name)[1])}, expected {list(shape)}")
            readers[(t, stage)] = lazy
    if problems:
        raise CheckpointError(f"Megatron checkpoint {ckpt_dir}: " + "; ".join(problems[:10]))
    return readers


def verify_mcore_dir(mcore_dir: str | Path, *, require: bool = False) -> str:
    """Check the files a conversion of ``mcore_dir`` reads (the meta and every rank's
    ``model.safetensors``: listed, size and sha256) against its manifest; see
    :func:`~sophiavl_mcore.checkpoint.manifest.verify_dir`."""
    mcore_dir = Path(mcore_dir)
    shards = sorted(p.relative_to(mcore_dir).as_posix()
                    for p in mcore_dir.glob("mp_rank_*/model.safetensors"))
    return verify_dir(mcore_dir, needed=[META_FILE, *shards], require=require)


def convert_mcore_to_hf(
    mcore_dir: str | Path,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = 4 * 2**30,
    progress: bool = True,
    verify: bool = True,
    serving_files_from: str | Path | None = None,
) -> Path:
    """Merge per-rank Megatron shards back into an HF safetensors checkpoint dir.

    With ``verify`` (default) the source is first checked against its manifest (a
    training checkpoint's ``manifest.json`` or ``checksums.json``: sizes and sha256,
    and the meta and every shard must be listed). ``serving_files_from``: an HF dir whose
    tokenizer / processor / generation files (:data:`SERVING_FILES`) are copied. The
    output ends with ``checksums.json`` over everything written.

    Atomic (:func:`~sophiavl_mcore.atomic.atomic_dir`): everything is written
    into a temp sibling of ``out_dir`` that is renamed into place at the end, replacing
    an existing ``out_dir``; a failure or a killed process leaves ``out_dir`` absent or
    as it was, never half written.
    """
    mcore_dir, out_dir = Path(mcore_dir), Path(out_dir)
    if verify:
        verify_mcore_dir(mcore_dir)
    meta = read_meta(mcore_dir)
    plan = plan_from_meta(meta)
    readers = _open_rank_files(mcore_dir, plan)
    with atomic_dir(out_dir) as tmp:
        _write_hf_weights(tmp, plan, readers, max_shard_bytes, progress)
        (tmp / "config.json").write_text(json.dumps(meta["hf_config"], indent=2))
        if serving_files_from is not None:
            for name in SERVING_FILES:
                src = Path(serving_files_from) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        write_checksums(tmp)
    return out_dir


def _write_hf_weights(out_dir: Path, plan: ConversionPlan,
                      readers: Mapping[tuple[int, int], LazyTensorFiles], max_shard_bytes: int,
                      progress: bool) -> None:
    """The merged HF tensors as safetensors files of at most ``max_shard_bytes`` each
    (+ ``model.safetensors.index.json`` when there are several)."""
    rules = [r for r in plan.rules if not r.mirror]
    dtypes = {r.mcore + str(r.stage): dtype_from_code(readers[(0, r.stage)].meta(r.mcore)[0])
              for r in rules}
    # Assign HF tensors to output files in plan order, cutting at max_shard_bytes.
    files: list[list] = [[]]
    size = 0
    for r in rules:
        dt = dtypes[r.mcore + str(r.stage)]
        n = sum(torch.Size(s).numel() for s in r.hf_shapes) * dt.itemsize
        if files[-1] and size + n > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(r)
        size += n
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    weight_map = {}
    bar = tqdm(total=len(rules), desc="mcore->hf", unit="tensor", disable=not progress)
    for fname, group in zip(names, files, strict=True):
        specs = {}
        for r in group:
            dt = dtypes[r.mcore + str(r.stage)]
            for hn, hs in zip(r.hf, r.hf_shapes, strict=True):
                specs[hn] = (dt, tuple(hs))
                weight_map[hn] = fname
        with StreamingWriter(out_dir / fname, specs, metadata={"format": "pt"}) as w:
            for r in group:
                parts = [readers[(t, r.stage)].get(r.mcore) for t in range(plan.tp)]
                for hn, tensor in zip(r.hf, plan.merge(r, parts), strict=True):
                    w.write(hn, tensor)
                bar.update(1)
    bar.close()
    if len(files) > 1:
        total = sum(torch.Size(s).numel() * dt.itemsize for dt, s in
                    ((dtypes[r.mcore + str(r.stage)], s) for r in rules for s in r.hf_shapes))
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def conversion_meta(hf_dir: str | Path, tp: int, pp: int, *, layers_per_stage: list[int] | None = None,
                    te: bool = False, vocab_divisible_by: int = 1, dtype: str = "float32",
                    hf_prefix: str | None = None) -> dict[str, Any]:
    """The ``mcore_checkpoint.json`` content for a model built from ``hf_dir`` at tp × pp.

    Pass it as ``CheckpointManager(model_meta=...)`` so that every checkpoint is also a
    valid Megatron checkpoint for :func:`convert_mcore_to_hf`.
    """
    cfg = load_config_json(hf_dir)
    if hf_prefix is None:
        hf_prefix = default_hf_prefix(cfg, open_hf_dir(hf_dir).names())
    plan = build_plan(read_lm_dims(cfg), tp, pp, layers_per_stage=layers_per_stage, te=te,
                      hf_prefix=hf_prefix, vocab_divisible_by=vocab_divisible_by, config_json=cfg)
    return {"format": FORMAT, "version": 1, "tp": tp, "pp": pp,
            "layers_per_stage": plan.layers_per_stage, "te": te, "hf_prefix": hf_prefix,
            "vocab_divisible_by": vocab_divisible_by, "vocab_padded": plan.vocab_padded,
            "dtype": dtype, "hf_config": cfg}



# ------------------------------------------------------------------- live models


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def load_mcore_shard(model: torch.nn.Module, ckpt_dir: str | Path, tp_rank: int, pp_rank: int) -> None:
    """Load this rank's shard into ``model``; names and shapes are checked first."""
    path = rank_file(ckpt_dir, tp_rank, pp_rank)
    if not path.is_file():
        raise CheckpointError(f"shard {path} is missing (tp_rank={tp_rank}, pp_rank={pp_rank})")
    copy_shard_into(_model_tensors(model), path)


def copy_shard_into(own: Mapping[str, torch.Tensor], path: Path) -> None:
    """Copy a safetensors shard into the tensors ``own`` in place (optimizer references
    stay valid); every name and shape is checked before the first copy."""
    with open_safetensors(path) as f:
        names = set(f.keys())
        missing, unexpected = sorted(set(own) - names), sorted(names - set(own))
        bad = [f"{n}: file {list(f.get_slice(n).get_shape())} vs model {list(own[n].shape)}"
               for n in sorted(names & set(own))
               if tuple(f.get_slice(n).get_shape()) != tuple(own[n].shape)]
        if missing or unexpected or bad:
            raise CheckpointError(
                f"{path} does not fit the model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, shape mismatches {bad[:5]}"
            )
        with torch.no_grad():
            for n in sorted(names):
                own[n].copy_(f.get_tensor(n))


def save_mcore_shard(
    model: torch.nn.Module,
    ckpt_dir: str | Path,
    tp_rank: int,
    pp_rank: int,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write this rank's tensors; the caller passes ``meta`` on one rank (rank 0)."""
    tensors = _model_tensors(model)
    path = rank_file(ckpt_dir, tp_rank, pp_rank)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    with StreamingWriter(path, specs) as w:
        for k, v in tensors.items():
            w.write(k, v)
    if meta is not None:
        (Path(ckpt_dir) / META_FILE).write_text(json.dumps(dict(meta), indent=1))
        (Path(ckpt_dir) / "config.json").write_text(json.dumps(meta["hf_config"], indent=2))
    return path


def load_hf_into_model(
    model: torch.nn.Module, hf_dir: str | Path, tp: int, pp: int, tp_rank: int, pp_rank: int,
    *, te: bool = False, layers_per_stage: list[int] | None = None, vocab_divisible_by: int = 1,
) -> ConversionPlan:
    """Fill a live rank's model straight from an HF checkpoint (no intermediate files).

    Returns the conversion plan used (layout, HF prefix, padded vocab) for callers that
    record it next to what they save. Every tensor's shape is checked before the first
    copy (a model padded to another vocabulary size is named with both shapes); file
    sizes are checked against ``checksums.json`` when the directory has one.
    """
    hf_dir = Path(hf_dir)
    if (hf_dir / CHECKSUMS).is_file():
        verify_dir(hf_dir, sha256=False)  # every rank reads the dir: sizes only
    cfg = load_config_json(hf_dir)
    reader = open_hf_dir(hf_dir)
    plan = build_plan(read_lm_dims(cfg), tp, pp, layers_per_stage=layers_per_stage, te=te,
                      hf_prefix=default_hf_prefix(cfg, reader.names()),
                      vocab_divisible_by=vocab_divisible_by, config_json=cfg)
    _check_hf(plan, reader, hf_dir)
    own = _model_tensors(model)
    rules = plan.rules_for_stage(pp_rank)
    wanted = {r.mcore for r in rules}
    if set(own) != wanted:
        raise CheckpointError(
            f"model on tp_rank={tp_rank} pp_rank={pp_rank} does not match the plan: model-only "
            f"{sorted(set(own) - wanted)[:5]}, plan-only {sorted(wanted - set(own))[:5]}"
        )
    bad = [f"{r.mcore}: model {list(own[r.mcore].shape)} vs checkpoint {list(plan.rank_shape(r))}"
           for r in rules if tuple(own[r.mcore].shape) != tuple(plan.rank_shape(r))]
    if bad:
        raise CheckpointError(
            f"model on tp_rank={tp_rank} pp_rank={pp_rank} does not fit {hf_dir} "
            f"(vocab_size {plan.dims.vocab_size} padded to {plan.vocab_padded} with "
            f"vocab_divisible_by={vocab_divisible_by}, tp={tp}): {'; '.join(bad[:5])}")
    with torch.no_grad():
        for r in rules:
            full = [reader.get(n) for n in r.hf]
            own[r.mcore].copy_(plan.shard(r, full, tp_rank))
    return plan
