"""GRPO log-probs and update through Megatron's schedule on a tiny random Qwen2.5-VL.

One 2-process gloo launch runs three layouts on the same global batch of 6 responses
(2 prompts with an image each, 3 responses per prompt, different lengths, float32):

* TP=1 × DP=2 (each DP rank holds 3 responses), TP=2, PP=2 (1F1B, 3 micro-batches of
  different padded lengths).

Per layout: (a) ``compute_logprobs`` vs transformers' full-vocabulary log-softmax of the
same checkpoint, computed per sample without padding in this process; (c) a step with
all advantages zero and kl 0 (weight decay 0) leaves every weight bit-identical; (b) one
real step (the ``RolloutBatch`` advantages, old log-probs from the trainer, reference
log-probs, vLLM-style rollout log-probs = HF log-probs + known noise) whose updated
weights are exported to HF format with the checkpoint package and compared across
layouts, and whose loss is compared too. At TP=2 additionally: the reference model
stays frozen while the policy moves, and (d) the sign check: every response with a
positive advantage gains log-probability, every negative one loses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.dist]

LAYOUTS = (("tp1dp2", 1, 1), ("tp2", 2, 1), ("pp2", 1, 2))
TEMPERATURE = 0.7
MICRO_BATCH = 2
RESPONSE_LENS = (5, 9, 3, 12, 7, 6)
ADVANTAGES = (1.0, -1.0, 0.5, -0.8, 1.2, -0.4)
LR = 1e-3
NOISE = 0.05  # |rollout − HF| log-prob noise of the fake vLLM log-probs


def _prompt_ids(tok, question: str, n_image_tokens: int) -> torch.Tensor:
    ids = tok.convert_tokens_to_ids
    head = [ids("<|im_start|>")] + tok.encode("user\n")
    image = [ids("<|vision_start|>")] + [ids("<|image_pad|>")] * n_image_tokens + [ids("<|vision_end|>")]
    tail = tok.encode(question) + [ids("<|im_end|>"), ids("<|im_start|>")] + tok.encode("assistant\n")
    return torch.tensor(head + image + tail, dtype=torch.long)


def _hf_reference(model_dir: Path, batch: dict) -> dict:
    """Per-sample, unpadded full-vocabulary log-probs and entropies from transformers."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from sophiavl_mcore.trainer.oracle import full_vocab_logprobs_entropy

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    image_token = hf.config.image_token_id
    lps, ents = [], []
    with torch.no_grad():
        for p, r, pv, grid in zip(batch["prompt_ids"], batch["response_ids"], batch["pixel_values"],
                                  batch["image_grid_thw"], strict=True):
            ids = torch.cat([p, r])[None]
            logits = hf(input_ids=ids, pixel_values=pv, image_grid_thw=grid,
                        mm_token_type_ids=(ids == image_token).int()).logits[0]
            scored = logits[p.numel() - 1:p.numel() - 1 + r.numel()]
            lp, ent = full_vocab_logprobs_entropy(scored, r, temperature=TEMPERATURE)
            lps.append(lp.float())
            ents.append(ent.float())
    return {"logprobs": lps, "entropy": ents}


@pytest.fixture(scope="module")
def grpo_case(tmp_path_factory) -> Path:
    """Tiny Qwen2.5-VL checkpoint, the global batch and HF reference log-probs on disk."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    from sophiavl_mcore.testing.tiny_models import (
        TinyModelSpec,
        build_tiny_qwen2_5_vl,
        make_test_image,
    )

    root = tmp_path_factory.mktemp("grpo_step")
    # 2 KV heads so TP=2 splits the query groups; 2 layers so PP=2 has one per stage.
    model_dir = build_tiny_qwen2_5_vl(root / "tiny_vl", TinyModelSpec(num_kv_heads=2))
    tok = AutoTokenizer.from_pretrained(model_dir)
    proc = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14,
                                 temporal_patch_size=2, merge_size=2)
    images = [proc(images=[make_test_image(s, size)], return_tensors="pt")
              for s, size in ((0, (56, 84)), (1, (84, 56)))]
    questions = ("What is shown in the picture?", "How many squares are in the image?")
    prompts = [_prompt_ids(tok, q, int(im["image_grid_thw"].prod()) // 4)
               for q, im in zip(questions, images, strict=True)]
    gen = torch.Generator().manual_seed(0)
    batch: dict = {"prompt_ids": [], "response_ids": [], "pixel_values": [], "image_grid_thw": []}
    for i, n in enumerate(RESPONSE_LENS):
        g = i // 3  # 3 responses per prompt, sharing the prompt's image tensors
        batch["prompt_ids"].append(prompts[g])
        batch["response_ids"].append(torch.randint(7, 600, (n,), generator=gen))  # no specials
        batch["pixel_values"].append(images[g]["pixel_values"])
        batch["image_grid_thw"].append(images[g]["image_grid_thw"])
    batch["group_ids"] = [i // 3 for i in range(len(RESPONSE_LENS))]
    batch["response_mask"] = [torch.ones(n, dtype=torch.bool) for n in RESPONSE_LENS]
    batch["response_mask"][3][-2:] = False  # e.g. a truncated tail that must not train
    ref = _hf_reference(model_dir, batch)
    batch["rollout_logprobs"] = [lp + NOISE * torch.randn(lp.shape, generator=gen)
                                 for lp in ref["logprobs"]]
    torch.save({"batch": batch, "ref": ref}, root / "case.pt")
    return root


# ----------------------------------------------------------------- worker (spawned)


def _rollout_batch(raw: dict, advantages):
    from sophiavl_mcore.trainer.grpo.rollout_batch import RolloutBatch

    return RolloutBatch(
        prompt_ids=raw["prompt_ids"], response_ids=raw["response_ids"],
        advantages=torch.tensor(advantages), group_ids=raw["group_ids"],
        problem_types=["numerical"] * len(raw["prompt_ids"]),
        response_mask=raw["response_mask"], rollout_logprobs=raw["rollout_logprobs"],
        pixel_values=raw["pixel_values"], image_grid_thw=raw["image_grid_thw"],
    )


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _max_change(model, before: dict[str, torch.Tensor]) -> float:
    return max((p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters())


def _build(model_dir: Path, info):
    from sophiavl_mcore.models.qwen2_5_vl import build_qwen2_5_vl

    return build_qwen2_5_vl(model_dir, info)


def _logprob_change(ddp, share, before: list[torch.Tensor]) -> list[float]:
    """Σ over each response's trained tokens of (log-prob now − log-prob before)."""
    from sophiavl_mcore.trainer.grpo.step import compute_logprobs

    after = compute_logprobs(ddp, share, MICRO_BATCH, TEMPERATURE).logprobs
    return [float(((a - b) * m).sum()) for a, b, m in
            zip(after, before, share.response_mask, strict=True)]


def _layout(rank: int, root: Path, name: str, tp: int, pp: int) -> dict:
    from sophiavl_mcore.checkpoint.hf import export_hf, load_hf_weights
    from sophiavl_mcore.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from sophiavl_mcore.trainer.grpo.step import compute_logprobs, grpo_train_step
    from sophiavl_mcore.trainer.grpo.config import GRPOLossConfig
    from sophiavl_mcore.trainer.config import OptimConfig
    from sophiavl_mcore.trainer.optim import build_optimizer, wrap_ddp
    from sophiavl_mcore.trainer.grpo.reference_model import ReferenceModel

    model_dir = root / "tiny_vl"
    raw = torch.load(root / "case.pt", weights_only=True)["batch"]
    info = initialize_parallel(ParallelConfig(tp=tp, pp=pp), num_layers=2, num_heads=2,
                               num_query_groups=2)
    model = _build(model_dir, info)
    meta = load_hf_weights(model, model_dir, info)
    optim = OptimConfig(lr=LR, weight_decay=0.0, clip_grad=1.0, decay_style="constant")
    ddp = wrap_ddp(model, optim)
    optimizer, scheduler = build_optimizer([ddp], optim, total_steps=10)
    share = _rollout_batch(raw, ADVANTAGES).shard(info.dp_rank, info.dp)
    out: dict = {"dp_rank": info.dp_rank, "dp": info.dp}

    # (a) trainer log-probs through the schedule
    old = compute_logprobs(ddp, share, MICRO_BATCH, TEMPERATURE, with_entropy=True)
    out["logprobs"], out["entropy"] = old.logprobs, old.entropy
    share.old_logprobs = old.logprobs
    reference = None
    if name == "tp2":
        reference = ReferenceModel.from_policy(ddp, lambda: _build(model_dir, info), offload=True)
        share.ref_logprobs = reference.compute_logprobs(share, MICRO_BATCH, TEMPERATURE).logprobs
        out["ref_initial"] = share.ref_logprobs
    else:
        share.ref_logprobs = old.logprobs  # the reference is the initial policy

    # (c) zero advantages, no KL, wd 0: no gradient at all, weights bit-identical
    zero = _rollout_batch(raw, [0.0] * len(ADVANTAGES)).shard(info.dp_rank, info.dp)
    zero.old_logprobs = old.logprobs
    before = _snapshot(model)
    m0 = grpo_train_step(ddp, optimizer, scheduler, zero, GRPOLossConfig(kl_coef=0.0),
                         MICRO_BATCH, TEMPERATURE)
    out["zero_step"] = {"max_change": _max_change(model, before), "grad_norm": m0["train/grad_norm"]}

    # (b) one real step, exported to HF for the cross-layout weight comparison
    loss_cfg = GRPOLossConfig(kl_coef=0.04, entropy_coef=0.0)
    out["step"] = grpo_train_step(ddp, optimizer, scheduler, share, loss_cfg, MICRO_BATCH,
                                  TEMPERATURE)
    out["step_change"] = _max_change(model, before)
    export_hf(model, root / name / "hf", model_meta=meta, mcore_dir=root / name / "mcore")

    if name == "tp2":  # (d) sign check; the reference stays where it was
        out["delta"] = _logprob_change(ddp, share, old.logprobs)
        out["ref_after"] = reference.compute_logprobs(share, MICRO_BATCH, TEMPERATURE).logprobs
    destroy_parallel(keep_process_group=True)
    return out


def _worker(rank: int, root: str) -> dict:
    return {name: _layout(rank, Path(root), name, tp, pp) for name, tp, pp in LAYOUTS}


# ----------------------------------------------------------------- the test


def _full(results: list[dict], name: str, key: str) -> list[torch.Tensor]:
    """Per-response values of the global batch, in order, from the DP shares."""
    by_dp = {r[name]["dp_rank"]: r[name][key] for r in results}
    return [t for d in sorted(by_dp) for t in by_dp[d]]


def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_grpo_logprobs_and_step_agree_across_layouts(grpo_case, dist_launch):
    case = torch.load(grpo_case / "case.pt", weights_only=True)
    ref, raw = case["ref"], case["batch"]
    results = dist_launch(_worker, 2, str(grpo_case))
    report = []

    # (a) every layout's trainer log-probs / entropies = transformers' full vocabulary
    for name, _, _ in LAYOUTS:
        for key in ("logprobs", "entropy"):
            got = _full(results, name, key)
            diff = max((g - e).abs().max().item() for g, e in zip(got, ref[key], strict=True))
            report.append(f"{name} {key} max|diff| vs HF = {diff:.2e}")
            assert diff <= 1e-4, report[-1]
        if results[0][name]["dp"] == 1:  # both ranks (TP peers / PP stages) hold them
            for a, b in zip(results[0][name]["logprobs"], results[1][name]["logprobs"], strict=True):
                assert torch.equal(a, b), name

    # (c) zero advantages and no KL: no gradient, no change
    for name, _, _ in LAYOUTS:
        for r in results:
            assert r[name]["zero_step"] == {"max_change": 0.0, "grad_norm": 0.0}, (name, r[name]["zero_step"])

    # (b) same loss, metrics on every rank, same updated weights
    steps = {name: results[0][name]["step"] for name, _, _ in LAYOUTS}
    for name, _, _ in LAYOUTS:
        for key, value in steps[name].items():
            if not key.startswith("perf/"):
                other = results[1][name]["step"][key]
                assert other == pytest.approx(value, abs=1e-12, nan_ok=True), (name, key)
    base = steps["tp1dp2"]
    report.append("step loss: " + ", ".join(f"{n}={s['train/loss']:.8f}" for n, s in steps.items()))
    report.append("grad norm: " + ", ".join(f"{n}={s['train/grad_norm']:.8f}" for n, s in steps.items()))
    report.append("step tokens/s: " + ", ".join(f"{n}={s['perf/train_tokens_per_s']:.0f}" for n, s in steps.items()))
    for name in ("tp2", "pp2"):
        assert abs(steps[name]["train/loss"] - base["train/loss"]) <= 1e-5, report[-3]
        assert abs(steps[name]["train/grad_norm"] - base["train/grad_norm"]) <= 1e-5 * base["train/grad_norm"], report[-2]
    # token-mean over the global batch of −A·ratio (ratio 1 at the first update)
    tokens = [int(m.sum()) for m in raw["response_mask"]]
    expected_pg = -sum(a * n for a, n in zip(ADVANTAGES, tokens, strict=True)) / sum(tokens)
    assert base["train/pg_loss"] == pytest.approx(expected_pg, abs=1e-6)
    assert base["train/response_tokens"] == sum(tokens)
    assert base["train/kl"] == pytest.approx(0.0, abs=1e-6) and base["train/lr"] == pytest.approx(LR)
    # logprob_mismatch recomputed here from the trainer's old log-probs and the rollout's
    old = _full(results, "tp1dp2", "logprobs")
    num = sum(float(((o - r).abs() * m).sum()) for o, r, m in
              zip(old, raw["rollout_logprobs"], raw["response_mask"], strict=True))
    assert base["train/logprob_mismatch"] == pytest.approx(num / sum(tokens), abs=1e-6)
    assert 0.5 * NOISE < base["train/logprob_mismatch"] < 1.5 * NOISE

    weights = {name: _hf_tensors(grpo_case / name / "hf") for name, _, _ in LAYOUTS}
    initial = _hf_tensors(grpo_case / "tiny_vl")
    for name in ("tp2", "pp2"):
        assert weights[name].keys() == weights["tp1dp2"].keys()
        diff = max((weights[name][k] - v).abs().max().item() for k, v in weights["tp1dp2"].items())
        report.append(f"updated weights {name} vs tp1dp2: max|diff| = {diff:.2e}")
        assert diff <= 1e-5, report[-1]
    moved = max((v - initial[k]).abs().max().item() for k, v in weights["tp1dp2"].items())
    assert moved > 0.5 * LR, moved  # the update did something (Adam steps are ~lr)

    # reference frozen, policy moved; (d) the sign of every response's change
    tp2 = results[0]["tp2"]
    for a, b in zip(tp2["ref_initial"], tp2["ref_after"], strict=True):
        assert torch.equal(a, b)
    ref_vs_policy = max((a - b).abs().max().item()
                        for a, b in zip(tp2["ref_initial"], tp2["logprobs"], strict=True))
    assert ref_vs_policy <= 1e-6, ref_vs_policy  # a copy of the initial policy
    delta = tp2["delta"]
    report.append("Σ log-prob change per response (advantage): " + ", ".join(
        f"{d:+.4f} ({a:+.1f})" for d, a in zip(delta, ADVANTAGES, strict=True)))
    for d, a in zip(delta, ADVANTAGES, strict=True):
        assert d * a > 0, report[-1]
    print("\n" + "\n".join(report))  # noqa: T201 - the figures the issue asks to report


# ----------------------------------------------------------------- single-process checks


def _small_batch(**overrides):
    from sophiavl_mcore.trainer.grpo.rollout_batch import RolloutBatch

    gen = torch.Generator().manual_seed(1)
    plens, rlens = (4, 6, 3, 5), (2, 7, 4, 1)
    fields = dict(
        prompt_ids=[torch.randint(10, 99, (p,), generator=gen) for p in plens],
        response_ids=[torch.randint(10, 99, (r,), generator=gen) for r in rlens],
        advantages=[0.5, -0.5, 1.0, -1.0], group_ids=[0, 0, 1, 1],
        problem_types=["numerical", "numerical", "ocr", "ocr"],
        old_logprobs=[-torch.rand(r, generator=gen) for r in rlens],
        position_ids=[torch.arange(p + r).expand(3, -1) + 100 for p, r in zip(plens, rlens, strict=True)],
        pad_id=3,
    )
    fields.update(overrides)
    return RolloutBatch(**fields)


def test_rollout_batch_micro_batch_layout():
    batch = _small_batch()
    mbs = batch.micro_batches(micro_batch_size=2, pad_to_multiple_of=4)
    # length-sorted: totals are 6, 13, 7, 6 → (0, 3) then (2, 1)
    assert [mb.indices for mb in mbs] == [[0, 3], [2, 1]]
    assert [tuple(mb.tensors["input_ids"].shape) for mb in mbs] == [(2, 8), (2, 16)]
    for mb in mbs:
        t = mb.tensors
        for b, i in enumerate(mb.indices):
            p, r = batch.prompt_lens[i], batch.response_lens[i]
            resp = batch.response_ids[i]
            # the output at P−1+j scores response token j
            assert torch.equal(t["labels"][b, p - 1:p - 1 + r], resp)
            assert t["response_mask"][b].nonzero().flatten().tolist() == list(range(p - 1, p - 1 + r))
            assert torch.equal(t["old_logprobs"][b, p - 1:p - 1 + r], batch.old_logprobs[i])
            assert torch.equal(t["position_ids"][:, b, :p + r], batch.position_ids[i])
            assert (t["input_ids"][b, p + r:] == 3).all()
            assert float(t["advantages"][b]) == batch.advantages[i]
        assert mb.num_tokens == sum(batch.prompt_lens[i] + batch.response_lens[i] for i in mb.indices)
    half = batch.shard(1, 2)
    assert half.problem_types == ["ocr", "ocr"] and half.group_ids.tolist() == [1, 1]


def test_rollout_batch_micro_batches_share_group_images():
    """A group's samples share their prompt's image tensor: a micro-batch carries each
    distinct image once plus ``image_index``, which restores the per-sample images."""
    from sophiavl_mcore.trainer.grpo.rollout_batch import RolloutBatch

    img = [torch.randn(16, 8), torch.randn(4, 8)]
    grid = [torch.tensor([[1, 4, 4]]), torch.tensor([[1, 2, 2]])]
    groups = [0, 1, 0, 1, 0]
    batch = RolloutBatch(
        prompt_ids=[torch.arange(6) + 10] * 5, response_ids=[torch.arange(3) + 20] * 5,
        advantages=torch.zeros(5), group_ids=groups, problem_types=["numerical"] * 5,
        pixel_values=[img[g] for g in groups], image_grid_thw=[grid[g] for g in groups], pad_id=3)
    batch.position_ids = [torch.zeros(3, 9, dtype=torch.long)] * 5
    mbs = batch.micro_batches(micro_batch_size=5, pad_to_multiple_of=4)
    assert len(mbs) == 1
    t, rows = mbs[0].tensors, mbs[0].indices
    assert [groups[i] for i in rows] == [0, 0, 0, 1, 1]  # equal lengths: grouped
    assert t["pixel_values"].shape == (20, 8) and t["image_grid_thw"].tolist() == [[1, 4, 4], [1, 2, 2]]
    assert t["image_index"].tolist() == [0, 0, 0, 1, 1]
    per_image = torch.split(t["pixel_values"], [16, 4])
    restored = torch.cat([per_image[k] for k in t["image_index"].tolist()])
    assert torch.equal(restored, torch.cat([img[groups[i]] for i in rows]))
    # distinct tensors (no sharing): the collated images as they are, no index
    batch.pixel_values = [x.clone() for x in batch.pixel_values]
    t = batch.micro_batches(micro_batch_size=5, pad_to_multiple_of=4)[0].tensors
    assert "image_index" not in t and t["pixel_values"].shape == (16 * 3 + 4 * 2, 8)


def test_rollout_batch_rejects_bad_input_with_names():
    from sophiavl_mcore.trainer.grpo.rollout_batch import RolloutBatch

    good = _small_batch()
    with pytest.raises(ValueError, match=r"old_logprobs\[1\] has shape \(6,\), expected \[R_i\] = \(7,\)"):
        _small_batch(old_logprobs=[torch.zeros(n) for n in (2, 6, 4, 1)])
    with pytest.raises(ValueError, match=r"advantages: non-finite at responses \[2\]"):
        _small_batch(advantages=[0.0, 1.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="problem_types has 3 entries, expected one per response"):
        _small_batch(problem_types=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"response 0: image_grid_thw \[\[1, 2, 2\]\] describes 4 "
                                         "patches, pixel_values has 3 rows"):
        _small_batch(pixel_values=[torch.zeros(3, 8)] + [None] * 3,
                     image_grid_thw=[torch.tensor([[1, 2, 2]])] + [None] * 3)
    with pytest.raises(ValueError, match="cannot shard 4 responses over dp=3"):
        good.shard(0, 3)
    no_pos = RolloutBatch(good.prompt_ids, good.response_ids, good.advantages, good.group_ids,
                          good.problem_types)
    with pytest.raises(ValueError, match="call ensure_position_ids"):
        no_pos.micro_batches(2)
