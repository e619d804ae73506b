"""Qwen2.5-VL geometry and pixel layout: the target size of an image (:func:`smart_resize`)
and CLIP normalise + patchify into the policy's ``pixel_values``.

Normalise + patchify on CPU is one C++ call per batch (``_C.normalize_patchify_batch``:
one pass over the pixels, a lookup table per channel, the temporal copy stored from the
values just computed, OpenMP, GIL released) into one ``pixel_values`` buffer allocated
from the grids; :func:`normalize_patchify_into` (torch) is its reference and the GPU
path. That buffer comes from a :class:`PatchBufferPool`: huge-page mappings recycled once
a batch is dropped, because first-touch page faults on hundreds of MB cost more than
the normalisation (see bench/bench_images.py). :mod:`.images` (the DALI loader) calls
these.
"""

from __future__ import annotations

import math
import mmap
import sys

import numpy as np
import torch

from sophiavl_mcore import _C
from sophiavl_mcore.data.config import ImageConfig
from sophiavl_mcore.data.errors import ImageSkip


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280, max_aspect_ratio: float = 200.0,
) -> tuple[int, int]:
    """Qwen2.5-VL target size: both sides multiples of ``factor``, area in
    ``[min_pixels, max_pixels]``, aspect ratio kept as well as rounding allows.

    Raises :class:`ImageSkip` ("aspect_ratio") beyond ``max_aspect_ratio``.
    """
    if max(height, width) > max_aspect_ratio * min(height, width):
        raise ImageSkip(
            "aspect_ratio",
            f"aspect ratio {max(height, width) / min(height, width):.1f} of {height}x{width} "
            f"exceeds {max_aspect_ratio}",
        )
    # round() (half to even) as Python's does, so sizes match the reference processor.
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(image: np.ndarray | torch.Tensor, cfg: ImageConfig) -> np.ndarray | torch.Tensor:
    """``[3, H, W]`` normalised image → ``[H/p · W/p, 3·T·p·p]`` patches (p = patch_size,
    T = temporal_patch_size; a still image is repeated T times), in Qwen2-VL's order:
    merge windows row-major, the ``merge×merge`` patches of a window consecutive.
    """
    c, h, w = image.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = _grid(h, w, cfg)
    x = image.reshape(c, gh // m, m, p, gw // m, m, p)
    if isinstance(x, np.ndarray):
        x = x.transpose(1, 4, 2, 5, 0, 3, 6)[:, :, :, :, :, None]
        x = np.broadcast_to(x, x.shape[:5] + (t,) + x.shape[6:])
        return np.ascontiguousarray(x).reshape(gh * gw, c * t * p * p)
    x = x.permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(5)
    return x.expand(*x.shape[:5], t, p, p).reshape(gh * gw, c * t * p * p)


def _grid(h: int, w: int, cfg: ImageConfig) -> tuple[int, int]:
    p, m = cfg.patch_size, cfg.merge_size
    if h % (p * m) or w % (p * m):
        raise ValueError(f"image {h}x{w} is not a multiple of patch {p} × merge {m}")
    return h // p, w // p


def normalize_patchify_into(rgb: torch.Tensor, out: torch.Tensor, cfg: ImageConfig) -> None:
    """uint8 ``[H, W, 3]`` → ``out`` float ``[H/p · W/p, 3·T·p·p]``: CLIP-normalised
    patches, the same values and order as :func:`patchify` of the normalised CHW image.

    Normalising the HWC image first keeps that pass contiguous; the one strided pass is
    the final copy, which also does the temporal repeat (memory-bound, threads via torch).
    """
    h, w, _ = rgb.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = _grid(h, w, cfg)
    scale = torch.tensor([1.0 / (255.0 * s) for s in cfg.image_std], dtype=out.dtype, device=out.device)
    bias = torch.tensor([-mu / s for mu, s in zip(cfg.image_mean, cfg.image_std, strict=True)],
                        dtype=out.dtype, device=out.device)
    xf = rgb.to(device=out.device, dtype=out.dtype).mul_(scale).add_(bias)
    x = xf.view(gh // m, m, p, gw // m, m, p, 3).permute(0, 3, 1, 4, 6, 2, 5).unsqueeze(5)
    out.view(gh // m, gw // m, m, m, 3, t, p, p).copy_(x.expand(-1, -1, -1, -1, -1, t, -1, -1))


def normalize_patchify_cpu(rgb: np.ndarray, out: np.ndarray | None, cfg: ImageConfig) -> np.ndarray:
    """C++ twin of :func:`normalize_patchify_into` (``_C.normalize_patchify``): uint8
    ``[H, W, 3]`` (C-contiguous) → float32 ``[H/p · W/p, 3·T·p·p]``, written into ``out``
    when given, in one pass over the pixels (OpenMP threads, GIL released). Returns it."""
    return _C.normalize_patchify(
        rgb, cfg.image_mean, cfg.image_std, cfg.patch_size, cfg.temporal_patch_size,
        cfg.merge_size, out,
    )


def normalize_patchify_batch_cpu(
    images: list[np.ndarray], out: np.ndarray | None, cfg: ImageConfig,
) -> np.ndarray:
    """:func:`normalize_patchify_cpu` of every image, their rows one after the other in
    ``out`` float32 ``[Σ H/p · W/p, 3·T·p·p]``; one parallel loop over all of them."""
    return _C.normalize_patchify_batch(
        images, cfg.image_mean, cfg.image_std, cfg.patch_size, cfg.temporal_patch_size,
        cfg.merge_size, out,
    )


def _huge_page_mapping(nbytes: int) -> mmap.mmap:
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP disabled or unsupported: ordinary pages still work
            pass
    return buf


class PatchBufferPool:
    """CPU memory for the batches' ``pixel_values``, recycled once a batch is dropped.

    A batch's patches are hundreds of MB written once. Fresh memory costs a page fault
    per page on first touch, with the kernel zeroing each page: on a 700 MB batch that
    measured 0.3–1.5 s here against ~0.05 s for writing memory already mapped, i.e. more
    than the normalisation itself. So buffers are anonymous mappings advised for
    transparent huge pages (512× fewer faults), sized with headroom (untouched pages
    cost no memory), and reused: a buffer is free again when no tensor views it any
    more, which its reference count tells (``torch.frombuffer`` holds a reference to
    the mapping for as long as any view of the storage lives).

    ``max_buffers`` bounds how many mappings the pool remembers; 0 disables reuse
    (a fresh huge-page mapping per batch).
    """

    _HEADROOM = 1.5
    _ALIGN = 2 << 20  # one huge page

    def __init__(self, max_buffers: int = 2) -> None:
        self.max_buffers = max_buffers
        self._buffers: list[mmap.mmap] = []
        self.reused = 0
        self.allocated = 0
        # What getrefcount reports for a mapping only the pool's list holds (measured, as
        # interpreters differ in whether the call's own argument counts).
        self._unused_refs = self._refs([mmap.mmap(-1, 1)], 0)

    @staticmethod
    def _refs(buffers: list[mmap.mmap], i: int) -> int:
        return sys.getrefcount(buffers[i])

    def _free(self) -> list[mmap.mmap]:
        """Remembered buffers no tensor views now (oldest first)."""
        return [self._buffers[i] for i in range(len(self._buffers))
                if self._refs(self._buffers, i) <= self._unused_refs]

    def take(self, rows: int, cols: int) -> torch.Tensor:
        """Uninitialised float32 ``[rows, cols]`` tensor (CPU)."""
        nbytes = rows * cols * 4
        if nbytes == 0:
            return torch.empty(rows, cols, dtype=torch.float32)
        fits = [b for b in self._free() if len(b) >= nbytes]
        if fits:
            buf = min(fits, key=len)
            self.reused += 1
        else:
            headroom = self._HEADROOM if self.max_buffers else 1.0
            buf = _huge_page_mapping(-(-int(nbytes * headroom) // self._ALIGN) * self._ALIGN)
            self.allocated += 1
            if self.max_buffers:
                self._remember(buf)
        return torch.frombuffer(buf, dtype=torch.float32, count=rows * cols).view(rows, cols)

    def _remember(self, buf: mmap.mmap) -> None:
        free = self._free()  # before ``buf`` joins: it is about to be used
        self._buffers.append(buf)
        while len(self._buffers) > self.max_buffers:
            # Forget a free (smallest) buffer first, else the oldest one in use: its
            # tensors keep it alive and it is unmapped when they go.
            victim = min(free, key=len) if free else self._buffers[0]
            if free:
                free.remove(victim)
            self._buffers.remove(victim)
