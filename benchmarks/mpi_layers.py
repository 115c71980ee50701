"""Where does a generator put the head and the background? The frontal render's compositing weights, per region.

    python benchmarks/mpi_layers.py runs/synthetic/gmpi.pt [more checkpoints] --seeds 0-31 --planes 32

For each checkpoint, over the seeds' frontal views: the mean normalised depth (0 = near plane, 1 = background plane)
of the rendered surface in the image centre (the head: the central half of the image) and in the border ring (the
background: the outer eighth on each side), and the share of compositing weight on the background plane in each
region. The synthetic heads put their background on the background plane (border depth 1) and the head in front
of it; a generator whose border sits in front of its centre draws its background in front of its head, which a
turned camera shows as parallax of the wrong sign between the two.
"""

from __future__ import annotations

import argparse

import torch

from gmpi_lightning.commands import parse_seeds
from gmpi_lightning.inference import load_generator
from gmpi_lightning.sampling import Sampler


def regions(res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, border) boolean masks of an image of side ``res``."""
    i = torch.arange(res)
    q, e = res // 4, max(1, res // 8)
    inner = (i >= q) & (i < res - q)
    outer = (i < e) | (i >= res - e)
    return inner[:, None] & inner[None, :], outer[:, None] | outer[None, :]


@torch.no_grad()
def layers(ckpt: str, seeds, planes: int) -> dict:
    loaded = load_generator(ckpt, device="cpu")
    sampler = Sampler(loaded.G, loaded.preset, planes, "cpu")
    centre, border = regions(sampler.resolution)
    d = sampler.scene.planes.depths.float()
    rows = {"centre_depth": [], "border_depth": [], "centre_bg_weight": [], "border_bg_weight": []}
    with sampler.sampling():
        for s in seeds:
            out = sampler.render(sampler.mpi(s), sampler.scene.camera(0.0, 0.0), return_weights=True)
            w = out["weights"][0, :, 0]                                      # L x H x W
            depth = (w * ((d - d[0]) / (d[-1] - d[0]))[:, None, None]).sum(0) / w.sum(0).clamp_min(1e-6)
            for name, mask in (("centre", centre), ("border", border)):
                rows[f"{name}_depth"].append(depth[mask].mean().item())
                rows[f"{name}_bg_weight"].append(w[-1][mask].mean().item())
    return {k: sum(v) / len(v) for k, v in rows.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpts", nargs="+")
    ap.add_argument("--seeds", default="0-31")
    ap.add_argument("--planes", type=int, default=32)
    args = ap.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    print("| checkpoint | centre depth | border depth | centre weight on bg plane | border weight on bg plane |")
    print("|---|---:|---:|---:|---:|")
    for ckpt in args.ckpts:
        r = layers(ckpt, seeds, args.planes)
        print(f"| {ckpt} | {r['centre_depth']:.3f} | {r['border_depth']:.3f} | {r['centre_bg_weight']:.3f} | "
              f"{r['border_bg_weight']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
