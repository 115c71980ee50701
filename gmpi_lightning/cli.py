"""The ``gmpi`` command.

    gmpi import-stylegan2 IN.pkl OUT.pt     NVlabs pickle -> plain weights_only file (no code executed)
    gmpi render --ckpt CKPT --seeds 0-3 --planes 96 --out DIR [--video] [--mesh]

Each subcommand is a small function registered in ``COMMANDS``; later subcommands (fit, render,
evaluate, data) plug in the same way.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Callable

import numpy as np


def _import_stylegan2(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gmpi import-stylegan2",
                                description="Convert an NVlabs StyleGAN2-ADA pickle into a plain, weights_only-"
                                            "loadable file. The pickle's embedded source code is never executed.")
    p.add_argument("src", help="NVlabs network pickle (e.g. ffhq-res256-mirror-paper256-noaug.pkl)")
    p.add_argument("dst", help="output file (.pt)")
    args = p.parse_args(argv)
    from .io import load_stylegan2_pkl, save_converted

    loaded = load_stylegan2_pkl(args.src)
    save_converted(loaded, args.dst)
    for key in ("G", "D", "G_ema"):
        if key in loaded:
            kw = loaded["kwargs"][key]["init_kwargs"]
            n = sum(p.numel() for p in loaded[key].parameters())
            print(f"{key:6s} {loaded['kwargs'][key]['class_name']:14s} {kw.get('img_resolution')}px "
                  f"{n / 1e6:.2f}M parameters")
    print(f"wrote {args.dst}")
    return 0


def _floats(text: str) -> list[float]:
    return [float(v) for v in str(text).split(",") if v.strip()]


def _render(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="gmpi render",
        description="Render views, depth, an RGBA plane strip, a camera-sweep video and a mesh per seed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="our checkpoint (.pt), an official generator.pth/ema.pth, "
                                                  "or a StyleGAN2 .pkl (flat baseline)")
    p.add_argument("--config", help="official runs: config.pth or JSON with the generator kwargs")
    p.add_argument("--preset", help="camera/plane preset (default: stored in the checkpoint, else by resolution)")
    p.add_argument("--seeds", default="0-3", help="e.g. 0-3,7 (z = RandomState(seed).randn, as NVlabs)")
    p.add_argument("--planes", type=int, default=96, help="planes at inference (the paper uses 96)")
    p.add_argument("--truncation", type=float, default=1.0, help="truncation psi")
    p.add_argument("--noise-mode", default="const", choices=["const", "random", "none"])
    p.add_argument("--yaw", type=_floats, default=[-0.3, 0.0, 0.3], help="comma-separated yaws (radians)")
    p.add_argument("--pitch", type=_floats, default=[0.0], help="comma-separated pitches (radians)")
    p.add_argument("--resolution", type=int, help="render resolution (default: the generator's)")
    p.add_argument("--video", action="store_true", help="write a camera-sweep mp4 (RGB | depth)")
    p.add_argument("--trajectory", default="yaw", choices=["yaw", "pitch", "circle"])
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--mesh", action="store_true", help="marching cubes over the alpha volume -> PLY")
    p.add_argument("--mesh-level", type=float, default=0.5, help="iso-level on the smoothed alpha volume")
    p.add_argument("--plane-chunk", type=int, help="planes per chunk in generation/compositing (memory)")
    p.add_argument("--allow-outside", action="store_true", help="render rays that miss the background plane "
                                                               "(transparent) instead of stopping")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)

    from pathlib import Path

    from tqdm import tqdm

    from . import export
    from .inference import generate_mpi, load_generator, parse_seeds, render_view

    seeds = parse_seeds(args.seeds)
    loaded = load_generator(args.ckpt, args.config, args.preset, args.device)
    preset, out = loaded.preset, Path(args.out)
    res = args.resolution or loaded.G.img_resolution
    views = [(y, pt) for pt in args.pitch for y in args.yaw]
    sweep = export.sweep_poses(args.trajectory, args.frames, preset.yaw_mean, preset.pitch_mean) if args.video else []
    print(f"{loaded.kind} generator from {loaded.source} | preset {preset.name} | {len(seeds)} seeds x "
          f"{len(views)} views, {args.planes} planes, {res}px -> {out}")
    total = len(seeds) * (len(views) + len(sweep) + (1 if args.mesh else 0))
    bar = tqdm(total=total, unit="render", desc="gmpi render")
    render_kw = dict(resolution=res, plane_chunk=args.plane_chunk, check_inside=not args.allow_outside)
    for seed in seeds:
        mpi, planes = generate_mpi(loaded, seed, args.planes, args.truncation, args.noise_mode, args.plane_chunk,
                                   args.device)
        export.save_png(out / f"seed{seed:04d}_planes.png", export.plane_strip(mpi[0]))
        for v, (yaw, pitch) in enumerate(views):
            r = render_view(mpi, planes, preset, yaw, pitch, **render_kw)
            export.save_png(out / f"seed{seed:04d}_view{v:02d}.png", export.to_uint8(r["rgb"][0]))
            export.save_png(out / f"seed{seed:04d}_view{v:02d}_depth.png",
                            export.depth_to_color(r["depth"][0], preset.near, preset.far, r["alpha"][0]))
            bar.update()
        if sweep:
            frames = []
            for yaw, pitch in sweep:
                r = render_view(mpi, planes, preset, yaw, pitch, **render_kw)
                depth = export.depth_to_color(r["depth"][0], preset.near, preset.far, r["alpha"][0])
                frames.append(np.concatenate([export.to_uint8(r["rgb"][0]), depth], axis=1))
                bar.update()
            export.write_video(out / f"seed{seed:04d}_{args.trajectory}.mp4", frames, fps=args.fps)
        if args.mesh:
            from .inference import seed_latent

            z = seed_latent(seed, loaded.G.z_dim).to(args.device)
            verts, faces, colors = export.extract_mesh(loaded.G, z, preset, planes["extents"][0],
                                                       level=args.mesh_level, truncation_psi=args.truncation,
                                                       noise_mode=args.noise_mode)
            export.write_ply(out / f"seed{seed:04d}_mesh.ply", verts, faces, colors)
            bar.update()
    bar.close()
    print(f"wrote {len(list(out.glob('seed*')))} files to {out}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "import-stylegan2": (_import_stylegan2, "convert an NVlabs StyleGAN2-ADA pickle safely"),
    "render": (_render, "views, depth, plane strip, video and mesh from a checkpoint"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:18s} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: gmpi COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]][0](argv[1:])
    except (FileNotFoundError, ValueError, pickle.UnpicklingError) as e:  # user-facing errors, no traceback
        print(f"gmpi {argv[0]}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
