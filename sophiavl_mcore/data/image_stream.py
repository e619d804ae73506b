"""Prefetching image batches with DALI's parallel external source.

:class:`ImageLoader` answers one request list at a time, preparing files (read +
header check + PIL conversions) in threads of the calling process. When the upcoming
requests are known ahead — the sampler's order is a pure function of its state, so the
next steps' records are — :class:`ImageStream` moves that preparation into DALI's Python
worker processes (``parallel=True``, ``py_num_workers``): each worker prepares a whole
step's batch while the pipeline decodes earlier ones, ``prefetch`` steps ahead.

A worker cannot drop a sample from the batch it returns, so a file that fails the
header check is replaced by a 28×28 placeholder (decoded, then discarded) and its skip
reason travels in a third output; only bad files pay for that decode. A step whose DALI
run fails is redone by the loader's per-sample path, so its good samples survive.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from sophiavl_mcore.data.config import ImageConfig
from sophiavl_mcore.data.errors import SKIP_REASONS, ImageSkip
from sophiavl_mcore.data.images import ImageBatch, ImageLoader, _ppm, prepare_image, resize_uint8

logger = logging.getLogger(__name__)

_PLACEHOLDER = _ppm(np.zeros((28, 28, 3), np.uint8))


class _BatchSource:
    """Picklable source: batch ``k`` of ``batches`` → (encoded, size, skip code) lists."""

    def __init__(self, batches: list[list[str]], cfg: ImageConfig) -> None:
        self.batches = batches
        self.cfg = cfg

    def __call__(self, info: Any) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        if info.iteration >= len(self.batches):
            raise StopIteration
        data, sizes, codes, messages = [], [], [], []
        for path in self.batches[info.iteration]:
            try:
                item = prepare_image(path, self.cfg)
                data.append(item.encoded())
                sizes.append(np.array(item.target, np.float32))
                codes.append(np.array([0, len(item.converted)], np.int32))
                messages.append(item.converted)
            except Exception as err:  # ImageSkip, or a reader bug: never kill the worker
                reason = err.reason if isinstance(err, ImageSkip) else "unreadable"
                data.append(_PLACEHOLDER)
                sizes.append(np.array([28, 28], np.float32))
                codes.append(np.array([1 + SKIP_REASONS.index(reason), 0], np.int32))
                messages.append(str(err))
        # The text (conversion kind or error) travels as bytes appended to the code.
        codes = [np.concatenate([c, np.frombuffer(m.encode()[:400], np.uint8).astype(np.int32)])
                 for c, m in zip(codes, messages, strict=True)]
        return data, sizes, codes


class ImageStream:
    """Yields one :class:`ImageBatch` per entry of ``requests`` (a list of path lists,
    None = text-only), preparing files in ``py_num_workers`` worker processes.

    ``loader`` supplies the configuration, the counters (``loader.metrics()``) and the
    fallback path; it must be a CPU loader (the stream is a CPU-side feature).

    ``start_method`` is ``"spawn"``: the workers are fresh interpreters that unpickle
    :class:`_BatchSource` (a module-level class) and import this module, once per stream.
    ``"fork"`` (DALI's default) copies the calling process as it is at ``build()``: its
    threads are gone in the child but their locks and objects are not. Seen with fork
    (tests/unit, then tests/data/test_images_stream.py, in one pytest process; 1 run in
    3): a worker's first allocation ran the cyclic garbage collector, which finalised a
    dead ``Pipeline`` inherited from the parent (an earlier test's or loader's);
    ``Pipeline.__del__`` shut down a C++ executor whose threads did not exist in the
    child, and the worker died of a segmentation fault. Whether there is such garbage at
    fork time depends on what the process ran before, hence the flakiness; a spawned
    worker inherits none of it (nor the torch / OpenMP / DALI thread state).
    """

    def __init__(
        self, loader: ImageLoader, requests: Sequence[Sequence[str | None]],
        py_num_workers: int = 2, prefetch: int = 2, start_method: str = "spawn",
    ) -> None:
        self.loader = loader
        self.requests = [list(r) for r in requests]
        self._image_lists = [[p for p in r if p is not None] for r in self.requests]
        batches = [b for b in self._image_lists if b]
        self._pipe = None
        if batches:
            self._pipe = self._build(batches, py_num_workers, prefetch, start_method)

    def _build(self, batches: list[list[str]], workers: int, prefetch: int, method: str) -> Any:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        cfg = self.loader.cfg
        pipe = Pipeline(
            batch_size=max(len(b) for b in batches), num_threads=cfg.num_threads, device_id=None,
            py_num_workers=workers, py_start_method=method, prefetch_queue_depth=prefetch,
        )
        with pipe:
            encoded, size, code = fn.external_source(
                source=_BatchSource(batches, cfg), num_outputs=3, parallel=True, batch=True,
                batch_info=True, dtype=[types.UINT8, types.FLOAT, types.INT32],
            )
            image = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
            if self.loader.dali_resize:
                image = fn.resize(image, size=size, interp_type=types.INTERP_CUBIC, antialias=True,
                                  minibatch_size=1)
            pipe.set_outputs(image, size, code)
        pipe.build()
        return pipe

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[ImageBatch]:
        for paths, images_only in zip(self.requests, self._image_lists, strict=True):
            if not images_only:
                yield self.loader.load(paths)  # text-only: no pipeline run at all
                continue
            try:
                outputs = self._pipe.run()
            except StopIteration:
                return
            except Exception as err:
                logger.warning("DALI failed on a prefetched batch (%s); redoing it per sample",
                               " ".join(str(err).split())[:200])
                yield self.loader.load(paths)
                continue
            yield self._collect(paths, outputs)

    def _collect(self, paths: list[str | None], outputs: Any) -> ImageBatch:
        image_out, size_out, code_out = outputs
        ld = self.loader
        images: list[np.ndarray | None] = [None] * len(paths)
        skipped: dict[int, str] = {}
        k = 0
        for i, path in enumerate(paths):
            if path is None:
                continue
            code = np.asarray(code_out[k])
            text = bytes(code[2:].astype(np.uint8)).decode(errors="replace")
            if code[0] != 0:
                ld._skip(skipped, i, SKIP_REASONS[code[0] - 1], text)
            else:
                target = tuple(int(v) for v in np.asarray(size_out[k]))
                img = np.asarray(image_out[k])
                img = np.array(img) if ld.dali_resize else resize_uint8(img, target)
                if tuple(img.shape[:2]) != target:
                    ld._skip(skipped, i, "decode_error", f"{path}: decoded to {img.shape}, expected {target}")
                else:
                    images[i] = img
                    if text:
                        ld.converted_counts[text] += 1
            k += 1
        return ld._assemble(images, skipped)

