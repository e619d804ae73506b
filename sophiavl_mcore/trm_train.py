"""Fine-tune the Thinking Reward Model (TRM) by SFT on SophiaVL-R1-Thinking records.

    torchrun --nproc-per-node 2 -m sophiavl_mcore.trm_train \
        --config examples/configs/trm_sft_tiny.yaml model.hf_dir=/path/to/qwen2.5-vl \
        data.path=/path/thinking.jsonl output_dir=runs/trm

Same Megatron stack as GRPO (TP × PP × DP, Megatron optimizer, PP schedule). At the end
the trained weights are saved as per-rank Megatron shards (``output_dir/mcore``) and
exported to HF (``output_dir/hf``) with tokenizer and processor files, ready for
``vllm serve output_dir/hf``; both directories are written atomically
(:func:`sophiavl_mcore.checkpoint.hf.export_hf`). Metrics go to TensorBoard (``output_dir/tb``), a console
line, and ``output_dir/metrics.jsonl`` (rank 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sophiavl_mcore.config import to_dict
from sophiavl_mcore.data.records import MixedSampler
from sophiavl_mcore.trainer.sft.config import TRMTrainConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TRMRun:
    """A built run: layout, model (this rank's stage), trainer, data."""

    info: Any
    model: torch.nn.Module
    trainer: Any
    builder: Any
    records: list[Any]
    thinking: Any
    meta: dict[str, Any]


def build_run(cfg: TRMTrainConfig) -> TRMRun:
    """Validate data, init parallel state, build + load the model, optimizer, trainer."""
    from transformers import AutoTokenizer

    from sophiavl_mcore.checkpoint.hf import load_hf_weights
    from sophiavl_mcore.models.hf_config import read_lm_dims
    from sophiavl_mcore.models.qwen2_5_vl import VisionOptions, build_qwen2_5_vl
    from sophiavl_mcore.parallel import initialize_parallel
    from sophiavl_mcore.trainer.optim import build_optimizer, check_backend, wrap_ddp
    from sophiavl_mcore.trainer.sft.data import (
        ExampleBuilder,
        image_config_for,
        load_thinking_records,
    )
    from sophiavl_mcore.trainer.sft.trainer import SFTTrainer

    # Data, dimensions and settings are validated before any process group or model exists.
    check_backend(cfg.optim)
    records = load_thinking_records(cfg.data.path, cfg.data.image_root or None)
    dims = read_lm_dims(cfg.model.hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    builder = ExampleBuilder(tokenizer, image_config_for(cfg.model.hf_dir, cfg.images),
                             cfg.sft.max_seq_len)
    thinking = cfg.data.thinking_config()

    info = initialize_parallel(cfg.parallel, num_layers=dims.num_layers, num_heads=dims.num_heads,
                               num_query_groups=dims.num_kv_heads)
    cfg.sft.check_dp(info.dp)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model = build_qwen2_5_vl(cfg.model.hf_dir, info, dtype=dtype,
                             vision=VisionOptions(freeze=cfg.model.freeze_vision),
                             vocab_divisible_by=cfg.model.vocab_divisible_by,
                             **cfg.model.transformer_overrides())
    meta = load_hf_weights(model, cfg.model.hf_dir, info, cfg.model.vocab_divisible_by)
    ddp = wrap_ddp(model, cfg.optim)
    optimizer, scheduler = build_optimizer([ddp], cfg.optim, cfg.sft.train_steps)
    trainer = SFTTrainer(ddp, optimizer, scheduler, cfg.sft, cfg.optim, builder.pad_id,
                         info.device)
    return TRMRun(info, model, trainer, builder, records, thinking, meta)


def record_order(cfg: TRMTrainConfig, num_records: int) -> MixedSampler[int]:
    """Record indices in training order, the same on every rank: the data package's
    sampler over one source (``data.shuffle=false`` keeps file order, the curriculum
    order of ``trm_dots_tiny.yaml``)."""
    return MixedSampler([range(num_records)], seed=cfg.data.seed, shuffle=cfg.data.shuffle)


def local_examples(run: TRMRun, record_ids: Sequence[int]) -> list[Any]:
    """This DP rank's examples of the global batch ``record_ids``."""
    from sophiavl_mcore.trainer.sft.trainer import shard_for_dp

    mine = shard_for_dp([run.records[i] for i in record_ids], run.info.dp_rank, run.info.dp)
    return run.builder.trm_examples(mine, run.thinking)


def train(cfg: TRMTrainConfig) -> list[dict[str, float]]:
    """Run TRM SFT, save + export; returns per-step metrics (identical on every rank).

    After the last update the first global batch is evaluated again
    (``train/final_loss_first_batch`` in the last entry): comparing it with the first
    step's loss shows the fit, and an exported model must reproduce it.
    """
    from sophiavl_mcore.checkpoint.hf import export_hf
    from sophiavl_mcore.logging import MetricsWriter, console_line
    from sophiavl_mcore.parallel import destroy_parallel

    run = build_run(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(out / "tb", rank=run.info.rank)
    history: list[dict[str, float]] = []
    sampler = record_order(cfg, len(run.records))
    first_batch: list[int] = []
    metrics_file = (out / "metrics.jsonl").open("w") if run.info.rank == 0 else None
    for step in range(1, cfg.sft.train_steps + 1):
        ids = sampler.next_batch(cfg.sft.global_batch_size)
        first_batch = first_batch or ids
        metrics = run.trainer.step(local_examples(run, ids))
        metrics.update(run.builder.metrics())
        if step == cfg.sft.train_steps:
            metrics["train/final_loss_first_batch"] = run.trainer.evaluate(
                local_examples(run, first_batch))
        history.append(metrics)
        writer.log(step, metrics)
        if metrics_file is not None:
            metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            metrics_file.flush()
        if step % cfg.sft.log_every == 0 or step == cfg.sft.train_steps:
            logger.info(console_line(step, metrics, ("train/loss", "train/grad_norm", "train/lr",
                                                     "perf/tokens_per_s")))
    if metrics_file is not None:
        metrics_file.close()
    writer.close()
    if cfg.export_hf:
        export_hf(run.model, out / "hf", source_hf_dir=cfg.model.hf_dir, model_meta=run.meta,
                  mcore_dir=out / "mcore")
    destroy_parallel(keep_process_group=True)
    return history


def dry_run(cfg: TRMTrainConfig) -> int:
    """Validate config, records, model dimensions and layout without building anything.

    The world size is ``WORLD_SIZE`` (torchrun) or tp × pp. Returns the DP size.
    """
    import os

    from sophiavl_mcore.models.hf_config import read_lm_dims
    from sophiavl_mcore.parallel import validate_layout
    from sophiavl_mcore.trainer.optim import check_backend
    from sophiavl_mcore.trainer.sft.data import load_thinking_records

    check_backend(cfg.optim)
    records = load_thinking_records(cfg.data.path, cfg.data.image_root or None)
    dims = read_lm_dims(cfg.model.hf_dir)
    world = int(os.environ.get("WORLD_SIZE", cfg.parallel.tp * cfg.parallel.pp))
    dp = validate_layout(cfg.parallel, world, dims.num_layers, dims.num_heads, dims.num_kv_heads)
    cfg.sft.check_dp(dp)
    logger.info("config OK (%d records; world=%d tp=%d pp=%d dp=%d):\n%s", len(records), world,
                cfg.parallel.tp, cfg.parallel.pp, dp, json.dumps(to_dict(cfg), indent=1))
    return dp


def main(argv: Sequence[str] | None = None) -> int:
    from sophiavl_mcore.cli import job_parser, run_job

    args = job_parser(__doc__.split("\n\n")[0], "validate the config and exit").parse_args(argv)
    return run_job(args, TRMTrainConfig, dry_run, train)


def _main_cli() -> Any:  # pragma: no cover - process entry
    raise SystemExit(main())


if __name__ == "__main__":
    _main_cli()
