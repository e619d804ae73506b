"""TRM SFT on real Megatron-Core over 2 gloo processes, through ``trm_train.train``.

One 2-process launch runs, on the same tiny Qwen2.5-VL and 32 thinking records:

* TP=1 × DP=2, 2 updates (DDP all-reduce; the distributed optimizer is GPU-only);
* PP=2 (1F1B schedule, variable micro-batch lengths), 2 updates;
* the loss-mask check at TP=2 (forward only);
* TP=2, ``STEPS`` updates, then Megatron save + HF export.

Checks: the first-step loss and gradient norm (same weights, same global batch) agree
across the three layouts, and so does the second-step loss (same gradient, same LR,
same update); the TP=2 loss falls; the exported HF model, run by transformers, reproduces
the trained model's loss on the first batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "configs" / "trm_sft_tiny.yaml"
STEPS = 20
TOL = 1e-4


def _cfg(model: str, data: str, out: Path, tp: int, pp: int, steps: int, *extra: str):
    from sophiavl_mcore.config import load_config
    from sophiavl_mcore.trainer.sft.config import TRMTrainConfig

    return load_config(RECIPE, [
        f"model.hf_dir={model}", f"data.path={data}", f"output_dir={out}",
        f"parallel.tp={tp}", f"parallel.pp={pp}", f"sft.train_steps={steps}", *extra,
    ], cls=TRMTrainConfig)


def _mask_check(cfg) -> dict[str, float]:
    """Loss of 4 examples; with random labels on masked positions; with one target changed."""
    import torch

    from sophiavl_mcore.parallel import destroy_parallel
    from sophiavl_mcore.trm_train import build_run, local_examples, record_order

    run = build_run(cfg)
    ids = record_order(cfg, len(run.records)).next_batch(4)
    mbs = run.trainer.micro_batches(local_examples(run, ids))
    base = run.trainer.run_micro_batches(mbs, forward_only=True)["loss"]
    gen = torch.Generator().manual_seed(0)
    prompt_changed = []
    for mb in mbs:
        labels = mb["labels"].clone()
        masked = mb["loss_mask"] == 0
        labels[masked] = torch.randint(0, 600, (int(masked.sum()),), generator=gen)
        prompt_changed.append({**mb, "labels": labels})
    changed_count = sum(int((a["labels"] != b["labels"]).sum()) for a, b in zip(mbs, prompt_changed, strict=True))
    prompt_loss = run.trainer.run_micro_batches(prompt_changed, forward_only=True)["loss"]
    target_changed = [dict(mb) for mb in mbs]
    labels = mbs[0]["labels"].clone()
    b, t = (mbs[0]["loss_mask"] == 1).nonzero()[0].tolist()
    labels[b, t] = (labels[b, t] + 1) % 600
    target_changed[0]["labels"] = labels
    target_loss = run.trainer.run_micro_batches(target_changed, forward_only=True)["loss"]
    destroy_parallel(keep_process_group=True)
    return {"base": base, "prompt_labels_changed": prompt_loss, "target_changed": target_loss,
            "n_changed_prompt_labels": changed_count}


def _hf_loss(hf_dir: Path, model_dir: str, data: str, ids: list[int]) -> float:
    """Token-mean target loss of the exported checkpoint run by transformers."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from sophiavl_mcore.trainer.collate import collate
    from sophiavl_mcore.trainer.sft.data import (
        ExampleBuilder,
        image_config_for,
        load_thinking_records,
    )

    tok = AutoTokenizer.from_pretrained(hf_dir)
    records = load_thinking_records(data)
    builder = ExampleBuilder(tok, image_config_for(hf_dir), 1024)
    mb = collate(builder.trm_examples([records[i] for i in ids]), builder.pad_id)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    image_token = model.config.image_token_id
    with torch.no_grad():
        logits = model(input_ids=mb["input_ids"], pixel_values=mb["pixel_values"],
                       image_grid_thw=mb["image_grid_thw"],
                       mm_token_type_ids=(mb["input_ids"] == image_token).int()).logits
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), mb["labels"].flatten(),
                                           reduction="none").view_as(mb["labels"])
    return float((ce * mb["loss_mask"]).sum() / mb["loss_mask"].sum())


def _worker(rank: int, model: str, data: str, out: str) -> dict:
    import torch

    from sophiavl_mcore.trm_train import record_order, train

    out_dir = Path(out)
    res: dict = {}
    for name, tp, pp in (("tp1dp2", 1, 1), ("pp2", 1, 2)):
        # The schedule of the long run (decay over STEPS), so every update uses the same LR.
        hist = train(_cfg(model, data, out_dir / name, tp, pp, 2, "export_hf=false",
                          f"optim.decay_steps={STEPS}"))
        res[name] = [h["train/loss"] for h in hist]
        res[name + "_grad_norm"] = hist[0]["train/grad_norm"]
    res["mask"] = _mask_check(_cfg(model, data, out_dir / "mask", 2, 1, 1, "export_hf=false",
                                   "optim.warmup_steps=0"))
    cfg = _cfg(model, data, out_dir / "tp2", 2, 1, STEPS, f"optim.decay_steps={STEPS}")
    hist = train(cfg)
    res["tp2"] = hist
    if rank == 0:
        first = record_order(cfg, 32).next_batch(cfg.sft.global_batch_size)
        res["hf_loss"] = _hf_loss(out_dir / "tp2" / "hf", model, data, first)
        res["exported"] = sorted(p.name for p in (out_dir / "tp2" / "hf").iterdir())
    torch.distributed.barrier()
    return res


def test_trm_sft_layouts_agree_loss_falls_and_export_serves(sft_case, tmp_path):
    from sophiavl_mcore.testing.multiproc import launch

    results = launch(_worker, 2, str(sft_case["model"]), str(sft_case["data"]), str(tmp_path))
    r0 = results[0]
    for r in results[1:]:  # every rank reports the same global numbers
        assert r["tp1dp2"] == pytest.approx(r0["tp1dp2"], abs=1e-9)
        assert r["pp2"] == pytest.approx(r0["pp2"], abs=1e-9)
    tp2 = [h["train/loss"] for h in r0["tp2"]]
    norms = (r0["tp1dp2_grad_norm"], r0["pp2_grad_norm"], r0["tp2"][0]["train/grad_norm"])
    report = (f"step-1 loss: tp1dp2={r0['tp1dp2'][0]:.7f} pp2={r0['pp2'][0]:.7f} "
              f"tp2={tp2[0]:.7f}; step-1 grad norm: tp1dp2={norms[0]:.7f} pp2={norms[1]:.7f} "
              f"tp2={norms[2]:.7f}; step-2 loss: tp1dp2={r0['tp1dp2'][1]:.7f} "
              f"pp2={r0['pp2'][1]:.7f} tp2={tp2[1]:.7f}")
    print("\n" + report)  # noqa: T201 - the figures the issue asks for
    print("tp2 loss curve:", [round(x, 3) for x in tp2])  # noqa: T201
    print("tp2 tokens/s:", [round(h["perf/tokens_per_s"]) for h in r0["tp2"]])  # noqa: T201

    # Same weights + same global batch: every layout computes the same token-mean loss.
    assert abs(r0["pp2"][0] - r0["tp1dp2"][0]) <= TOL, report
    assert abs(tp2[0] - r0["tp1dp2"][0]) <= TOL, report
    # Same gradient (norm over TP/PP/DP without double counting replicated parameters)
    # and the same Adam update: the second step's loss agrees too.
    assert max(norms) - min(norms) <= TOL * max(norms), report
    assert abs(r0["pp2"][1] - r0["tp1dp2"][1]) <= 1e-3, report
    assert abs(tp2[1] - r0["tp1dp2"][1]) <= 1e-3, report
    assert r0["pp2"][1] < r0["pp2"][0] - 0.1, report  # and the update did something

    mask = r0["mask"]
    assert mask["n_changed_prompt_labels"] > 1000
    assert mask["prompt_labels_changed"] == mask["base"], mask
    assert abs(mask["target_changed"] - mask["base"]) > 1e-3, mask

    first5, last5 = sum(tp2[:5]) / 5, sum(tp2[-5:]) / 5
    assert last5 < 0.5 * first5, (first5, last5, tp2)
    final = r0["tp2"][-1]
    assert final["train/final_loss_first_batch"] < 0.5 * tp2[0]
    assert all(h["train/grad_norm"] > 0 and h["train/update_ok"] == 1.0 for h in r0["tp2"])
    lrs = [h["train/lr"] for h in r0["tp2"]]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[2]  # warmup, then cosine decay

    # The HF export is the trained model: transformers reproduces its loss.
    assert abs(r0["hf_loss"] - final["train/final_loss_first_batch"]) <= TOL, (
        r0["hf_loss"], final["train/final_loss_first_batch"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert name in r0["exported"], r0["exported"]
