"""Image loading for Qwen2.5-VL with NVIDIA DALI: one decode feeds vLLM and the policy.

Per image (all sizes in pixels, ``H×W``)::

    file bytes ─► header check (PIL, no decode) ─► DALI decode (CPU, or nvJPEG "mixed"
    when CUDA is there) ─► bicubic resize to smart_resize(H, W) (multiples of 28,
    min/max pixels) ─┬► uint8 [H', W', 3]                      → vLLM (already at its
                     │                                          final size, so vLLM's own
                     │                                          resize is the identity)
                     └► CLIP mean/std normalise + patchify, fused, straight into
                        the batch's pixel_values [Σ H'/14 · W'/14, 3·2·14·14]
                        image_grid_thw (1, H'/14, W'/14)                 → Megatron policy

Images differ in size, so the pipeline is run directly (``Pipeline.run``) and its
outputs are read sample by sample; DALI's torch iterator, which needs one shape per
batch, is not used. Text-only requests never enter the pipeline.

Bad input never stops a run. The header check (cheap: ``PIL.Image.open`` reads only
the header) sorts each file into:

- **skipped**, counted per reason in :meth:`ImageLoader.metrics` as
  ``data/skipped_<reason>``: ``missing``, ``empty`` (zero bytes), ``unreadable`` (not
  an image PIL can identify), ``truncated`` (JPEG without an end-of-image marker after
  its last scan, PNG without IEND), ``too_large`` (over ``max_decode_pixels`` or
  ``max_file_bytes``: a 20000×20000 image is refused before any decode),
  ``too_small`` (a side below ``min_side``), ``aspect_ratio`` (over
  ``max_aspect_ratio``, 200 as in Qwen2.5-VL), ``decode_error`` (DALI could not
  decode it; found by re-running a failed batch one sample at a time so the other
  samples of the batch survive);
- **converted** by PIL instead of DALI (the loader resizes PIL's pixels directly; the
  stream's worker processes pass them to DALI as a raw PPM, whose decode is a copy): images with transparency (RGBA, LA, palette with a transparent colour) are
  composited on white — dropping alpha, as ``convert("RGB")`` does, turns transparent
  backgrounds black and hides black strokes; GIF and other animated formats use their
  first frame; palette, 1-bit and 32-bit modes are converted to RGB;
- **decoded by DALI directly**: 8-bit RGB/gray JPEG, PNG, WebP, BMP, TIFF, PNM; CMYK
  and YCCK JPEGs (libjpeg-turbo converts them, identical to PIL); 16-bit PNGs (DALI
  scales to 8 bits with rounding, where PIL's ``convert("RGB")`` clips gray at 255).

EXIF orientation is applied (DALI does it while decoding; the target size accounts for
it).

Resize backend: on GPU DALI resizes (``fn.resize``, cubic, antialiased). On CPU the
default is torch's uint8 antialiased bicubic kernel after DALI's decode: DALI's CPU
resampler measured ~9× slower than it here, and it is bit-identical to what
transformers' (fast) Qwen2-VL processor — the one vLLM runs — computes.
``resize_backend="dali"`` keeps the whole path in DALI (mean abs diff to transformers
≈ 0.003). The resize writes straight into the HWC array (no layout copy).

Normalise + patchify (one C++ call per batch into a recycled huge-page buffer) and the
target-size rule live in :mod:`.patchify`. File preparation runs in threads here; :mod:`.image_stream` moves it to
DALI's parallel external source workers when the upcoming requests are known.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sophiavl_mcore.data.config import ImageConfig
from sophiavl_mcore.data.errors import SKIP_REASONS, ImageSkip
from sophiavl_mcore.data.patchify import (
    PatchBufferPool,
    normalize_patchify_batch_cpu,
    normalize_patchify_into,
    smart_resize,
)

logger = logging.getLogger(__name__)

# Modes DALI decodes to the same RGB as PIL, per format; anything else goes through PIL.
_DALI_MODES = {
    "JPEG": {"RGB", "L", "CMYK", "YCbCr"},
    "PNG": {"RGB", "L", "I;16", "I;16B"},
    "WEBP": {"RGB", "L"},
    "BMP": {"RGB", "L"},
    "TIFF": {"RGB", "L"},
    "PPM": {"RGB", "L"},
}


# ------------------------------------------------------------------ header check


@dataclasses.dataclass
class PreparedImage:
    """Bytes ready for DALI (or pixels PIL already decoded) and the target size."""

    data: np.ndarray  # uint8 [n], the encoded file; empty when ``rgb`` is set
    height: int  # after EXIF orientation
    width: int
    target: tuple[int, int]  # (H', W') from smart_resize
    converted: str = ""  # why PIL converted it ("" = DALI decodes the original)
    rgb: np.ndarray | None = None  # uint8 [H, W, 3] when PIL converted it

    def encoded(self) -> np.ndarray:
        """Bytes DALI can decode: the file, or a raw PPM of PIL's pixels (decoding it is
        a copy); used where the pixels must travel through a DALI pipeline."""
        return self.data if self.rgb is None else _ppm(self.rgb)


def _read(path: str, cfg: ImageConfig) -> bytes:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError as err:
        raise ImageSkip("missing", f"{path}: file not found") from err
    except OSError as err:
        raise ImageSkip("missing", f"{path}: cannot stat ({err})") from err
    if size == 0:
        raise ImageSkip("empty", f"{path}: file is empty")
    if size > cfg.max_file_bytes:
        raise ImageSkip("too_large", f"{path}: {size} bytes > max_file_bytes={cfg.max_file_bytes}")
    with open(path, "rb") as f:
        return f.read()


def _truncated(fmt: str, data: bytes) -> bool:
    if fmt == "JPEG":
        return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")
    if fmt == "PNG":
        return b"IEND" not in data[-64:]
    return False


def _convert_with_pil(img: Image.Image) -> tuple[np.ndarray, str]:
    """First frame, EXIF-oriented, transparency composited on white → ``[H, W, 3]`` uint8."""
    img.seek(0)
    img = ImageOps.exif_transpose(img)
    why = img.format or "pil"
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
        why = "alpha"
    elif img.mode in ("I", "I;16", "I;16B", "F"):
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8))
    rgb = np.asarray(img.convert("RGB"))
    # read-only when numpy wraps PIL's bytes; torch (the resize) wants writable memory
    return (rgb if rgb.flags.writeable else rgb.copy()), why


def _ppm(rgb: np.ndarray) -> np.ndarray:
    h, w, _ = rgb.shape
    header = np.frombuffer(f"P6\n{w} {h}\n255\n".encode(), np.uint8)
    return np.concatenate([header, np.ascontiguousarray(rgb).reshape(-1)])


def prepare_image(path: str, cfg: ImageConfig) -> PreparedImage:
    """Read ``path`` once, check its header, decide DALI vs PIL conversion, size it.

    Raises :class:`ImageSkip` for a file that must be skipped.
    """
    data = _read(path, cfg)
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageSkip("too_large", f"{path}: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageSkip("unreadable", f"{path}: not a readable image ({err})") from err
    w, h = img.size
    if w * h > cfg.max_decode_pixels:
        raise ImageSkip("too_large", f"{path}: {w}x{h} = {w * h} pixels > max_decode_pixels={cfg.max_decode_pixels}")
    if min(w, h) < cfg.min_side:
        raise ImageSkip("too_small", f"{path}: {w}x{h} has a side below min_side={cfg.min_side}")
    fmt = img.format or ""
    if _truncated(fmt, data):
        raise ImageSkip("truncated", f"{path}: {fmt} data ends early ({len(data)} bytes)")
    orientation = img.getexif().get(0x0112, 1) if fmt in ("JPEG", "TIFF", "WEBP", "PNG") else 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    target = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels, cfg.max_aspect_ratio)
    native = img.mode in _DALI_MODES.get(fmt, ()) and getattr(img, "n_frames", 1) == 1
    if native and not (fmt == "PNG" and "transparency" in img.info):
        return PreparedImage(np.frombuffer(data, np.uint8), h, w, target)
    try:
        rgb, why = _convert_with_pil(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageSkip("decode_error", f"{path}: PIL could not decode it ({err})") from err
    return PreparedImage(np.empty(0, np.uint8), rgb.shape[0], rgb.shape[1], target,
                         converted=why, rgb=rgb)


# ------------------------------------------------------------------ result


@dataclasses.dataclass
class ImageBatch:
    """Images of one list of requests, in both forms, decoded once.

    - ``images[i]``: uint8 ``[H', W', 3]`` resized image for request ``i`` (vLLM input),
      None for a text-only request or a skipped image;
    - ``pixel_values``: float32 ``[Σ patches, 3·T·p·p]`` of the loaded images in request
      order (Megatron policy input); ``image_grid_thw``: int64 ``[n_loaded, 3]``;
    - ``image_index[i]``: the row of request ``i`` in ``image_grid_thw`` (None if none);
    - ``skipped[i]``: the reason request ``i``'s image was skipped.
    """

    images: list[np.ndarray | None]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    image_index: list[int | None]
    skipped: dict[int, str]

    def patch_slice(self, i: int) -> slice:
        """Rows of ``pixel_values`` that belong to request ``i`` (empty if it has none)."""
        row = self.image_index[i]
        if row is None:
            return slice(0, 0)
        sizes = self.image_grid_thw.prod(dim=1)
        start = int(sizes[:row].sum())
        return slice(start, start + int(sizes[row]))

    def vllm_image(self, i: int) -> Image.Image | None:
        """Request ``i``'s image as vLLM's ``multi_modal_data={"image": ...}`` takes it."""
        img = self.images[i]
        return None if img is None else Image.fromarray(img)


# ------------------------------------------------------------------ DALI


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _build_pipeline(cfg: ImageConfig, gpu: bool, dali_resize: bool) -> Any:
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(
        batch_size=cfg.batch_size, num_threads=cfg.num_threads,
        device_id=torch.cuda.current_device() if gpu else None,
        prefetch_queue_depth=1, exec_dynamic=True,
    )
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if dali_resize:
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            # minibatch_size=1 spreads the samples of a batch over the threads.
            image = fn.resize(
                image, size=size, interp_type=types.INTERP_CUBIC, antialias=True,
                minibatch_size=1 if not gpu else 32,
            )
        pipe.set_outputs(image)
    pipe.build()
    return pipe


def resize_uint8(image: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """Antialiased bicubic resize of uint8 ``[H, W, 3]`` to ``target`` = (H', W') with
    torch's uint8 kernel (bit-identical to torchvision's, which transformers' fast
    Qwen2-VL processor calls). Returns a new contiguous uint8 ``[H', W', 3]``."""
    if tuple(image.shape[:2]) == tuple(target):
        return np.array(image)  # a copy: ``image`` may be a view of DALI's buffer
    chw = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)  # a view, channels-last
    # interpolate() would return NCHW and need an HWC copy (half the resize time);
    # the out= form writes straight into an HWC array.
    hwc = torch.empty(1, target[0], target[1], 3, dtype=torch.uint8)
    out = hwc.permute(0, 3, 1, 2)
    try:
        torch.ops.aten._upsample_bicubic2d_aa.out(chw, list(target), False, None, None, out=out)
    except (RuntimeError, AttributeError):  # private op changed: the public route
        out = torch.nn.functional.interpolate(chw, size=target, mode="bicubic", antialias=True)
    if out.data_ptr() != hwc.data_ptr():  # the op reallocated instead of writing in place
        return out[0].permute(1, 2, 0).contiguous().numpy()
    return hwc[0].numpy()


class ImageLoader:
    """Turns image paths into an :class:`ImageBatch` with one DALI pipeline.

    ``load(paths)``: ``paths[i]`` is a file path or None (text-only request). Never
    raises for a bad image: it is skipped, logged and counted (see :meth:`metrics`).
    """

    def __init__(self, cfg: ImageConfig | None = None) -> None:
        self.cfg = cfg or ImageConfig()
        want_gpu = self.cfg.device == "gpu" or (self.cfg.device == "auto" and cuda_available())
        if self.cfg.device == "gpu" and not cuda_available():
            raise ValueError("images.device is 'gpu' but CUDA is not available")
        self.gpu = want_gpu
        backend = self.cfg.resize_backend
        self.dali_resize = backend == "dali" or (backend == "auto" and self.gpu)
        self._pipe = _build_pipeline(self.cfg, self.gpu, self.dali_resize)
        self._pool = ThreadPoolExecutor(self.cfg.prepare_workers, thread_name_prefix="img-prepare")
        self.skip_counts: Counter[str] = Counter()
        self.converted_counts: Counter[str] = Counter()
        self.loaded = 0
        # Cumulative wall seconds per stage: prepare (read + header check), decode (DALI
        # run; includes the resize when DALI resizes), resize (torch), patchify.
        self.stage_seconds: Counter[str] = Counter()
        self.buffers = PatchBufferPool(self.cfg.reuse_buffers)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def metrics(self) -> dict[str, float]:
        """Cumulative counters: ``data/images_loaded``, ``data/skipped_<reason>`` (every
        reason, zeros included), ``data/converted_<kind>``."""
        out = {"data/images_loaded": float(self.loaded)}
        out.update({f"data/skipped_{r}": float(self.skip_counts[r]) for r in SKIP_REASONS})
        out.update({f"data/converted_{k}": float(v) for k, v in self.converted_counts.items()})
        return out

    def _prepare(self, path: str) -> PreparedImage | ImageSkip:
        try:
            return prepare_image(path, self.cfg)
        except ImageSkip as skip:
            return skip
        except Exception as err:  # a reader bug must not stop the run either
            return ImageSkip("unreadable", f"{path}: {type(err).__name__}: {err}")

    def _run(self, items: Sequence[PreparedImage]) -> list[np.ndarray]:
        self._pipe.feed_input("encoded", [it.encoded() for it in items])
        if self.dali_resize:
            self._pipe.feed_input("size", [np.array(it.target, np.float32) for it in items])
        t0 = time.perf_counter()
        (images,) = self._pipe.run()
        if self.gpu:
            images = images.as_cpu()
        t1 = time.perf_counter()
        self.stage_seconds["decode"] += t1 - t0
        if self.dali_resize:
            # Copy now: DALI reuses its output buffers on the next run.
            return [np.array(images[i]) for i in range(len(items))]
        out = [resize_uint8(np.asarray(images[i]), it.target) for i, it in enumerate(items)]
        self.stage_seconds["resize"] += time.perf_counter() - t1
        return out

    def _decode(self, items: Sequence[PreparedImage]) -> list[np.ndarray | str]:
        """Resized uint8 ``[H', W', 3]`` per item, or an error message for an item DALI
        cannot decode."""
        if not self.dali_resize and any(it.rgb is not None for it in items):
            # PIL already decoded these: resize them here, no PPM round trip through DALI.
            out: list[np.ndarray | str | None] = [None] * len(items)
            rest = [k for k, it in enumerate(items) if it.rgb is None]
            for k, res in zip(rest, self._decode([items[k] for k in rest]) if rest else [], strict=True):
                out[k] = res
            for k, it in enumerate(items):
                if it.rgb is not None:
                    same = tuple(it.rgb.shape[:2]) == it.target
                    out[k] = np.ascontiguousarray(it.rgb) if same else resize_uint8(it.rgb, it.target)
            return out  # type: ignore[return-value]  # every slot is filled above
        try:
            return self._run(items)
        except Exception as err:
            if len(items) == 1:
                return [" ".join(str(err).split())[:300] or repr(err)]
        found: list[np.ndarray | str] = []
        for it in items:  # find the bad one(s) without losing the rest
            found.extend(self._decode([it]))
        return found

    def load(self, paths: Sequence[str | None]) -> ImageBatch:
        """Decode, resize and patchify the images of ``paths`` (None = no image)."""
        n = len(paths)
        todo = [(i, p) for i, p in enumerate(paths) if p is not None]
        t0 = time.perf_counter()
        prepared = list(self._pool.map(self._prepare, [p for _, p in todo]))
        self.stage_seconds["prepare"] += time.perf_counter() - t0
        skipped: dict[int, str] = {}
        good: list[tuple[int, PreparedImage]] = []
        for (i, _path), res in zip(todo, prepared, strict=True):
            if isinstance(res, ImageSkip):
                self._skip(skipped, i, res.reason, str(res))
            else:
                good.append((i, res))
        images: list[np.ndarray | None] = [None] * n
        for start in range(0, len(good), self.cfg.batch_size):
            chunk = good[start : start + self.cfg.batch_size]
            for (i, item), out in zip(chunk, self._decode([it for _, it in chunk]), strict=True):
                if isinstance(out, str):
                    self._skip(skipped, i, "decode_error", f"{paths[i]}: {out}")
                    continue
                rgb = out
                if tuple(rgb.shape[:2]) != item.target:
                    self._skip(skipped, i, "decode_error", f"{paths[i]}: decoded to {rgb.shape}, expected {item.target}")
                    continue
                images[i] = rgb
                if item.converted:
                    self.converted_counts[item.converted] += 1
        return self._assemble(images, skipped)

    def _skip(self, skipped: dict[int, str], i: int, reason: str, message: str) -> None:
        skipped[i] = reason
        self.skip_counts[reason] += 1
        logger.warning("skipping image (%s): %s", reason, message)

    def _assemble(self, images: list[np.ndarray | None], skipped: dict[int, str]) -> ImageBatch:
        p, t = self.cfg.patch_size, self.cfg.temporal_patch_size
        index: list[int | None] = [None] * len(images)
        grids = []
        for i, img in enumerate(images):
            if img is not None:
                index[i] = len(grids)
                grids.append((1, img.shape[0] // p, img.shape[1] // p))
        counts = [gh * gw for _, gh, gw in grids]
        t0 = time.perf_counter()
        # One allocation for the whole batch; each image writes its rows in place.
        if self.gpu:
            device = torch.device("cuda", torch.cuda.current_device())
            pixel_values = torch.empty(sum(counts), 3 * t * p * p, dtype=torch.float32, device=device)
        else:
            pixel_values = self.buffers.take(sum(counts), 3 * t * p * p)
        loaded = [im for im in images if im is not None]
        if self.gpu:  # normalise on the device: uint8 crosses the bus, not float32
            start = 0
            for img, count in zip(loaded, counts, strict=True):
                normalize_patchify_into(torch.from_numpy(img), pixel_values[start : start + count], self.cfg)
                start += count
        elif loaded:
            normalize_patchify_batch_cpu(loaded, pixel_values.numpy(), self.cfg)
        self.stage_seconds["patchify"] += time.perf_counter() - t0
        grid = torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)
        self.loaded += len(grids)
        return ImageBatch(images, pixel_values, grid, index, skipped)
