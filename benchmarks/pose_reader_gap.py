"""Why a checkpoint's pose reader reads the renderer's heads short: what it reads, and how the generator's heads turn.

    python benchmarks/pose_reader_gap.py --ckpt runs/synthetic/gmpi.pt [--num 128] [--augment]

* The reader (``gmpi_lightning.pose_reader``, cached next to the checkpoint) on ``--num`` held-out heads of the
  synthetic renderer: the slope of its yaw readings against the true yaw and its mean |yaw error|, on the heads as they
  are and with each head's background replaced by its mean colour (does it read the head or the background?).
* With ``--augment``: a second reader trained the same way but on renders with random blur, colour and shift, read
  on the same heads (is the gap in how the reader was trained?).
* With ``--calibrate N``: a line yaw = a * reading + b fitted on the first N training heads (their poses are in the
  data) and applied to the held-out ones (is the gap a slope that the data's poses can correct?).
* The generator's own heads, read by the data's pose CNN (``runs/estimators/<data>.pt``): 256 latents rendered at
  yaw -0.3, 0 and +0.3 (pitch 0): the spread of the readings at yaw 0 (the head's pose carried by the latent) and
  each head's turn over the 0.6 rad (how far the generator's heads follow the camera).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from heads import add_common_flags, setup  # benchmarks/heads.py

from datamodules.synthetic import render_heads, sample_poses
from gmpi_lightning.estimators import load_estimators
from gmpi_lightning.pose_reader import ReaderSettings, reader_for, train_reader
from gmpi_lightning.scene import Scene


def slope_and_error(reader, images: torch.Tensor, yaw: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        read = reader(images)[:, 0]
    return float(np.polyfit(yaw.numpy(), read.numpy(), 1)[0]), float((read - yaw).abs().mean())


def blur_colour_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random Gaussian blur (sigma up to 1.2 px), brightness/colour jitter and a shift of up to 2 px."""
    b, c, h, w = x.shape
    sigma = torch.rand(b, generator=g) * 1.2 + 0.01
    k = torch.arange(-2, 3, dtype=x.dtype)
    kern = torch.exp(-k[None] ** 2 / (2 * sigma[:, None] ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = F.conv2d(F.pad(x.reshape(1, b * c, h, w), (2, 2, 0, 0), mode="replicate"), kern[:, None, None], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), kern[:, None, :, None], groups=b * c).reshape(b, c, h, w)
    y = y * (1 + 0.3 * torch.randn(b, 1, 1, 1, generator=g)) + 0.2 * torch.randn(b, c, 1, 1, generator=g)
    dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
    return torch.roll(y, (dy, dx), (2, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_flags(ap, "")
    ap.add_argument("--num", type=int, default=128, help="held-out renderer heads")
    ap.add_argument("--augment", action="store_true", help="also train and read an augmented reader (minutes)")
    ap.add_argument("--calibrate", type=int, default=0, help="fit the reading to the poses of N training heads")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    card, cfg, loaded = setup(args)
    G, preset = loaded.G, loaded.preset
    indices = list(range(card["count"], card["count"] + args.num))
    yaw = torch.as_tensor(sample_poses(indices, cfg)[0], dtype=torch.float32)
    heads = render_heads(indices, cfg)
    images = heads["image"].permute(0, 3, 1, 2).float().div(255) * 2 - 1
    mask = heads["mask"].float()[:, None]
    bg = (images * (1 - mask)).sum((2, 3), keepdim=True) / (1 - mask).sum((2, 3), keepdim=True).clamp_min(1)
    plain_bg = images * mask + bg * (1 - mask)
    reader = reader_for(args.ckpt, G, preset)
    rows = [("reader", "heads as they are", *slope_and_error(reader, images, yaw)),
            ("reader", "background -> its mean colour", *slope_and_error(reader, plain_bg, yaw))]
    if args.calibrate:
        train = list(range(args.calibrate))
        train_images = render_heads(train, cfg)["image"].permute(0, 3, 1, 2).float().div(255) * 2 - 1
        with torch.no_grad():
            a, b = np.polyfit(reader(train_images)[:, 0].numpy(), sample_poses(train, cfg)[0], 1)
            calibrated = a * reader(images)[:, 0] + b
        rows.append((f"reader, yaw = {a:.3f} * reading {b:+.3f} (fitted on {args.calibrate} training heads)",
                     "heads as they are", float(np.polyfit(yaw.numpy(), calibrated.numpy(), 1)[0]),
                     float((calibrated - yaw).abs().mean())))
    if args.augment:
        aug = train_reader(G, preset, ReaderSettings(), progress_bar=False, augment=blur_colour_shift)[0]
        rows.append(("reader trained with blur/colour/shift", "heads as they are", *slope_and_error(aug, images, yaw)))
    print(f"{args.num} held-out renderer heads (indices {indices[0]}-{indices[-1]}):")
    print("| reader | heads | slope of the yaw read against the truth | mean \\|yaw error\\| |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} |")

    est = Path(args.estimators or Path("runs/estimators") / f"{Path(args.data).name}.pt")
    if not est.is_file():
        print(f"no pose estimator at {est}: the generator's turn is not measured")
        return
    cnn = load_estimators(est)[0]
    scene = Scene.for_generator(G, preset, preset.train_planes)
    z = torch.randn(256, G.z_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        mpi = scene.generate(G, z)
        read = {y: cnn(scene.render(mpi, scene.camera(torch.full((256,), y), torch.zeros(256)))["rgb"] * 2 - 1)[:, 0]
                for y in (-0.3, 0.0, 0.3)}
    turn = (read[0.3] - read[-0.3]) / 0.6
    print(f"the checkpoint's heads read by {est}: at yaw 0 mean {float(read[0.0].mean()):+.3f}, spread (sd) "
          f"{float(read[0.0].std()):.3f} rad; turn per radian of camera {float(turn.mean()):.2f} +- "
          f"{float(turn.std()):.2f} (256 heads)")


if __name__ == "__main__":
    main()
