"""Images/s of the DALI image path vs transformers' Qwen2-VL image processors.

Same JPEG files (natural-looking, 0.3–4 MP, mixed aspect ratios, written by this script),
same run. Each side goes from file path to ``pixel_values`` + ``image_grid_thw``:

- ``transformers-pil``: ``Qwen2VLImageProcessorPil`` (PIL/numpy, the "slow" one);
- ``transformers-torchvision``: ``Qwen2VLImageProcessor`` (torchvision backend, the
  "fast" one and the class vLLM loads);
- ``dali-cpu``: ``sophiavl_mcore.data.images.ImageLoader`` on CPU (DALI decode with
  ``--threads`` threads, torch's uint8 bicubic resize); it also yields the resized uint8
  images for vLLM;
- ``dali-cpu (fn.resize)``: the same with DALI's own CPU resize (``resize_backend="dali"``);
- ``dali-gpu``: the same with nvJPEG decode, when CUDA is available.

The speedup in the RESULT line is against the faster transformers processor.

    python bench/bench_images.py [--images 96] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
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


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    from sophiavl_mcore.data.images import ImageConfig, ImageLoader
    from sophiavl_mcore.data.synthetic import write_jpegs

    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = _sizes(args.images, rng)
        paths = [str(p) for p in write_jpegs(Path(tmp), sizes, seed=args.seed)]
        mp = sum(h * w for h, w in sizes) / 1e6
        print(f"{args.images} JPEGs, {mp:.1f} MP in total, {min(sizes, key=lambda s: s[0] * s[1])} .. "
              f"{max(sizes, key=lambda s: s[0] * s[1])}; threads={args.threads}, best of {args.repeats}")

        def hf(proc: object) -> Callable[[], object]:
            def run() -> object:
                return proc(images=[Image.open(p) for p in paths], return_tensors="pt")
            return run

        cfg = ImageConfig(num_threads=args.threads, prepare_workers=args.threads, device="cpu")
        loader = ImageLoader(cfg)
        loader.load(paths[:4])  # warm-up: allocations, thread pools
        rows: dict[str, float] = {}
        ours = loader.load(paths)
        rows["dali-cpu"] = _best(lambda: loader.load(paths), args.repeats)
        dali_rs = ImageLoader(dataclasses.replace(cfg, resize_backend="dali"))
        dali_rs.load(paths[:4])
        rows["dali-cpu (fn.resize)"] = _best(lambda: dali_rs.load(paths), args.repeats)
        rows["transformers-pil"] = _best(hf(Qwen2VLImageProcessorPil()), args.repeats)
        fast = Qwen2VLImageProcessor()
        ref = hf(fast)()
        rows["transformers-torchvision"] = _best(hf(fast), args.repeats)
        gpu_ratio = None
        if torch.cuda.is_available():
            gpu_loader = ImageLoader(ImageConfig(num_threads=args.threads, device="gpu"))
            gpu_loader.load(paths[:4])
            rows["dali-gpu"] = _best(lambda: (gpu_loader.load(paths), torch.cuda.synchronize()), args.repeats)
            gpu_ratio = rows["dali-cpu"] / rows["dali-gpu"]

    same_grid = torch.equal(ours.image_grid_thw, ref["image_grid_thw"])
    diff = (ours.pixel_values - ref["pixel_values"]).abs()
    print(f"parity vs torchvision processor: grid_thw equal={same_grid}, pixel_values mean abs diff "
          f"{diff.mean().item():.5f}, max {diff.max().item():.4f}")
    print(f"{'path':<28}{'seconds':>10}{'images/s':>12}{'MP/s':>10}")
    for name, sec in rows.items():
        print(f"{name:<28}{sec:>10.3f}{args.images / sec:>12.1f}{mp / sec:>10.1f}")
    baseline = min(rows["transformers-pil"], rows["transformers-torchvision"])
    speedup = baseline / rows["dali-cpu"]
    vs_pil = rows["transformers-pil"] / rows["dali-cpu"]
    print(f"dali-cpu speedup: {speedup:.2f}x vs the faster transformers processor, {vs_pil:.2f}x vs the PIL one")
    if gpu_ratio is None:
        print("RESULT images_gpu_decode speedup=nan baseline=dali-cpu target=1 status=skipped-no-gpu")
    else:
        print(f"RESULT images_gpu_decode speedup={gpu_ratio:.2f} baseline=dali-cpu target=1 "
              f"status={'ok' if gpu_ratio >= 1 else 'short'}")
    print(f"RESULT images speedup={speedup:.2f} baseline=transformers-Qwen2VLImageProcessor target=2 "
          f"status={'ok' if speedup >= 2 else 'short'}")


if __name__ == "__main__":
    main()
