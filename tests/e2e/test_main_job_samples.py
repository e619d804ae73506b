"""The main job writes sample rollouts to TensorBoard every ``train.log_samples_every``
steps: the first group's responses as text and the first prompt's image."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_sample_text_and_images_in_tensorboard(main_job) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sophiavl_mcore.config import load_config
    from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig
    from tests.e2e.conftest import RECIPE

    cfg = load_config(RECIPE, cls=GRPOTrainConfig)
    every, total = cfg.train.log_samples_every, len(main_job["steps"])
    assert every > 0, "the tiny recipe should log samples"
    expected_steps = list(range(every, total + 1, every))
    acc = EventAccumulator(str(main_job["out"] / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    images = acc.Images("rollout/sample_image")
    assert [e.step for e in images] == expected_steps
    side = cfg.task.image_size
    assert (images[0].width, images[0].height) == (side, side)
    assert images[0].encoded_image_string.startswith(b"\x89PNG")
    texts = acc.Tensors("rollout/samples/text_summary")
    assert [e.step for e in texts] == expected_steps
    body = texts[-1].tensor_proto.string_val[0].decode()
    assert "gold" in body and "R^o=" in body
