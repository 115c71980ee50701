"""How good is a 2D StyleGAN2 prior? Its images against the data, in the pose estimator's features (``est_fd``).

    python benchmarks/prior_quality.py runs/synthetic_stylegan2/stylegan2.pt [more .pt files] \\
        --data data/synthetic32 --estimators runs/estimators/synthetic32.pt --num 1000 --grid prior.png

For each file: ``est_fd`` (Fréchet distance of the pose CNN's features of 1000 fakes to 2000 reals; the data
against itself scores about 0 to 1, lower is better) with its bootstrap standard error, and the diversity of the fakes
(mean per-pixel standard deviation over the fakes, against the reals'). ``--grid`` writes 8 fakes per file over a row
of reals, each 4x (nearest) so eyes, nose and mouth can be checked by eye.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from gmpi_lightning.data import read_samples, resolve_shards
from gmpi_lightning.evaluation.evaluate import evaluate
from gmpi_lightning.evaluation.fakes import FakeSettings, iter_images_2d
from gmpi_lightning.io import load_stylegan2_pkl
from gmpi_lightning.presets import get_preset
from gmpi_lightning.scene import seed_latents


def reals(data: str, n: int) -> torch.Tensor:
    out = []
    for batch in read_samples(resolve_shards(data)[0], 256):
        out.append(batch["image"])
        if sum(len(x) for x in out) >= n:
            break
    return torch.cat(out)[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="2D StyleGAN2 files (exported .pt or NVlabs pickles)")
    ap.add_argument("--data", default="data/synthetic32")
    ap.add_argument("--estimators", default="runs/estimators/synthetic32.pt")
    ap.add_argument("--preset", default="synthetic32")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--grid", help="write a picture of fakes per file over reals here")
    args = ap.parse_args(argv)
    preset, real = get_preset(args.preset), reals(args.data, 2000)
    print(f"reals: per-pixel std over images {float(real.std(0).mean()):.3f}")
    print("| file | est_fd | ± se | pixel std over fakes |\n|---|---|---|---|")
    rows = [((real[:8] + 1) / 2).clamp(0, 1)]
    for f in args.files:
        G = load_stylegan2_pkl(f)["G_ema"].eval()
        r = evaluate(None, preset, ["est_fd"], args.num, args.data, FakeSettings(planes=2, batch_size=100),
                     estimators=args.estimators, show_progress=False, source=partial(iter_images_2d, G, preset))
        z = seed_latents(range(256), G.z_dim)
        with torch.no_grad():
            img = G(z, None, noise_mode="const").clamp(-1, 1)
        rows.append(((img[:8] + 1) / 2).clamp(0, 1))
        print(f"| {f} | {r['metrics']['est_fd']:.2f} | {r['details']['est_fd']['bootstrap_se']:.2f} | "
              f"{float(img.std(0).mean()):.3f} |", flush=True)
    if args.grid:
        from PIL import Image

        grid = torch.cat([torch.cat(list(F.interpolate(x, scale_factor=4, mode="nearest")), 2) for x in rows], 1)
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(args.grid)
        print(f"wrote {args.grid} (top row: reals; then one row per file)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
