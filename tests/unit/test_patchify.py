"""_C.normalize_patchify(_batch) against the Python references in data/images.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sophiavl_mcore import _C
from sophiavl_mcore.data.config import ImageConfig
from sophiavl_mcore.data.patchify import (
    PatchBufferPool,
    normalize_patchify_batch_cpu,
    normalize_patchify_cpu,
    normalize_patchify_into,
    patchify,
)


def reference(rgb: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """Normalise in float64 then patchify with the numpy reference (independent of the
    torch path and of the kernel's lookup table)."""
    mean, std = np.array(cfg.image_mean), np.array(cfg.image_std)
    chw = ((rgb / 255.0 - mean) / std).transpose(2, 0, 1)
    return patchify(chw, cfg).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(
    patch=st.sampled_from([2, 3, 4, 14]),
    merge=st.integers(1, 3),
    temporal=st.integers(1, 3),
    gh=st.integers(1, 5),
    gw=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_equals_references(patch, merge, temporal, gh, gw, seed):
    cfg = ImageConfig(patch_size=patch, merge_size=merge, temporal_patch_size=temporal,
                      min_pixels=(patch * merge) ** 2, max_pixels=max((patch * merge) ** 2, 56 * 56))
    f = patch * merge
    rgb = np.random.default_rng(seed).integers(0, 256, (gh * f, gw * f, 3), dtype=np.uint8)
    got = normalize_patchify_cpu(rgb, None, cfg)
    assert got.shape == (gh * merge * gw * merge, 3 * temporal * patch * patch)
    np.testing.assert_allclose(got, reference(rgb, cfg), rtol=0, atol=1e-6)
    # the torch path the loader uses on GPU: same float32 roundings, so equal
    torch_out = torch.empty(got.shape)
    normalize_patchify_into(torch.from_numpy(rgb), torch_out, cfg)
    assert np.abs(torch_out.numpy() - got).max() <= 1e-6


def test_every_value_lands_in_qwen2vl_order():
    """Pixel values that encode their own position land where transformers' layout puts
    them: row = window-major patch index, column = (channel, t, y, x)."""
    p, m, t = 14, 2, 2
    cfg = ImageConfig()
    h, w = 2 * p * m, 3 * p * m
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    # three bytes that identify (y, x, c) up to the mod-256 wrap, checked exactly below
    rgb = np.stack([yy % 256, xx % 256, (yy * 7 + xx) % 256], axis=-1).astype(np.uint8)
    got = normalize_patchify_cpu(rgb, None, cfg)
    mean, std = np.array(cfg.image_mean), np.array(cfg.image_std)
    gw = w // p
    rng = np.random.default_rng(0)
    for _ in range(300):
        y, x, c, tt = rng.integers(h), rng.integers(w), rng.integers(3), rng.integers(t)
        r, col = y // p, x // p
        row = ((r // m) * (gw // m) + col // m) * m * m + (r % m) * m + col % m
        column = ((c * t + tt) * p + y % p) * p + x % p
        want = (rgb[y, x, c] / 255.0 - mean[c]) / std[c]
        assert abs(got[row, column] - want) <= 1e-6, (y, x, c, tt)


def test_batch_kernel_writes_images_back_to_back_into_out():
    cfg = ImageConfig()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(56, 84), (28, 28), (112, 56)]]
    rows = sum(h * w // 196 for h, w, _ in (im.shape for im in images))
    out = np.full((rows, 1176), np.nan, np.float32)
    assert normalize_patchify_batch_cpu(images, out, cfg) is not None
    want = np.concatenate([reference(im, cfg) for im in images])
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)
    # an unaligned (non-16-byte) destination takes the memcpy path: same values
    raw = np.empty(rows * 1176 * 4 + 4, np.uint8)
    unaligned = raw[4:].view(np.float32).reshape(rows, 1176)
    normalize_patchify_batch_cpu(images, unaligned, cfg)
    np.testing.assert_array_equal(unaligned, out)
    assert normalize_patchify_batch_cpu([], None, cfg).shape == (0, 1176)


def test_bad_inputs_fail_with_clear_errors():
    cfg = ImageConfig()
    ok = np.zeros((28, 56, 3), np.uint8)
    with pytest.raises(ValueError, match=r"image 30x56 is not a multiple of patch 14 × merge 2 = 28"):
        normalize_patchify_cpu(np.zeros((30, 56, 3), np.uint8), None, cfg)
    with pytest.raises(ValueError, match=r"images\[1\] 28x42 is not a multiple"):
        normalize_patchify_batch_cpu([ok, np.zeros((28, 42, 3), np.uint8)], None, cfg)
    with pytest.raises(ValueError, match=r"shape \[H, W, 3\], got \[28, 56, 4\]"):
        normalize_patchify_cpu(np.zeros((28, 56, 4), np.uint8), None, cfg)
    with pytest.raises(ValueError, match="dtype uint8, got float32"):
        normalize_patchify_cpu(np.zeros((28, 56, 3), np.float32), None, cfg)
    with pytest.raises(ValueError, match="C-contiguous"):
        normalize_patchify_cpu(np.zeros((56, 28, 3), np.uint8).transpose(1, 0, 2), None, cfg)
    with pytest.raises(ValueError, match=r"out must have shape \[8, 1176\] for a 28x56 image, got \[8, 1175\]"):
        normalize_patchify_cpu(ok, np.zeros((8, 1175), np.float32), cfg)
    with pytest.raises(ValueError, match="out must have dtype float32, got float64"):
        normalize_patchify_cpu(ok, np.zeros((8, 1176)), cfg)
    with pytest.raises(ValueError, match=r"images\[0\] must be a numpy array, got <class 'list'>"):
        normalize_patchify_batch_cpu([[1, 2, 3]], None, cfg)
    with pytest.raises(ValueError, match=r"std\[1\]=0.*std finite and > 0"):
        _C.normalize_patchify(ok, (0.5, 0.5, 0.5), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="merge must be >= 1, got 0"):
        _C.normalize_patchify(ok, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0), 14, 2, 0)


def test_buffer_pool_reuses_only_dropped_buffers():
    pool = PatchBufferPool(max_buffers=2)
    a = pool.take(100, 1176)
    a_ptr = a.data_ptr()
    view = a[10:20]
    del a
    b = pool.take(100, 1176)  # a slice of the first still lives: a new buffer
    assert b.data_ptr() != a_ptr and (pool.allocated, pool.reused) == (2, 0)
    del view
    c = pool.take(120, 1176)  # fits in the first one's headroom, now free
    assert c.data_ptr() == a_ptr and pool.reused == 1
    assert b.data_ptr() != c.data_ptr()
    del b, c
    big = pool.take(5000, 1176)  # larger than both: a third mapping, pool keeps 2
    assert pool.allocated == 3 and len(pool._buffers) == 2
    assert big.shape == (5000, 1176) and pool.take(0, 1176).shape == (0, 1176)
    fresh = PatchBufferPool(max_buffers=0)
    x = fresh.take(10, 1176)
    del x
    fresh.take(10, 1176)
    assert (fresh.allocated, fresh.reused) == (2, 0)
