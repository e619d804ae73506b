"""Images/s of the DALI image path vs transformers' Qwen2-VL image processors.

Same JPEG files (natural-looking, 0.3–4 MP, mixed aspect ratios, written by this script),
same run. Each path goes from file path to ``pixel_values`` + ``image_grid_thw``:

- ``transformers-default``: the class ``AutoImageProcessor`` picks for a Qwen2-VL /
  Qwen2.5-VL checkpoint (in transformers 5.x ``Qwen2VLImageProcessor``, torchvision
  backend: the former "fast" processor, and the one vLLM runs). The RESULT baseline.
- ``transformers-pil``: ``Qwen2VLImageProcessorPil`` (PIL/numpy, the former "slow" one);
- ``dali-cpu``: ``sophiavl_mcore.data.images.ImageLoader`` on CPU: DALI decode
  (``--threads`` threads), torch's uint8 antialiased bicubic resize, the fused C++
  normalise+patchify kernel into one huge-page buffer per batch; it also yields the
  resized uint8 images for vLLM;
- ``dali-cpu (fresh buffers)``: the same with ``reuse_buffers=0``: a new (huge-page)
  ``pixel_values`` mapping per batch, page faults included, as when a consumer keeps
  every batch alive;
- ``dali-cpu (fn.resize)`` (``--dali-resize``): the same with DALI's own CPU resize;
- ``dali-gpu``: nvJPEG decode + DALI resize, when CUDA is available.

The machine may be shared and loaded, so the paths run interleaved, ``--repeats`` rounds;
each path's median round is reported, and the speedup is the median over rounds of the
per-round ratio (the ratio of the medians is printed beside it). A second table splits ours into stages and
times the C++ patchify kernel against its Python/torch reference on the same images.

    python bench/bench_images.py [--images 64] [--threads 2] [--repeats 3] [--dali-resize]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _sizes(n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    out = []
    for _ in range(n):
        pixels = rng.uniform(0.3e6, 4.0e6)
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        h = int(round(np.sqrt(pixels / aspect)))
        out.append((h, int(round(pixels / h))))
    return out


def _default_processor(tmp: str) -> object:
    """The processor transformers gives a Qwen2-VL checkpoint by default."""
    from transformers import AutoImageProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    Qwen2VLImageProcessor().save_pretrained(tmp)
    return AutoImageProcessor.from_pretrained(tmp)


def _timed_rounds(
    paths: dict[str, Callable[[], object]], repeats: int,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Runs every path once per round, in order, ``repeats`` rounds: noise from other
    load hits all paths alike instead of whichever ran during it. Returns wall seconds
    and CPU seconds of this process (all its threads, DALI's included) per path."""
    wall: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            t0, c0 = time.perf_counter(), time.process_time()
            result = fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            del result  # free the batch before the next path allocates its own
    return wall, cpu


def _patchify_kernels(loader: object, paths: list[str], repeats: int) -> tuple[float, float]:
    """Median seconds of the C++ kernel and of the torch reference on the same resized
    images, into preallocated output (no page faults: the kernels alone)."""
    from sophiavl_mcore.data.patchify import normalize_patchify_cpu, normalize_patchify_into

    batch = loader.load(paths)
    images = [im for im in batch.images if im is not None]
    counts = batch.image_grid_thw.prod(dim=1).tolist()
    out = batch.pixel_values

    def run(kernel: Callable[[np.ndarray, torch.Tensor], None]) -> float:
        t0 = time.perf_counter()
        start = 0
        for img, n in zip(images, counts, strict=True):
            kernel(img, out[start : start + n])
            start += n
        return time.perf_counter() - t0

    cpp, ref = [], []
    for _ in range(repeats):
        cpp.append(run(lambda im, o: normalize_patchify_cpu(im, o.numpy(), loader.cfg)))
        ref.append(run(lambda im, o: normalize_patchify_into(torch.from_numpy(im), o, loader.cfg)))
    return statistics.median(cpp), statistics.median(ref)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dali-resize", action="store_true", help="also time DALI's CPU resize")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from sophiavl_mcore.data.config import ImageConfig
    from sophiavl_mcore.data.images import ImageLoader
    from sophiavl_mcore.data.synthetic import write_jpegs

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = _sizes(args.images, rng)
        paths = [str(p) for p in write_jpegs(Path(tmp), sizes, seed=args.seed)]
        mp = sum(h * w for h, w in sizes) / 1e6
        print(f"{args.images} JPEGs, {mp:.1f} MP in total, {min(sizes, key=lambda s: s[0] * s[1])} .. "
              f"{max(sizes, key=lambda s: s[0] * s[1])}; threads={args.threads}, "
              f"median of {args.repeats} interleaved rounds")

        default = _default_processor(str(Path(tmp) / "proc"))
        backend = type(default).__mro__[1].__name__.removesuffix("Backend").lower()
        baseline_name = f"transformers-{type(default).__name__}-{backend}"
        print(f"transformers default processor: {type(default).__name__} ({backend} backend)")

        def hf(proc: object) -> Callable[[], object]:
            return lambda: proc(images=[Image.open(p) for p in paths], return_tensors="pt")

        cfg = ImageConfig(num_threads=args.threads, prepare_workers=args.threads, device="cpu")
        loader = ImageLoader(cfg)
        loader.load(paths[:4])  # warm-up: allocations, thread pools
        ours = loader.load(paths)
        ref = hf(default)()
        round_stages: list[dict[str, float]] = []

        def ours_run() -> object:
            before = dict(loader.stage_seconds)
            batch = loader.load(paths)
            round_stages.append({k: v - before.get(k, 0.0) for k, v in loader.stage_seconds.items()})
            return batch

        fresh = ImageLoader(dataclasses.replace(cfg, reuse_buffers=0))
        fresh.load(paths[:4])
        runs: dict[str, Callable[[], object]] = {
            "dali-cpu": ours_run,
            "dali-cpu (fresh buffers)": lambda: fresh.load(paths),
            "transformers-default": hf(default),
            "transformers-pil": hf(Qwen2VLImageProcessorPil()),
        }
        if args.dali_resize:
            dali_rs = ImageLoader(dataclasses.replace(cfg, resize_backend="dali"))
            dali_rs.load(paths[:4])
            runs["dali-cpu (fn.resize)"] = lambda: dali_rs.load(paths)
        if torch.cuda.is_available():
            gpu_loader = ImageLoader(ImageConfig(num_threads=args.threads, device="gpu"))
            gpu_loader.load(paths[:4])
            runs["dali-gpu"] = lambda: (gpu_loader.load(paths), torch.cuda.synchronize())
        _timed_rounds(runs, 1)  # warm-up round, not counted: allocators, pools, page cache
        round_stages.clear()
        times, cpu_times = _timed_rounds(runs, args.repeats)
        median_round = sorted(range(args.repeats), key=lambda r: times["dali-cpu"][r])[args.repeats // 2]
        stages = round_stages[median_round]
        cpp_s, ref_s = _patchify_kernels(loader, paths, args.repeats)

    same_grid = torch.equal(ours.image_grid_thw, ref["image_grid_thw"])
    diff = (ours.pixel_values - ref["pixel_values"]).abs()
    print(f"parity vs {baseline_name}: grid_thw equal={same_grid}, pixel_values mean abs diff "
          f"{diff.mean().item():.5f}, max {diff.max().item():.4f}; "
          f"{ours.pixel_values.numel() * 4 / 1e6:.0f} MB of pixel_values per batch")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    cpu_med = {name: statistics.median(ts) for name, ts in cpu_times.items()}
    rounds = {name: " ".join(f"{t:.2f}" for t in ts) for name, ts in times.items()}
    width = max(len(r) for r in rounds.values()) + 2
    print(f"\n{'path':<26}{'median s':>9}{'rounds (s)':>{width}}{'images/s':>10}{'MP/s':>7}"
          f"{'CPU s':>8}")
    for name, sec in med.items():
        print(f"{name:<26}{sec:>9.3f}{rounds[name]:>{width}}{args.images / sec:>10.1f}"
              f"{mp / sec:>7.1f}{cpu_med[name]:>8.2f}")
    print("\ndali-cpu stages in its median round (s): "
          + ", ".join(f"{k} {stages.get(k, 0.0):.3f}" for k in ("prepare", "decode", "resize", "patchify")))
    print(f"patchify kernel alone on the same images: C++ {cpp_s:.3f} s, torch reference {ref_s:.3f} s "
          f"({ref_s / cpp_s:.2f}x)")

    def ratio(base: str) -> tuple[float, float]:
        """(median of the per-round ratios, ratio of the medians): a round's paths ran
        seconds apart, so the first cancels slow drifts of the machine's load."""
        per_round = [b / o for b, o in zip(times[base], times["dali-cpu"], strict=True)]
        return statistics.median(per_round), med[base] / med["dali-cpu"]

    speedup, of_medians = ratio("transformers-default")
    vs_pil, pil_of_medians = ratio("transformers-pil")
    print(f"\ndali-cpu speedup (median of per-round ratios; ratio of medians in brackets): "
          f"{speedup:.2f}x ({of_medians:.2f}x) vs {baseline_name}, "
          f"{vs_pil:.2f}x ({pil_of_medians:.2f}x) vs transformers-pil")
    print(f"CPU seconds ratio (median): {cpu_med['transformers-default'] / cpu_med['dali-cpu']:.2f}x vs "
          f"{baseline_name}, {cpu_med['transformers-pil'] / cpu_med['dali-cpu']:.2f}x vs transformers-pil")
    if "dali-gpu" not in med:
        print("RESULT images_gpu_decode speedup=nan baseline=dali-cpu target=1 status=skipped-no-gpu")
    else:
        gpu_ratio = med["dali-cpu"] / med["dali-gpu"]
        print(f"RESULT images_gpu_decode speedup={gpu_ratio:.2f} baseline=dali-cpu target=1 "
              f"status={'ok' if gpu_ratio >= 1 else 'short'}")
    print(f"RESULT images speedup={speedup:.2f} baseline={baseline_name} target=2 "
          f"status={'ok' if speedup >= 2 else 'short'}")


if __name__ == "__main__":
    main()
