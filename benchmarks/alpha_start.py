"""The geometry a GMPI run *starts* from: the 2D StyleGAN2 with a freshly initialised alpha branch, scored like a
trained generator (pose slope, depth error, relief, semi-transparency) for several alpha starts and init seeds.

    python benchmarks/alpha_start.py --stylegan2 runs/synthetic_stylegan2/stylegan2.pt \\
        --estimators runs/estimators/synthetic32.pt --starts "1,0;0.3,-1;0.3,-3;0.3,-6" --seeds 0,1,2

A start is ``gain,logit`` (GMPIModule's ``alpha_init_gain``, ``alpha_init_logit``; official: 1,0). Figures: docs/3D.md.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stylegan2", default="runs/synthetic_stylegan2/stylegan2.pt")
    ap.add_argument("--estimators", default="runs/estimators/synthetic32.pt")
    ap.add_argument("--preset", default="synthetic32")
    ap.add_argument("--starts", default="1,0;0.3,-1;0.3,-3;0.3,-6", help="gain,logit;gain,logit;...")
    ap.add_argument("--seeds", default="0,1,2", help="torch seeds of the alpha branch's initialisation")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--planes", type=int, default=32)
    args = ap.parse_args(argv)
    G2d = load_stylegan2_pkl(args.stylegan2)["G_ema"]
    preset = get_preset(args.preset)
    print("| gain, logit | init seed | " + " | ".join(KEYS) + " |\n|---|---|" + "---|" * len(KEYS))
    for start in args.starts.split(";"):
        gain, logit = (float(v) for v in start.split(","))
        for seed in (int(s) for s in args.seeds.split(",")):
            torch.manual_seed(seed)
            G = GMPIGenerator.from_stylegan2(G2d, n_train_planes=args.planes, alpha_init_gain=gain,
                                             alpha_init_logit=logit).eval()
            m = evaluate(G, preset, ["pose", "depth", "consistency"], args.num_samples,
                         settings=FakeSettings(planes=args.planes, noise_mode="const", batch_size=16),
                         estimators=args.estimators, show_progress=False)["metrics"]
            print(f"| {gain:g}, {logit:g} | {seed} | " + " | ".join(f"{m[k]:.3f}" for k in KEYS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
