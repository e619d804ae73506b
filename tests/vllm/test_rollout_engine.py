"""The vLLM rollout engine on CPU with a tiny random Qwen2.5-VL (one shared engine)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sophiavl_mcore.rollout import (
    RolloutConfig,
    RolloutRequest,
    RolloutWeightError,
    SamplingConfig,
)
from sophiavl_mcore.testing.tiny_models import make_test_image

IMAGE_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                "Describe the picture.<|im_end|>\n<|im_start|>assistant\n")


def _text_requests(engine, k: int = 3) -> list[RolloutRequest]:
    return [RolloutRequest(prompt=engine.chat_prompt(
        [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}])) for i in range(k)]


def _tokens(results) -> list[list[int]]:
    return [s.token_ids.tolist() for r in results for s in r.samples]


def test_generate_n_samples_shapes_and_logprobs_match_hf(engine, tiny_vl_dir):
    sampling = SamplingConfig(n=4, temperature=1.0, max_tokens=8, seed=7)
    results = engine.generate(_text_requests(engine), sampling)
    vocab = json.loads((tiny_vl_dir / "config.json").read_text())["text_config"]["vocab_size"]
    assert len(results) == 3
    for res in results:
        assert len(res.samples) == 4
        for s in res.samples:
            assert s.token_ids.dtype == np.int64 and s.logprobs.dtype == np.float32
            assert 1 <= len(s.token_ids) <= 8 and s.logprobs.shape == s.token_ids.shape
            assert np.all(np.isfinite(s.logprobs)) and np.all(s.logprobs <= 0)
            assert s.finish_reason in ("stop", "length")
            if s.finish_reason == "length":
                assert len(s.token_ids) == 8
            assert s.token_ids.min() >= 0 and s.token_ids.max() < vocab
        # n samples of one prompt are distinct draws
        assert len({tuple(s.token_ids.tolist()) for s in res.samples}) > 1

    # The reported sampling log-probs (T=1, no top-k/p) equal the HF model's log-softmax
    # with the vision markers forbidden (sampling.forbid_vision_tokens: bias -100).
    from transformers import Qwen2_5_VLForConditionalGeneration

    from sophiavl_mcore.rollout.interface import vision_token_ids

    vision = vision_token_ids(engine.tokenizer)

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_vl_dir),
                                                            dtype=torch.float32).eval()
    worst = 0.0
    for res in results[:2]:
        for s in res.samples[:2]:
            ids = torch.tensor(np.concatenate([res.prompt_token_ids, s.token_ids]))[None]
            with torch.no_grad():
                logits = hf(input_ids=ids).logits[0].float()
            logits[:, vision] -= 100.0
            p = len(res.prompt_token_ids)
            ref = torch.log_softmax(logits[p - 1:-1], dim=-1)
            ref = ref.gather(1, torch.from_numpy(s.token_ids)[:, None])[:, 0].numpy()
            worst = max(worst, float(np.abs(ref - s.logprobs).max()))
    assert worst < 2e-3, f"max |vLLM - HF| log-prob = {worst}"


def test_seed_reproducibility(engine):
    reqs = _text_requests(engine, 2)
    a = engine.generate(reqs, SamplingConfig(n=3, max_tokens=12, seed=123))
    b = engine.generate(reqs, SamplingConfig(n=3, max_tokens=12, seed=123))
    c = engine.generate(reqs, SamplingConfig(n=3, max_tokens=12, seed=124))
    assert _tokens(a) == _tokens(b)
    for ra, rb in zip(a, b, strict=True):
        for sa, sb in zip(ra.samples, rb.samples, strict=True):
            np.testing.assert_allclose(sa.logprobs, sb.logprobs, atol=1e-5)
    assert _tokens(a) != _tokens(c)


def test_image_prompt(engine):
    img_a, img_b = make_test_image(1), make_test_image(2)  # 56 x 84 pixels
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=6, logprobs=2)
    ra, rb = engine.generate([RolloutRequest(prompt=IMAGE_PROMPT, images=[img_a]),
                              RolloutRequest(prompt=IMAGE_PROMPT, images=[img_b])], greedy)
    pad_id = engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 56x84 px -> 4x6 patches of 14 px -> 2x3 tokens after the 2x2 merge
    assert int((ra.prompt_token_ids == pad_id).sum()) == 6
    assert len(ra.samples[0].top_logprobs) == len(ra.samples[0].token_ids)
    assert all(1 <= len(alts) <= 3 for alts in ra.samples[0].top_logprobs)
    # The image reaches the model: same prompt text, different pixels, different scores.
    n = min(len(ra.samples[0].logprobs), len(rb.samples[0].logprobs))
    assert (ra.samples[0].token_ids.tolist() != rb.samples[0].token_ids.tolist()
            or not np.allclose(ra.samples[0].logprobs[:n], rb.samples[0].logprobs[:n]))
    with pytest.raises(ValueError, match="max_images_per_prompt"):
        engine.generate([RolloutRequest(prompt=IMAGE_PROMPT, images=[img_a, img_b])], greedy)


def test_load_weights_changes_outputs_and_restores(engine, tiny_vl_dir):
    from safetensors.torch import load_file

    original = load_file(str(tiny_vl_dir / "model.safetensors"))
    reqs = _text_requests(engine, 2) + [RolloutRequest(prompt=IMAGE_PROMPT,
                                                       images=[make_test_image(3)])]
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=8)
    base = engine.generate(reqs, greedy)
    v0 = engine.policy_version

    gen = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.05 * v.std().clamp_min(1e-3) * torch.randn(v.shape, generator=gen)
                 for k, v in original.items()}
    assert engine.load_weights(iter(perturbed.items())) == v0 + 1
    changed = engine.generate(reqs, greedy)
    lp_base = np.concatenate([s.logprobs for r in base for s in r.samples])
    lp_changed = np.concatenate([s.logprobs for r in changed for s in r.samples])
    assert (_tokens(base) != _tokens(changed)
            or not np.allclose(lp_base, lp_changed, atol=1e-4))

    assert engine.load_weights(iter(original.items()), version=42) == 42
    restored = engine.generate(reqs, greedy)
    assert _tokens(base) == _tokens(restored)
    for rb, rr in zip(base, restored, strict=True):
        np.testing.assert_allclose(rb.samples[0].logprobs, rr.samples[0].logprobs, atol=1e-4)

    # An unknown tensor name fails with a clear error, keeps the version, and leaves
    # the engine generating exactly as before.
    bad = {"model.language_model.layers.99.mlp.up_proj.weight": torch.zeros(4, 4)}
    with pytest.raises(RolloutWeightError, match="policy_version=42"):
        engine.load_weights(iter(bad.items()))
    assert engine.policy_version == 42
    after_failure = engine.generate(reqs, greedy)
    assert _tokens(after_failure) == _tokens(base)
    for rb, rf in zip(base, after_failure, strict=True):
        np.testing.assert_allclose(rb.samples[0].logprobs, rf.samples[0].logprobs, atol=1e-4)
    with pytest.raises(RolloutWeightError, match="empty"):
        engine.load_weights(iter([]))


def test_sleep_wake_guarded_on_cpu(engine):
    engine.sleep()
    assert engine.sleeping
    with pytest.raises(RuntimeError, match="wake_up"):
        engine.generate(_text_requests(engine, 1), SamplingConfig(n=1, max_tokens=2))
    engine.wake_up(tags=["weights"])
    assert engine.sleeping  # kv cache still asleep
    engine.wake_up()
    assert not engine.sleeping
    out = engine.generate(_text_requests(engine, 1), SamplingConfig(n=1, max_tokens=2))
    assert math.isfinite(float(out[0].samples[0].logprobs[0]))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(n=0), "n=0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(max_tokens=0), "max_tokens=0"),
    (dict(top_k=-5), "top_k=-5"),
])
def test_sampling_config_rejects_impossible_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        SamplingConfig(**kwargs)


def test_rollout_config_rejects_impossible_values():
    with pytest.raises(ValueError) as err:
        RolloutConfig(model="x", max_model_len=512, sleep_level=3,
                      sampling=SamplingConfig(max_tokens=1024))
    msg = str(err.value)
    assert "sleep_level=3" in msg and "max_tokens=1024" in msg and "max_model_len=512" in msg


def test_vision_tokens_are_never_sampled(engine):
    """A near-uniform random policy samples the image markers now and then; with
    ``forbid_vision_tokens`` (the default) it never does."""
    from sophiavl_mcore.rollout.interface import vision_token_ids

    vision = set(vision_token_ids(engine.tokenizer))
    assert len(vision) >= 3  # the tiny tokenizer has no <|vision_pad|>
    reqs = _text_requests(engine, 4)

    def count(forbid: bool) -> tuple[int, int]:
        out = engine.generate(reqs, SamplingConfig(n=16, temperature=1.5, max_tokens=32,
                                                   forbid_vision_tokens=forbid))
        toks = [t for seq in _tokens(out) for t in seq]
        return sum(t in vision for t in toks), len(toks)

    allowed, total_allowed = count(False)
    assert allowed > 0, f"no vision token in {total_allowed} tokens: the control cannot fail"
    forbidden, total = count(True)
    assert total > 1000 and forbidden == 0, (forbidden, total)
