"""Trust-GRPO training of a Qwen2.5-VL policy on Megatron-Core with vLLM rollouts.

    torchrun --nproc-per-node 2 -m sophiavl_mcore.train \
        --config examples/configs/tiny_cpu.yaml [key.sub=value ...] [--dry-run]

One step: sample prompts → each rollout engine (one per ``rollout.tensor_parallel_size``
ranks) answers its share, N samples per prompt (vLLM) → outcome R^o + thinking R^t
(TRM) → Trust-GRPO rewards R = R^o + γ·α·e^(−step/T)·R^t and group advantages, per
engine → responses to the data-parallel layout → old + reference log-probs → PPO-clip
+ KL update → weight sync into every engine → metrics.
Ablations: ``rewards.trust_grpo.use_thinking / use_trust / use_annealing``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from sophiavl_mcore.config import to_dict
from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig
from sophiavl_mcore.trainer.setup import check_world, model_dims

logger = logging.getLogger(__name__)


def dry_run(cfg: GRPOTrainConfig) -> int:
    """Validate config + trainer and rollout layouts for ``WORLD_SIZE`` (or tp·pp) ranks
    and print them; needs the model's ``config.json`` only."""
    from sophiavl_mcore.trainer.grpo.build import engine_layout

    world = int(os.environ.get("WORLD_SIZE", cfg.parallel.tp * cfg.parallel.pp))
    dp = check_world(cfg, world)
    layout = engine_layout(cfg, world)
    layers, heads, groups = model_dims(cfg)
    per_stage = cfg.parallel.layers_per_stage or [layers // cfg.parallel.pp] * cfg.parallel.pp
    logger.info("config OK: world=%d tp=%d pp=%d dp=%d; %d layers (%s per stage), %d heads, "
                "%d kv heads; %d responses/step (%d prompts × n=%d), %d steps\n%s\n%s",
                world, cfg.parallel.tp, cfg.parallel.pp, dp, layers, per_stage, heads, groups,
                cfg.responses_per_step, cfg.train.prompts_per_step, cfg.rollout.sampling.n,
                cfg.train.total_steps, layout.describe(), json.dumps(to_dict(cfg), indent=1))
    return dp


def train(cfg: GRPOTrainConfig) -> list[dict[str, float]]:
    """The whole run (the paper's algorithm, one step per iteration); returns per-step
    metrics (identical on every rank)."""
    from sophiavl_mcore.data.dots_reasoning import quality_oracle
    from sophiavl_mcore.data.records import load_records
    from sophiavl_mcore.logging import MetricsWriter, console_line
    from sophiavl_mcore.testing.stand_ins import resolve_stand_ins, score_tiny_trm
    from sophiavl_mcore.trainer.grpo.build import build_trainer
    from sophiavl_mcore.trainer.grpo.metrics import (
        CONSOLE_KEYS,
        PhaseTimer,
        first_generated_group,
        log_step,
        step_metrics,
        step_perf,
    )
    from sophiavl_mcore.trainer.grpo.sampling import collect_groups
    from sophiavl_mcore.trainer.grpo.step_data import gather_step
    from sophiavl_mcore.trainer.grpo.trainer import seed_everything
    from sophiavl_mcore.trainer.grpo.validation import evaluate
    from sophiavl_mcore.trainer.preemption import PreemptionWatcher, write_run_state
    from sophiavl_mcore.trainer.setup import val_path

    seed_everything(cfg.seed)
    cfg, tiny_trm = resolve_stand_ins(cfg)  # model.tiny / rewards.trm.tiny recipes
    trainer = build_trainer(cfg)
    if tiny_trm is not None:
        score_tiny_trm(trainer, tiny_trm)
    cfg = trainer.cfg
    rank, total = trainer.info.rank, cfg.train.total_steps
    out = Path(cfg.output_dir)
    writer = MetricsWriter(out / "tb", rank=rank)
    vpath = val_path(cfg)
    val_records = load_records(vpath)[:cfg.train.val_size] if vpath else []
    oracle = quality_oracle(cfg.task)  # true thinking quality, when the task has one
    history: list[dict[str, float]] = []
    jsonl = (out / "metrics.jsonl").open("a" if trainer.start_step > 1 else "w") if rank == 0 else None
    last_step = trainer.start_step - 1
    with PreemptionWatcher() as watcher:
        for step in range(trainer.start_step, total + 1):
            timer = PhaseTimer()
            records, batch, sampled = collect_groups(trainer, step, timer)  # rollout + score
            with timer("reward"):
                view = gather_step(trainer.layout, records, batch, oracle)
            with timer("exchange"):
                share, moved = trainer.exchange(batch, records)
            metrics = trainer.update(share, timer)
            with timer("weight_sync"):
                metrics |= trainer.sync(step)
            metrics |= moved | sampled | step_metrics(view, trainer.layout) | timer.metrics()
            metrics |= step_perf(metrics, trainer.layout.world)
            if cfg.train.val_every and (step % cfg.train.val_every == 0 or step == total) and val_records:
                metrics |= evaluate(trainer, val_records)
            log_step(writer, step, metrics, view, cfg.train.log_samples_every,
                     first_generated_group(batch))
            history.append(metrics)
            if jsonl is not None:
                jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
                jsonl.flush()
            logger.info(console_line(step, metrics, CONSOLE_KEYS))
            last_step = step
            preempted = watcher.agreed()
            if trainer.ckpt.should_save(step, total) or (preempted and step < total):
                trainer.save(step)
            if preempted and step < total:
                logger.warning("%s received: checkpoint at step %d saved, stopping for a restart",
                               getattr(watcher.received, "name", "a signal on another rank"), step)
                break
    if jsonl is not None:
        jsonl.close()
    writer.close()
    finished = last_step >= total
    if finished and cfg.export_hf:
        trainer.export()
    if rank == 0:
        write_run_state(out, "complete" if finished else "preempted", last_step)
    trainer.close()
    return history


def main(argv: Sequence[str] | None = None) -> int:
    from sophiavl_mcore.cli import job_parser, run_job

    parser = job_parser(__doc__.split("\n\n")[0], "validate, print the layout, exit")
    parser.add_argument("--resume", action="store_true",
                        help="require a checkpoint to continue from (default: automatic)")
    args = parser.parse_args(argv)
    return run_job(args, GRPOTrainConfig, dry_run, train,
                   ["checkpoint.resume=must"] if args.resume else [])


if __name__ == "__main__":
    raise SystemExit(main())
