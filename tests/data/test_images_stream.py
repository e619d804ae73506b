"""Parallel external source (DALI worker processes): same batches as the direct loader."""

from __future__ import annotations

import pytest
import torch

from sophiavl_mcore.data.config import ImageConfig
from sophiavl_mcore.data.image_stream import ImageStream
from sophiavl_mcore.data.images import ImageLoader
from sophiavl_mcore.data.synthetic import encode, natural_image, write_jpegs

pytestmark = pytest.mark.timeout(300)


def test_stream_equals_loader_and_survives_bad_files(tmp_path):
    import numpy as np

    good = [str(p) for p in write_jpegs(tmp_path, [(200, 300), (90, 400), (512, 256), (64, 64),
                                                   (300, 300), (120, 80)], seed=5)]
    img = encode(natural_image(64, 80, np.random.default_rng(0)), "JPEG")
    broken = bytearray(img)
    i = img.find(b"\xff\xc4")
    broken[i + 5 : i + 21] = b"\xff" * 16  # only the decoder notices
    (tmp_path / "huff.jpg").write_bytes(bytes(broken))
    (tmp_path / "zero.jpg").write_bytes(b"")
    requests = [
        [good[0], None, good[1]],
        [None, None],  # text-only step: no pipeline run
        [good[2], str(tmp_path / "zero.jpg"), str(tmp_path / "missing.jpg"), good[3]],
        [str(tmp_path / "huff.jpg"), good[4]],  # DALI fails: the step is redone per sample
        [good[5]],
    ]
    for backend in ("torch", "dali"):
        cfg = ImageConfig(device="cpu", resize_backend=backend)
        ld = ImageLoader(cfg)
        got = list(ImageStream(ld, requests, py_num_workers=2, prefetch=2))
        want = [ImageLoader(cfg).load(r) for r in requests]
        assert len(got) == len(requests)
        for a, b in zip(got, want, strict=True):
            assert a.image_index == b.image_index and a.skipped == b.skipped
            assert torch.equal(a.image_grid_thw, b.image_grid_thw)
            assert torch.equal(a.pixel_values, b.pixel_values)
        assert got[2].skipped == {1: "empty", 2: "missing"}
        assert got[3].skipped == {0: "decode_error"} and got[3].images[1] is not None
        m = ld.metrics()
        assert (m["data/skipped_empty"], m["data/skipped_missing"], m["data/skipped_decode_error"]) == (1, 1, 1)
        assert m["data/images_loaded"] == 6
