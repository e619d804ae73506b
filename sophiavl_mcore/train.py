"""Trust-GRPO training of a Qwen2.5-VL policy on Megatron-Core with vLLM rollouts.

    torchrun --nproc-per-node 2 -m sophiavl_mcore.train \
        --config examples/configs/tiny_cpu.yaml [key.sub=value ...] [--dry-run]

One step: sample prompts → N rollouts per prompt (vLLM) → outcome R^o + thinking R^t
(TRM) → Trust-GRPO rewards R = R^o + γ·α·e^(−step/T)·R^t and group advantages →
old + reference log-probs → PPO-clip + KL update → weight sync to vLLM → metrics.
Ablations: ``rewards.trust_grpo.use_thinking / use_trust / use_annealing``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from sophiavl_mcore.config import to_dict
from sophiavl_mcore.trainer.setup import GRPOTrainConfig, check_world, model_dims

logger = logging.getLogger(__name__)


def dry_run(cfg: GRPOTrainConfig) -> int:
    """Validate config + layout for ``WORLD_SIZE`` (or tp·pp) ranks and print it."""
    world = int(os.environ.get("WORLD_SIZE", cfg.parallel.tp * cfg.parallel.pp))
    dp = check_world(cfg, world)
    layers, heads, groups = model_dims(cfg)
    per_stage = cfg.parallel.layers_per_stage or [layers // cfg.parallel.pp] * cfg.parallel.pp
    logger.info("config OK: world=%d tp=%d pp=%d dp=%d; %d layers (%s per stage), %d heads, "
                "%d kv heads; %d responses/step (%d prompts × n=%d), %d steps\n%s",
                world, cfg.parallel.tp, cfg.parallel.pp, dp, layers, per_stage, heads, groups,
                cfg.responses_per_step, cfg.train.prompts_per_step, cfg.rollout.sampling.n,
                cfg.train.total_steps, json.dumps(to_dict(cfg), indent=1))
    return dp


def train(cfg: GRPOTrainConfig) -> list[dict[str, float]]:
    """The whole run; returns per-step metrics (identical on every rank)."""
    from sophiavl_mcore.data.records import load_records
    from sophiavl_mcore.logging import MetricsWriter, console_line
    from sophiavl_mcore.rewards.trust_grpo import group_advantages, trust_grpo
    from sophiavl_mcore.trainer import loop
    from sophiavl_mcore.trainer.metrics import (
        CONSOLE_KEYS,
        PhaseTimer,
        log_step,
        reward_metrics,
        rollout_metrics,
    )
    from sophiavl_mcore.trainer.preemption import PreemptionWatcher, write_run_state
    from sophiavl_mcore.trainer.setup import prepare_files, val_path
    from sophiavl_mcore.trainer.validation import evaluate

    check_world(cfg, int(os.environ.get("WORLD_SIZE", cfg.parallel.tp * cfg.parallel.pp)))
    cfg = prepare_files(cfg)
    loop.seed_everything(cfg.seed)
    rank = int(os.environ.get("RANK", "0"))
    engine = loop.build_engine(cfg) if rank == 0 else None
    run = loop.build_run(cfg, engine)
    out = Path(cfg.output_dir)
    writer = MetricsWriter(out / "tb", rank=run.info.rank)
    vpath = val_path(cfg)
    val_records = load_records(vpath)[:cfg.train.val_size] if vpath else []
    trust_cfg, n, total = cfg.rewards.trust_grpo, cfg.rollout.sampling.n, cfg.train.total_steps
    history: list[dict[str, float]] = []
    jsonl = (out / "metrics.jsonl").open("a" if run.start_step > 1 else "w") if run.info.rank == 0 else None
    last_step = run.start_step - 1
    with PreemptionWatcher() as watcher:
        for step in range(run.start_step, total + 1):
            timer = PhaseTimer()
            with timer("rollout"):
                roll = loop.rollout_step(run, run.sampler.next_batch(cfg.train.prompts_per_step),
                                         step)
            with timer("reward"):
                trust = trust_grpo(roll.outcome, roll.thinking, group_size=n, step=step - 1,
                                   total_steps=total, config=trust_cfg)
                adv = group_advantages(trust.reward, group_size=n, config=trust_cfg)
            batch = loop.to_batch(run, roll, adv)
            metrics = loop.train_on_batch(run, batch, timer)
            with timer("weight_sync"):
                run.sync.sync(version=step)
            metrics.update(reward_metrics(roll, trust, adv))
            metrics.update(rollout_metrics(roll))
            metrics.update(timer.metrics())
            if cfg.train.val_every and (step % cfg.train.val_every == 0 or step == total) and val_records:
                metrics.update(evaluate(run, val_records))
            log_step(writer, step, metrics, roll, trust, cfg.train.log_samples_every)
            history.append(metrics)
            if jsonl is not None:
                jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
                jsonl.flush()
            logger.info(console_line(step, metrics, CONSOLE_KEYS))
            last_step = step
            preempted = watcher.agreed()
            if run.ckpt.should_save(step, total) or (preempted and step < total):
                loop.save_checkpoint(run, step)
            if preempted and step < total:
                logger.warning("%s received: checkpoint at step %d saved, stopping for a restart",
                               getattr(watcher.received, "name", "a signal on another rank"), step)
                break
    if jsonl is not None:
        jsonl.close()
    writer.close()
    finished = last_step >= total
    if finished and cfg.export_hf:
        loop.export(run)
    if run.info.rank == 0:
        write_run_state(out, "complete" if finished else "preempted", last_step)
    _shutdown(run)
    return history


def _shutdown(run: object) -> None:
    from sophiavl_mcore.parallel import destroy_parallel
    from sophiavl_mcore.weight_sync.vllm_engine import close_colocated_engine

    if getattr(run, "engine", None) is not None:
        close_colocated_engine(run.engine)
    destroy_parallel(keep_process_group=True)


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
