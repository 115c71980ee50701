"""Throughput of the procedural synthetic-heads renderer (datamodules/synthetic.py).

    python benchmarks/bench_synthetic.py                       # 32, 64 and 128 px, 512 images each
    python benchmarks/bench_synthetic.py --resolution 64 --num 512 --threads 2
    python benchmarks/bench_synthetic.py --preview /tmp/synthetic_preview.png   # also save a grid of 8 samples

Prints images/s (wall clock, best of --repeats) per resolution. The renderer is a loop of small tensor ops per
sample; with 2 intra-op threads, other busy processes on the same cores stall its OpenMP regions badly, so compare
numbers taken on an otherwise idle machine (or with --threads 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from datamodules.synthetic import SyntheticConfig, render_heads  # noqa: E402


def bench(resolution: int, num: int, supersample: int, batch_size: int, repeats: int) -> tuple[float, float]:
    """(images/s by wall clock, images/s by this process's CPU time), best of ``repeats`` runs."""
    cfg = SyntheticConfig(resolution=resolution, supersample=supersample)  # synthetic presets share their geometry
    render_heads(range(4), cfg)  # warm-up: caches, allocator
    best_wall = best_cpu = 0.0
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for start in range(0, num, batch_size):
            render_heads(range(start, min(start + batch_size, num)), cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        best_wall, best_cpu = max(best_wall, num / wall), max(best_cpu, num / max(cpu, 1e-9))
    return best_wall, best_cpu


def save_preview(path: str, resolution: int = 128, n: int = 8) -> None:
    """A 2 x 4 grid of samples, each RGB beside its depth (near = dark; background plane white)."""
    import imageio.v3 as iio

    out = render_heads(range(n), SyntheticConfig(resolution=resolution))
    depth = ((out["depth"] - 0.93) / (1.07 - 0.93)).clamp(0, 1)
    depth = torch.where(out["mask"], depth, torch.ones_like(depth))
    depth = (depth[..., None].expand(-1, -1, -1, 3) * 255).round().to(torch.uint8)
    tiles = torch.cat([out["image"], depth], dim=2)                 # n x R x 2R x 3
    rows = [torch.cat(list(tiles[i:i + 4]), dim=1) for i in range(0, n, 4)]
    iio.imwrite(path, torch.cat(rows, dim=0).numpy())
    print(f"preview: {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--num", type=int, default=512)
    ap.add_argument("--supersample", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preview", default="", help="also save a preview grid to this path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, supersample {args.supersample}, "
          f"{args.num} images, best of {args.repeats}")
    for res in args.resolution:
        wall, cpu = bench(res, args.num, args.supersample, args.batch_size, args.repeats)
        print(f"{res:4d} px: {wall:7.1f} images/s   ({cpu:7.1f} images per CPU-second)")
    if args.preview:
        save_preview(args.preview)


if __name__ == "__main__":
    main()
