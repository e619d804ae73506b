"""TRL ``GRPOTrainer`` side of bench/bench_step.py (one process; needs bench/setup_bench.sh).

    PYTHONPATH=.:bench/.deps python bench/trl_grpo.py --work DIR --steps 12 --out trl.jsonl

``DIR`` holds the main job's files (``DIR/tiny_model``, ``DIR/task``), written here by the
project's own ``prepare_files`` from examples/configs/tiny_cpu.yaml when absent, so the model,
tokenizer, prompts and images are the ones our trainer sees. Writes one JSON line per
optimizer step (``timing/*_s``, generated tokens) and a final ``{"peak_rss_mb": ...}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from PIL import Image

    from sophiavl_mcore.config import load_config
    from sophiavl_mcore.data.prompts import build_messages
    from sophiavl_mcore.data.records import load_records
    from sophiavl_mcore.rewards.outcome import OutcomeSample, score_outcomes
    from sophiavl_mcore.testing.stand_ins import resolve_stand_ins
    from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig
    from sophiavl_mcore.trainer.setup import model_dir, prepare_files

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "examples/configs/tiny_cpu.yaml", [f"output_dir={args.work}"], cls=GRPOTrainConfig)
    cfg = prepare_files(resolve_stand_ins(cfg)[0])  # no-op for files that exist (deterministic in cfg)
    mdir = model_dir(cfg)
    records = load_records(cfg.data.sources[0].path)

    import datasets
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [{"prompt": build_messages(r, cfg.prompt), "image": Image.open(r.image_path).convert("RGB"),
             "solution": r.solution, "problem_type": r.problem_type, "options": list(r.options)}
            for r in records]
    ds = datasets.Dataset.from_list(rows)

    def outcome_reward(prompts, completions, solution, problem_type, options, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        samples = [OutcomeSample(problem_type=t, solution=s, response=x, options=tuple(o))
                   for x, s, t, o in zip(texts, solution, problem_type, options, strict=True)]
        return [float(v) for v in score_outcomes(samples, cfg.rewards.format_weight).reward]

    n = cfg.rollout.sampling.n
    responses = cfg.train.prompts_per_step * n
    micro = cfg.train.micro_batch_size
    targs = GRPOConfig(
        output_dir=str(Path(args.work) / "trl_out"), report_to="none", save_strategy="no",
        seed=cfg.seed, max_steps=args.steps, logging_steps=1, use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=responses // micro,
        num_generations=n, max_completion_length=cfg.rollout.sampling.max_tokens,
        temperature=cfg.rollout.sampling.temperature, top_p=1.0, top_k=0,
        beta=cfg.loss.kl_coef, num_iterations=1, epsilon=cfg.loss.clip_eps_low, loss_type="dapo",
        learning_rate=cfg.optim.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=cfg.optim.clip_grad, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.adam_beta1, adam_beta2=cfg.optim.adam_beta2, adam_epsilon=cfg.optim.adam_eps,
        dataloader_num_workers=0, use_vllm=False, log_completions=False, disable_tqdm=True,
    )
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(mdir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(mdir)
    trainer = GRPOTrainer(model=model, reward_funcs=outcome_reward, args=targs, train_dataset=ds,
                          processing_class=processor)

    phase: dict[str, float] = {}

    def timed(name, fn, grad_split=False):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                key = name if not grad_split else (name if not torch.is_grad_enabled() else "_train_fwd")
                phase[key] = phase.get(key, 0.0) + time.perf_counter() - t
        return wrapper

    trainer._generate = timed("rollout", trainer._generate)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed(
        "ref_logprobs", trainer._get_per_token_logps_and_entropies, grad_split=True)
    trainer._generate_and_score_completions = timed("_gen_and_score", trainer._generate_and_score_completions)

    out = open(args.out, "w")  # noqa: SIM115
    state = {"t": None, "len": None}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            state["t"] = time.perf_counter()

        def on_log(self, _args, st, _control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                state["len"] = logs["completions/mean_length"]

        def on_step_end(self, _args, st, _control, **kw):
            now = time.perf_counter()
            step_s = now - state["t"]
            state["t"] = now
            gs = phase.pop("_gen_and_score", 0.0)
            rec = {"step": st.global_step, "timing/step_s": step_s,
                   "timing/rollout_s": phase.pop("rollout", 0.0), "timing/reward_s": phase.pop("reward", 0.0),
                   "timing/ref_logprobs_s": phase.pop("ref_logprobs", 0.0)}
            phase.pop("_train_fwd", None)
            rec["timing/other_s"] = gs - rec["timing/rollout_s"] - rec["timing/reward_s"] - rec["timing/ref_logprobs_s"]
            rec["timing/train_s"] = step_s - gs
            rec["_pending_len"] = True
            state["rec"] = rec

    def flush():
        rec = state.pop("rec", None)
        if rec:
            rec.pop("_pending_len")
            rec["rollout/response_len_mean"] = state["len"]
            rec["rollout/responses"] = responses
            out.write(json.dumps(rec) + "\n")
            out.flush()

    class Flush(TrainerCallback):  # logs come after on_step_end: write the step on the next begin
        def on_step_begin(self, *a, **kw):
            flush()

        def on_train_end(self, *a, **kw):
            flush()

    trainer.add_callback(Timer())
    trainer.add_callback(Flush())
    trainer.train()
    flush()
    out.write(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}) + "\n")
    out.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
