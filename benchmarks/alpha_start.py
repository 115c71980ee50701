"""The geometry a GMPI run *starts* from: the 2D StyleGAN2 with a freshly initialised alpha branch, scored like a
trained generator (pose slope, depth error, relief, semi-transparency) for several alpha starts and init seeds,
with where its compositing weight sits (``--profile``).

    python benchmarks/alpha_start.py --stylegan2 runs/synthetic_stylegan2/stylegan2.pt \\
        --estimators runs/estimators/synthetic32.pt --starts "1,0;0.3,-1;0.3,-3;0.3,-6" --seeds 0,1,2 --profile

A start is ``gain,logit[,slope,center]`` (GMPIModule's ``alpha.init_gain``, ``alpha.init_logit``,
``alpha.depth_slope``, ``alpha.depth_center``; official: 1,0). The profile is the compositing weight per plane at the
canonical camera, averaged over the fakes' pixels inside the central half of the image (where the data's heads
are): its share on plane groups, the background's share and the weight-averaged plane. Figures: docs/3D.md.
"""

from __future__ import annotations

import argparse

import torch

from gmpi_lightning.evaluation.evaluate import evaluate
from gmpi_lightning.evaluation.fakes import FakeSettings
from gmpi_lightning.io import load_stylegan2_pkl
from gmpi_lightning.nn.gmpi import GMPIGenerator
from gmpi_lightning.presets import get_preset

KEYS = ("pose_yaw_slope", "depth", "depth_relief", "semi_transparent")
GROUPS = ((0, 5), (5, 11), (11, 21), (21, -1))  # plane index ranges [lo, hi) of 32: front of the face .. background


@torch.no_grad()
def weight_profile(G, preset, planes: int, num: int = 64) -> dict:
    """Where the start's compositing weight sits at the canonical camera (see the module docstring)."""
    from gmpi_lightning.scene import Scene

    scene = Scene(preset, planes)
    mpi = scene.generate(G, scene.seed_latents(range(num), G.z_dim))
    w = scene.render_pose(mpi, torch.zeros(num), torch.zeros(num), return_weights=True)["weights"][:, :, 0]
    r = w.shape[-1]
    w = w[..., r // 4:r - r // 4, r // 4:r - r // 4].mean(dim=(0, 2, 3))  # L
    idx = torch.arange(planes, dtype=w.dtype)
    out = {f"planes {lo}-{(hi if hi > 0 else planes - 1) - 1}": float(w[lo:hi].sum()) for lo, hi in GROUPS}
    out.update(background=float(w[-1]), mean_plane=float((w * idx).sum() / w.sum()),
               mean_alpha=float(mpi[:, :-1, 3].mean()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stylegan2", default="runs/synthetic_stylegan2/stylegan2.pt")
    ap.add_argument("--estimators", default="runs/estimators/synthetic32.pt")
    ap.add_argument("--preset", default="synthetic32")
    ap.add_argument("--starts", default="1,0;0.3,-1;0.3,-3;0.3,-6", help="gain,logit;gain,logit;...")
    ap.add_argument("--seeds", default="0,1,2", help="torch seeds of the alpha branch's initialisation")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--planes", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="also print where the compositing weight sits")
    args = ap.parse_args(argv)
    G2d = load_stylegan2_pkl(args.stylegan2)["G_ema"]
    preset = get_preset(args.preset)
    header = list(KEYS)
    for start in args.starts.split(";"):
        gain, logit, slope, center = ([float(v) for v in start.split(",")] + [0.0, 0.0])[:4]
        for seed in (int(s) for s in args.seeds.split(",")):
            torch.manual_seed(seed)
            G = GMPIGenerator.from_stylegan2(G2d, n_train_planes=args.planes, alpha_init_gain=gain,
                                             alpha_init_logit=logit, alpha_depth_slope=slope,
                                             alpha_depth_center=center).eval()
            m = evaluate(G, preset, ["pose", "depth", "consistency"], args.num_samples,
                         settings=FakeSettings(planes=args.planes, noise_mode="const", batch_size=16),
                         estimators=args.estimators, show_progress=False)["metrics"]
            row = {k: m[k] for k in KEYS}
            if args.profile:
                row.update(weight_profile(G, preset, args.planes))
            if header is not None:
                print("| start | init seed | " + " | ".join(row) + " |\n|---|---|" + "---|" * len(row))
                header = None
            print(f"| {start} | {seed} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
