"""M-RoPE position ids against transformers' Qwen2.5-VL ``get_rope_index`` on random layouts."""

from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5_VLConfig  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel  # noqa: E402

from sophiavl_mcore.models.rope_index import MRopeTokens, RopeIndexError, get_rope_index  # noqa: E402

IMAGE, VIDEO, V_START, V_END = 90, 91, 92, 93


@pytest.fixture(scope="module")
def hf_model() -> Qwen2_5_VLModel:
    """The smallest real Qwen2.5-VL model; only its ``get_rope_index`` is used."""
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 100,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 16,
            "tokens_per_second": 2,
        },
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=V_START,
        vision_end_token_id=V_END,
    )
    return Qwen2_5_VLModel(config).eval()


def _random_batch(rng: random.Random, with_video: bool, pad_side: str):
    """Random text/image/video layouts, padded; returns HF-style inputs."""
    samples, images, videos, seconds = [], [], [], []
    for _ in range(rng.randint(1, 3)):
        ids: list[int] = []
        for _ in range(rng.randint(0, 3)):
            ids += [rng.randint(0, 80) for _ in range(rng.randint(1, 6))]
            kind = rng.choice(["image", "video"] if with_video else ["image"])
            t = 1 if kind == "image" else rng.randint(1, 3)
            h, w = 2 * rng.randint(1, 4), 2 * rng.randint(1, 4)
            (images if kind == "image" else videos).append([t, h, w])
            if kind == "video":
                seconds.append(rng.choice([0.5, 1.0, 1.37, 2.0]))
            ids += [V_START] + [IMAGE if kind == "image" else VIDEO] * (t * h * w // 4) + [V_END]
        ids += [rng.randint(0, 80) for _ in range(rng.randint(1, 5))]
        samples.append(ids)
    length = max(len(s) for s in samples) + rng.randint(0, 3)
    input_ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for b, ids in enumerate(samples):
        where = slice(0, len(ids)) if pad_side == "right" else slice(length - len(ids), length)
        input_ids[b, where] = torch.tensor(ids)
        mask[b, where] = 1
    img = torch.tensor(images, dtype=torch.long) if images else None
    vid = torch.tensor(videos, dtype=torch.long) if videos else None
    sec = torch.tensor(seconds, dtype=torch.float32) if seconds else None
    return input_ids, mask, img, vid, sec


@pytest.mark.parametrize("with_video", [False, True])
@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_matches_transformers_on_random_layouts(hf_model, with_video, pad_side):
    tokens = MRopeTokens.from_hf_config(hf_model.config)
    assert (tokens.image_token_id, tokens.tokens_per_second) == (IMAGE, 2)
    rng = random.Random(f"{with_video}-{pad_side}")
    saw_image = False
    for _ in range(25):
        input_ids, mask, img, vid, sec = _random_batch(rng, with_video, pad_side)
        saw_image |= img is not None
        type_ids = (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()
        ref_pos, ref_delta = hf_model.get_rope_index(
            input_ids,
            mm_token_type_ids=type_ids,
            image_grid_thw=img,
            video_grid_thw=vid,
            second_per_grid_ts=sec,
            attention_mask=mask,
        )
        pos, delta = get_rope_index(input_ids, tokens, img, vid, sec, attention_mask=mask)
        assert pos.shape == (3, *input_ids.shape)
        assert torch.equal(pos, ref_pos), (input_ids, img, vid)
        assert torch.equal(delta, ref_delta.long())
    assert saw_image


def test_text_only_is_arange_on_all_rows(hf_model):
    input_ids = torch.randint(0, 80, (2, 7))
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0  # left padding
    ref, _ = hf_model.get_rope_index(
        input_ids, mm_token_type_ids=torch.zeros_like(input_ids), attention_mask=mask
    )
    pos, delta = get_rope_index(input_ids, MRopeTokens.from_hf_config(hf_model.config), attention_mask=mask)
    assert torch.equal(pos, ref)
    assert torch.equal(pos[:, 0], torch.arange(7).expand(3, -1))
    assert torch.equal(pos[:, 1, 2:], torch.arange(5).expand(3, -1))
    assert delta.tolist() == [[0], [0]]


def test_adjacent_images_in_one_run_are_split_by_token_count():
    tokens = MRopeTokens(image_token_id=IMAGE, video_token_id=VIDEO)
    # two 1x2x2 images (one merged token each) back to back, then 4x4 (4 tokens)
    input_ids = torch.tensor([[5, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, 6]])
    grids = torch.tensor([[1, 2, 2], [1, 2, 2], [1, 4, 4]])
    pos, delta = get_rope_index(input_ids, tokens, image_grid_thw=grids)
    # text 0; image@1 -> 1; image@2 -> 2; 2x2 grid @3: t=3, h=3,3,4,4, w=3,4,3,4; text 3+2=5
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 5]
    assert pos[1, 0].tolist() == [0, 1, 2, 3, 3, 4, 4, 5]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert delta.tolist() == [[5 + 1 - 8]]


def test_mismatched_grids_are_clear_errors():
    tokens = MRopeTokens(image_token_id=IMAGE, video_token_id=VIDEO)
    ids = torch.tensor([[1, IMAGE, IMAGE, 2]])
    with pytest.raises(RopeIndexError, match=r"needs 4 placeholder tokens .* has 2 left"):
        get_rope_index(ids, tokens, image_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(RopeIndexError, match=r"image_grid_thw has 0 rows"):
        get_rope_index(ids, tokens)
    with pytest.raises(RopeIndexError, match=r"has 2 rows but the batch has placeholders for 1"):
        get_rope_index(ids, tokens, image_grid_thw=torch.tensor([[1, 2, 4], [1, 2, 2]]))
