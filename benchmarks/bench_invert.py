"""`gmpi invert` against ground truth: held-out synthetic heads, one input view each.

    python benchmarks/bench_invert.py --ckpt runs/synthetic/gmpi.pt --num 16

For each head (indices from the data card's ``count`` on: never in the training shards) the synthetic renderer draws
the input at one camera (the head's own prior pose, its yaw shrunk towards the mean so that both novel views stay
in the prior's range; ``--input-pose frontal`` for the mean pose). The image is inverted with the checkpoint (the
camera given), and the scene is rendered at yaw -0.3 and +0.3 from the input camera and compared with the same head
drawn there:

* novel-view PSNR / SSIM (torchmetrics, data range 1);
* depth error of the rendered depth against the true depth on the head mask (``estimators.depth_error``: z-scored,
  1.0 = flat, 0 = the true shape up to scale and offset);
* how far the views turn: the yaw that the pose estimator (``runs/estimators/<data>.pt``) reads at +0.3 minus at -0.3
  (the truth's reading: about 0.6; copying the input: 0 by construction);
* reconstruction PSNR at the input camera.

Rows: ``ours`` (latent + pivotal tuning, the command's defaults); ``ours, latent only`` (the same latent on the
untuned generator: stage 1 alone); ``billboard (2D-only)``: our reconstruction on one plane at the mean of its
rendered depth (the MPI collapsed to the single plane nearest its depth map; from the input camera it is the same
picture); ``copy``: the input shown for every view; ``truth``: the synthetic renderer's views (for the pose reading).
Writes ``results.json``, ``table.md`` and ``figure.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from heads import add_common_flags, add_run_flags, overrides, setup  # benchmarks/heads.py

from datamodules.synthetic import render_heads, sample_poses
from gmpi_lightning import export
from gmpi_lightning.cameras import intrinsics, invert_rigid, pose_range
from gmpi_lightning.estimators import depth_error, load_estimators
from gmpi_lightning.image_losses import psnr_ssim
from gmpi_lightning.inversion import InvertSettings, invert
from gmpi_lightning.planes import texel_xyz
from gmpi_lightning.render import render_mpi

ROWS = ("ours", "ours, latent only", "billboard (2D-only)", "copy", "truth")


def billboard_views(recon: torch.Tensor, depth: float, c2w_in: torch.Tensor, c2ws: torch.Tensor, scene,
                    supersample: int = 4) -> torch.Tensor:
    """``recon`` (1 x 3 x R x R, seen from ``c2w_in``) on one fronto-parallel plane at ``depth``, rendered from
    ``c2ws`` (B x 4 x 4): the MPI collapsed to one plane. The plane spans the background plane's extent so every
    view sees only it; its texture is the reconstruction projected from the input camera (border-padded)."""
    preset, r = scene.preset, recon.shape[-1]
    extent = scene.planes.extents[-1]
    xyz = texel_xyz(depth, extent, r * supersample).reshape(-1, 3).double()
    w2c = invert_rigid(c2w_in.double().cpu())[0]
    cam = xyz @ w2c[:3, :3].T + w2c[:3, 3]
    k = intrinsics(preset.fov_deg, r, r, dtype=torch.float64)
    uv = (cam @ k.T)[:, :2] / cam[:, 2:3]  # pixel coordinates, centres at 0.5 + i
    grid = (uv / r * 2 - 1).reshape(1, r * supersample, r * supersample, 2).float()
    tex = F.grid_sample(recon.cpu().float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    mpi = torch.cat([tex, torch.ones_like(tex[:, :1])], 1)[:, None].expand(1, 2, 4, -1, -1)
    depths = torch.tensor([depth, preset.far])
    extents = torch.stack([extent, extent]).cpu()
    out = render_mpi(mpi.expand(len(c2ws), -1, -1, -1, -1).contiguous(), depths, extents, c2ws.cpu(), preset.fov_deg,
                     r, r)
    return out["rgb"]


def summary(values) -> dict:
    """mean / std / n over the finite values; ``inf`` counts how many were infinite (PSNR of identical images)."""
    values = [x for x in values if x is not None]
    v = np.asarray([x for x in values if math.isfinite(x)], np.float64)
    return {"mean": float(v.mean()) if len(v) else None, "std": float(v.std()) if len(v) else None, "n": len(v),
            "inf": sum(1 for x in values if math.isinf(x))}


def fmt(s: dict, digits: int = 2) -> str:
    if s["mean"] is None:
        return "exact" if s["inf"] else "-"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_flags(ap, "")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--offset", type=float, default=0.3, help="novel views at input yaw -+ offset")
    ap.add_argument("--input-pose", choices=["prior", "frontal"], default="prior")
    ap.add_argument("--steps", type=int, default=InvertSettings.steps)
    ap.add_argument("--pti-steps", type=int, default=InvertSettings.pti_steps)
    ap.add_argument("--figure-heads", type=int, default=4)
    add_run_flags(ap, "pti_lr=1e-3", "runs/bench/invert")
    args = ap.parse_args()
    card, cfg, loaded = setup(args)
    G, preset = loaded.G, loaded.preset
    pose_model = load_estimators(args.estimators or Path("runs/estimators") / f"{Path(args.data).name}.pt")[0]
    settings = InvertSettings(steps=args.steps, pti_steps=args.pti_steps, **overrides(args.set))
    (y0, y1), (p0, p1) = pose_range(preset)
    indices = list(range(card["count"], card["count"] + args.num))
    yaw, pitch = sample_poses(indices, cfg)
    if args.input_pose == "frontal":
        yaw, pitch = torch.full_like(yaw, preset.yaw_mean), torch.full_like(pitch, preset.pitch_mean)
    else:  # the prior's poses, yaw shrunk towards the mean so that both novel views stay inside the prior's range
        half = (y1 - y0) / 2
        yaw = preset.yaw_mean + (yaw - preset.yaw_mean) * max(0.0, half - args.offset) / half
    per_head, figure_rows = [], []
    print(f"{args.ckpt}: {len(indices)} held-out heads from index {indices[0]}, {args.input_pose} input pose, views "
          f"at -+{args.offset}, {settings.steps} + {settings.pti_steps} steps, {args.threads} thread(s)")
    for n, (idx, y, p) in enumerate(zip(indices, yaw.tolist(), pitch.tolist())):
        cams = [(y, p), (y - args.offset, p), (y + args.offset, p)]
        gt = render_heads([idx] * 3, cfg, yaw=[c[0] for c in cams], pitch=[c[1] for c in cams])
        truth = gt["image"].permute(0, 3, 1, 2).float().div(255).to(args.device)  # input, -offset, +offset
        wall, cpu = time.perf_counter(), time.process_time()
        inv = invert(G, preset, truth[:1], y, p, settings)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        c2ws = inv.scene.camera([c[0] for c in cams], [c[1] for c in cams])
        with torch.no_grad():
            ours = inv.scene.render(inv.mpi().expand(3, -1, -1, -1, -1), c2ws)
            latent = inv.scene.render(G.synthesize(inv.ws, inv.scene.planes.normalized, noise_mode="const")
                                      .expand(3, -1, -1, -1, -1), c2ws)
            recon = ours["rgb"][:1]
            plane = float(ours["depth"][0].mean())  # the single plane nearest (L2) to the rendered depth map
            views = {"ours": ours["rgb"], "ours, latent only": latent["rgb"],
                     "billboard (2D-only)": billboard_views(recon, plane, c2ws[:1], c2ws, inv.scene).to(args.device),
                     "copy": truth[:1].expand(3, -1, -1, -1), "truth": truth}
            depths = {"ours": ours["depth"], "ours, latent only": latent["depth"]}
            read = {k: pose_model(v.cpu() * 2 - 1)[:, 0].tolist() for k, v in views.items()}
        gt_depth, gt_mask = gt["depth"][:, None], gt["mask"][:, None].float()
        rec = {"index": idx, "yaw": y, "pitch": p, "seconds": wall, "cpu_seconds": cpu,
               "billboard_depth": plane, "rows": {}}
        for name, v in views.items():
            row = {"recon_psnr": psnr_ssim(v[:1], truth[:1])[0],
                   "novel_psnr": [psnr_ssim(v[k:k + 1], truth[k:k + 1])[0] for k in (1, 2)],
                   "novel_ssim": [psnr_ssim(v[k:k + 1], truth[k:k + 1])[1] for k in (1, 2)],
                   "yaw_read": read[name], "yaw_spread": read[name][2] - read[name][1]}
            if name in depths:
                row["depth_error"] = depth_error(depths[name].cpu(), gt_depth, gt_mask).tolist()
            elif name == "billboard (2D-only)":  # a tilted plane: its depth is the plane's, seen from each camera
                row["depth_error"] = depth_error(_plane_depth(plane, c2ws, preset, gt_depth.shape[-1]), gt_depth,
                                                 gt_mask).tolist()
            elif name == "copy":  # no depth at all: flat
                row["depth_error"] = depth_error(torch.ones_like(gt_depth), gt_depth, gt_mask).tolist()
            rec["rows"][name] = row
        per_head.append(rec)
        o = rec["rows"]["ours"]
        print(f"[{n + 1}/{len(indices)}] head {idx} yaw {y:+.3f} pitch {p:+.3f}: recon {o['recon_psnr']:.2f} dB, "
              f"novel {np.mean(o['novel_psnr']):.2f} dB (copy {np.mean(rec['rows']['copy']['novel_psnr']):.2f}), "
              f"turn {o['yaw_spread']:.3f} (truth {rec['rows']['truth']['yaw_spread']:.3f}), {wall:.1f} s "
              f"({cpu:.1f} CPU s)")
        if n < args.figure_heads:
            p_ = preset
            figure_rows.append([export.to_uint8(truth[0]), export.to_uint8(recon[0]),
                                export.to_uint8(truth[1]), export.to_uint8(ours["rgb"][1]),
                                export.to_uint8(truth[2]), export.to_uint8(ours["rgb"][2]),
                                export.to_uint8(views["billboard (2D-only)"][2]),
                                export.depth_to_color(gt_depth[0].to(torch.float32), p_.near, p_.far),
                                export.depth_to_color(ours["depth"][0], p_.near, p_.far, ours["alpha"][0]),
                                export.depth_to_color(ours["depth"][2], p_.near, p_.far, ours["alpha"][2])])
    write_report(args, per_head, figure_rows, settings)


def _plane_depth(depth: float, c2ws: torch.Tensor, preset, r: int) -> torch.Tensor:
    """z-depth of the plane z = ``depth`` seen from each camera (B x 1 x R x R)."""
    from gmpi_lightning.cameras import pixel_rays

    dirs, origins = pixel_rays(c2ws.cpu().double(), preset.fov_deg, r, r)
    origins = origins[:, None, None]
    s = (depth - origins[..., 2]) / dirs[..., 2]
    points = origins + s[..., None] * dirs
    w2c = invert_rigid(c2ws.cpu().double())
    z = torch.einsum("bj,bhwj->bhw", w2c[:, 2, :3], points) + w2c[:, 2, 3, None, None]
    return z[:, None].float()


def write_report(args, per_head: list[dict], figure_rows: list, settings: InvertSettings) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = {}
    for name in ROWS:
        rows = [h["rows"][name] for h in per_head]
        table[name] = {
            "recon_psnr": summary(r["recon_psnr"] for r in rows),
            "novel_psnr": summary(v for r in rows for v in r["novel_psnr"]),
            "novel_ssim": summary(v for r in rows for v in r["novel_ssim"]),
            "depth_error": summary(v for r in rows for v in r.get("depth_error", [])[1:]),
            "depth_error_input": summary(r["depth_error"][0] for r in rows if "depth_error" in r),
            "yaw_minus": summary(r["yaw_read"][1] for r in rows),
            "yaw_plus": summary(r["yaw_read"][2] for r in rows),
            "yaw_spread": summary(r["yaw_spread"] for r in rows),
        }
    seconds, cpu = summary(h["seconds"] for h in per_head), summary(h["cpu_seconds"] for h in per_head)
    command = (f"python benchmarks/bench_invert.py --ckpt {args.ckpt} --num {args.num}"
               + (f" --input-pose {args.input_pose}" if args.input_pose != "prior" else "")
               + "".join(f" --set {kv}" for kv in args.set))
    digest = hashlib.sha256(Path(args.ckpt).read_bytes()).hexdigest()[:12]
    lines = [f"`{command}` (checkpoint sha256 {digest}; {len(per_head)} held-out heads, views at input yaw "
             f"-+{args.offset}; mean ± std; "
             f"inversion {seconds['mean']:.1f} s wall, {cpu['mean']:.1f} CPU s per head on {args.device}, "
             f"{args.threads} thread(s))", "",
             "| method | recon PSNR (input) | novel PSNR | novel SSIM | depth error (novel) | yaw read at -/+ | "
             "turn (+ minus -) |", "|---|---|---|---|---|---|---|"]
    for name in ROWS:
        t = table[name]
        lines.append(f"| {name} | {fmt(t['recon_psnr'])} | {fmt(t['novel_psnr'])} | {fmt(t['novel_ssim'], 3)} | "
                     f"{fmt(t['depth_error'], 3) if name != 'truth' else '0'} | "
                     f"{t['yaw_minus']['mean']:+.3f} / {t['yaw_plus']['mean']:+.3f} | {fmt(t['yaw_spread'], 3)} |")
    md = "\n".join(lines) + "\n"
    (out / "table.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"command": command, "checkpoint": args.ckpt,
                                                  "checkpoint_sha256": digest, "offset": args.offset,
                                                  "input_pose": args.input_pose, "settings": vars(settings),
                                                  "seconds": seconds, "cpu_seconds": cpu, "table": table,
                                                  "heads": per_head}, indent=1))
    if figure_rows:
        cols = ["input", "recon", f"truth -{args.offset}", f"ours -{args.offset}", f"truth +{args.offset}",
                f"ours +{args.offset}", f"2D-only +{args.offset}", "true depth", "our depth", f"depth +{args.offset}"]
        grid, _ = export.labeled_grid(figure_rows, [f"head {h['index']}" for h in per_head[:len(figure_rows)]], cols)
        export.save_png(out / "figure.png", grid)
    print(md + f"wrote {out}/table.md, results.json, figure.png")


if __name__ == "__main__":
    main()
