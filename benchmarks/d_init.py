"""What the pose-conditioned discriminator says at the start of a GMPI run, before any step.

The module is built exactly as ``gmpi fit --config CONFIG`` builds it (``seed_everything`` from the config, then
the model's arguments), once per seed and per ``discriminator.pose_init``. Printed per (init, seed):

* the 2D pretrained D's mean logit on reals and on the starting fakes (the untrained GMPI at prior cameras), and
  their gap (> 0: the 2D D tells them apart the right way);
* the same for the pose-conditioned D (reals with their own poses, fakes with theirs);
* its gain per yaw bin: the pose-conditioned logit over the 2D logit of the same images (1 = the pretrained verdict,
  negative = the verdict flipped), from a least-squares fit per bin.

    python benchmarks/d_init.py --config experiments/synthetic.yaml --seeds 0,1,2,3,4 --inits official,pretrained_logit

``--runs DIR [DIR ...]`` measures what the discriminator of trained runs has learnt about the pose, from their
checkpoints (``checkpoints/it*.ckpt`` and ``last.ckpt``): on reals whose yaw is at least 0.15 rad off centre, the
*pose preference* ``D(x, own camera) - D(x, mirrored camera)`` (> 0: D knows from which side the head was seen) and the
real-fake gap at their own cameras.

``--gain-stats N --preset FFHQ256`` needs neither data nor a network: for N fresh official pose mappings (PyTorch's
default init of Linear(16, 16), seeds 0..N-1) it reports how often the start's gain ``sum(cmap) / sqrt(16)`` is
negative over the preset's yaw range, everywhere, somewhere (a verdict that flips with the pose), and its spread.
"""

from __future__ import annotations

import argparse
import json

import lightning.pytorch as pl
import torch

from gmpi_lightning import runs
from gmpi_lightning.data import collate, read_samples, resolve_shards
from gmpi_lightning.module import GMPIModule
from gmpi_lightning.networks import stylegan2_backbone


def real_batch(data: str, n: int) -> dict:
    urls, _ = resolve_shards(data)
    samples = []
    for s in read_samples(urls):
        samples.append(s)
        if len(samples) >= n:
            break
    return collate(samples)


@torch.no_grad()
def measure(model: GMPIModule, D2d, reals: dict, n_fake: int, yaw_bins: torch.Tensor, seed: int) -> dict:
    g = torch.Generator().manual_seed(10_000 + seed)
    c2w = model.fakes.sample(n_fake, g)
    fakes = model.fakes.images(model.G, model.sample_z(n_fake, g), c2w, g, noise_mode="const")
    out = {"d2d_real": D2d(reals["image"])[:, 0], "d2d_fake": D2d(fakes)[:, 0],
           "dpose_real": model.D(reals["image"], model.fakes.real_condition(reals))[:, 0],
           "dpose_fake": model.D(fakes, model.fakes.condition(c2w))[:, 0]}
    row = {k: float(v.mean()) for k, v in out.items()}
    row["gap_2d"], row["gap_pose"] = row["d2d_real"] - row["d2d_fake"], row["dpose_real"] - row["dpose_fake"]
    # gain per yaw: the same images (reals and fakes) judged at each bin's camera, against the 2D logit
    imgs = torch.cat([reals["image"], fakes])
    base = D2d(imgs)[:, 0]
    gains = []
    for yaw in yaw_bins.tolist():
        cam = model.scene.camera(torch.full((len(imgs),), yaw), torch.zeros(len(imgs)))
        logit = model.D(imgs, model.fakes.condition(cam.float()))[:, 0]
        gains.append(float((logit * base).sum() / base.square().sum()))
    row["gain_per_yaw"] = [round(x, 3) for x in gains]
    return row


@torch.no_grad()
def gain_stats(preset_name: str, n: int) -> dict:
    """The official start's pose gain for ``n`` fresh pose mappings at yaws across the prior (pitch = mean)."""
    from gmpi_lightning.cameras import flatten_w2c, sphere_c2w
    from gmpi_lightning.nn.ops import normalize_2nd_moment
    from gmpi_lightning.presets import get_preset

    p = get_preset(preset_name)
    yaw = torch.linspace(p.yaw_mean - p.n_truncated_stds * p.yaw_std, p.yaw_mean + p.n_truncated_stds * p.yaw_std, 21)
    c2w = sphere_c2w(yaw.double(), torch.full_like(yaw, p.pitch_mean).double(), p.sphere_center_z, p.sphere_r)
    cond = flatten_w2c(c2w).float()
    gains = []
    for seed in range(n):
        torch.manual_seed(seed)
        lin = torch.nn.Linear(16, 16)
        gains.append(normalize_2nd_moment(lin(cond)).sum(1) / 4)
    g = torch.stack(gains)  # n x yaws
    neg_all, neg_any = (g < 0).all(1), (g < 0).any(1)
    return {"preset": preset_name, "mappings": n, "yaws": [round(float(y), 2) for y in (yaw[0], yaw[-1])],
            "negative everywhere": float(neg_all.float().mean()), "sign flips with yaw": float(
                (neg_any & ~neg_all).float().mean()), "positive everywhere": float((~neg_any).float().mean()),
            "gain at yaw 0: 5/50/95 %": [round(float(q), 2) for q in torch.quantile(g[:, 10], torch.tensor(
                [0.05, 0.5, 0.95]))], "gain range across yaw (median)": round(float((g.max(1).values - g.min(
                1).values).median()), 2)}


@torch.no_grad()
def pose_preference(model: GMPIModule, reals: dict, n_fake: int = 64) -> dict:
    """Pose preference and real-fake gap of a trained module's D (see the module docstring)."""
    keep = reals["yaw"].abs() >= 0.15
    imgs, w2c = reals["image"][keep], reals["w2c"][keep]
    c2w = torch.linalg.inv(w2c.reshape(-1, 4, 4).double())
    mirror = torch.diag(torch.tensor([-1.0, 1, 1, 1], dtype=torch.float64))
    mirrored = torch.linalg.inv(mirror @ c2w @ mirror).float().reshape(-1, 16)  # the camera reflected in x = 0
    own, other = model.D(imgs, w2c)[:, 0], model.D(imgs, mirrored)[:, 0]
    g = torch.Generator().manual_seed(123)
    cams = model.fakes.sample(n_fake, g)
    fakes = model.fakes.images(model.G_ema, model.sample_z(n_fake, g), cams, g, noise_mode="const")
    fake = model.D(fakes, model.fakes.condition(cams))[:, 0]
    return {"n": int(keep.sum()), "pose_preference": float((own - other).mean()),
            "preference_sign": float((own > other).float().mean()), "real_fake_gap": float(own.mean() - fake.mean())}


def run_checkpoints(run_dirs: list[str], reals: dict) -> list[dict]:
    import re
    from pathlib import Path

    rows = []
    for d in map(Path, run_dirs):
        params = json.loads((d / "params.json").read_text()) if (d / "params.json").is_file() else {}
        for ck in sorted((d / "checkpoints").glob("it*.ckpt")) + [d / "checkpoints" / "last.ckpt"]:
            if not ck.is_file():
                continue
            model = GMPIModule.load_from_checkpoint(ck, map_location="cpu", weights_only=False).eval()
            it = int(re.sub(r"\D", "", ck.stem) or model.iteration) if ck.stem != "last" else model.iteration
            if any(r["run"] == d.name and r["iteration"] == it for r in rows):
                continue  # last.ckpt saved at the same iteration as an it*.ckpt
            rows.append({"run": d.name, **{k.split(".")[-1]: v for k, v in params.items() if "max_iters" not in k},
                         "iteration": it, **pose_preference(model, reals)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="experiments/synthetic.yaml")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--inits", default="official,pretrained_logit")
    ap.add_argument("--num", type=int, default=64, help="reals and fakes each")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--gain-stats", type=int, default=0, help="N fresh official pose mappings (no data, no network)")
    ap.add_argument("--runs", nargs="*", help="run folders: what their trained D learnt about the pose")
    ap.add_argument("--data", default="data/synthetic32", help="the reals of --runs")
    ap.add_argument("--preset", default="FFHQ256", help="the pose prior of --gain-stats")
    args = ap.parse_args(argv)
    if args.gain_stats:
        print(json.dumps(gain_stats(args.preset, args.gain_stats), indent=1))
        return 0
    if args.runs:
        rows = run_checkpoints(args.runs, real_batch(args.data, 256))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    cfg = runs.resolve(["--config", args.config])
    model_args = dict(runs.init_args(cfg, "model"))
    model_args.pop("class_path", None)
    reals = real_batch(runs.init_args(cfg, "data")["data"], args.num)
    from gmpi_lightning.presets import get_preset

    p = get_preset(model_args["preset"])
    bins = torch.linspace(p.yaw_mean - p.n_truncated_stds * p.yaw_std, p.yaw_mean + p.n_truncated_stds * p.yaw_std, 5)
    print(f"yaw bins: {[round(b, 2) for b in bins.tolist()]}")
    print("| d_pose_init | seed | 2D D real | 2D D fake | 2D gap | pose D real | pose D fake | pose gap | "
          "gain per yaw |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for init in args.inits.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            pl.seed_everything(seed, verbose=False)
            disc = {**(model_args.get("discriminator") or {}), "pose_init": init}
            model = GMPIModule(**{**model_args, "discriminator": disc}).eval()
            D2d = stylegan2_backbone(model.hparams.init_from, model.preset, model.hparams.arch)[1].eval()  # 2D D
            row = {"d_pose_init": init, "seed": seed, **measure(model, D2d, reals, args.num, bins, seed)}
            rows.append(row)
            print(f"| {init} | {seed} | {row['d2d_real']:.2f} | {row['d2d_fake']:.2f} | {row['gap_2d']:+.2f} | "
                  f"{row['dpose_real']:.2f} | {row['dpose_fake']:.2f} | {row['gap_pose']:+.2f} | "
                  f"{', '.join(f'{x:+.2f}' for x in row['gain_per_yaw'])} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
