"""GPU: TE spec vs local spec logits; bf16 and FP8 (delayed, tensorwise) fwd+bwd of a
~0.5B Qwen2.5-shaped model with tokens/s and peak memory printed. Skips without CUDA/TE."""

from __future__ import annotations

import time

import pytest
import torch

from sophiavl_mcore.models.specs import te_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not te_available(), reason="needs CUDA + TE")]

HALF_B = dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, rope_theta=1e6,
              rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def parallel():
    from sophiavl_mcore.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    info = initialize_parallel(ParallelConfig())
    yield info
    destroy_parallel()


def _build(info, use_te, dtype=torch.bfloat16, **kw):
    from sophiavl_mcore.models import build_qwen2_lm

    return build_qwen2_lm(HALF_B, info, dtype=dtype, use_te=use_te, **kw).cuda()


def test_te_vs_local_logits(parallel):
    from sophiavl_mcore.checkpoint import build_plan
    from sophiavl_mcore.models import read_lm_dims

    local, te = _build(parallel, False, torch.float32), _build(parallel, True, torch.float32)
    plan_l = build_plan(read_lm_dims(HALF_B), 1, 1, te=False)
    plan_t = build_plan(read_lm_dims(HALF_B), 1, 1, te=True)
    src, dst = dict(local.named_parameters()), dict(te.named_parameters())
    with torch.no_grad():
        for rl, rt in zip(plan_l.rules, plan_t.rules, strict=True):
            dst[rt.mcore].copy_(src[rl.mcore])
    ids = torch.randint(0, 151936, (2, 256), device="cuda")
    pos = torch.arange(256, device="cuda").unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        diff = (local(ids, pos, None) - te(ids, pos, None)).abs().max().item()
    print(f"TE vs local max abs logit diff (fp32): {diff:.2e}")  # noqa: T201 (test report)
    assert diff < 1e-2


@pytest.mark.parametrize("fp8,recipe", [(None, None), ("hybrid", "delayed"), ("e4m3", "tensorwise")])
def test_bf16_fp8_forward_backward(parallel, fp8, recipe):
    model = _build(parallel, True, fp8=fp8, fp8_recipe=recipe)
    b, s = 4, 2048
    ids = torch.randint(0, 151936, (b, s), device="cuda")
    pos = torch.arange(s, device="cuda").unsqueeze(0).expand(b, -1)
    torch.cuda.reset_peak_memory_stats()
    for i in range(4):
        if i == 1:
            torch.cuda.synchronize()
            t = time.perf_counter()
        out = model(ids, pos, None, labels=ids)
        out.float().mean().backward()
    torch.cuda.synchronize()
    tps = 3 * b * s / (time.perf_counter() - t)
    print(f"fp8={fp8} recipe={recipe}: {tps:,.0f} tokens/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")  # noqa: T201 (test report)
    assert torch.isfinite(out).all()
