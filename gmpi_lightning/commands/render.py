"""``gmpi render``, ``gmpi export-web``, ``gmpi import-stylegan2``: a checkpoint in, files out."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from .. import export
from ..inference import load_generator
from ..io import load_stylegan2_pkl, save_converted
from ..mesh_io import parse_mesh_formats, write_mesh
from ..sampling import Sampler
from ..web import ViewerWriter, log_to_wandb
from . import FOUR_SEEDS, PITCHES, YAWS, Floats, Seeds, default_device, parse_seeds


def import_stylegan2(src: str, dst: str) -> Path:
    """Convert an NVlabs StyleGAN2-ADA pickle into a plain, weights_only-loadable file. The pickle's embedded source
    code is never executed.

    Args:
        src: NVlabs network pickle (e.g. ffhq-res256-mirror-paper256-noaug.pkl).
        dst: output file (.pt).
    """
    loaded = load_stylegan2_pkl(src)
    save_converted(loaded, dst)
    for key in ("G", "D", "G_ema"):
        if key in loaded:
            kw, n = loaded["kwargs"][key]["init_kwargs"], sum(p.numel() for p in loaded[key].parameters())
            print(f"{key:6s} {loaded['kwargs'][key]['class_name']:14s} {kw.get('img_resolution')}px "
                  f"{n / 1e6:.2f}M parameters")
    print(f"wrote {dst}")
    return Path(dst)


@torch.no_grad()
def render(ckpt: str, out: str, seeds: Seeds = FOUR_SEEDS, config: str | None = None,
           preset: str | None = None, planes: int = 96, truncation: float = 1.0,
           noise_mode: Literal["const", "random", "none"] = "const", yaw: Floats = YAWS,
           pitch: Floats = PITCHES, resolution: int | None = None, video: bool = False,
           trajectory: Literal["yaw", "pitch", "circle"] = "yaw", frames: int = 100, fps: int = 8, mesh: bool = False,
           mesh_level: float = 0.5, mesh_format: str | None = None, plane_chunk: int | None = None,
           allow_outside: bool = False, web: bool = False, wandb_project: str | None = None,
           device: str | None = None) -> Path:
    """Render views, depth, an RGBA plane strip, a camera-sweep video and a mesh per seed.

    Args:
        ckpt: our checkpoint (.pt or training .ckpt), official generator.pth/ema.pth, or StyleGAN2 .pkl (flat baseline).
        out: output folder.
        seeds: e.g. 0-3,7 (z = RandomState(seed).randn, as NVlabs).
        config: official runs: config.pth or JSON with the generator kwargs.
        preset: camera/plane preset (default: stored in the checkpoint, else by resolution).
        planes: planes at inference (the paper uses 96).
        truncation: truncation psi.
        noise_mode: the generator's noise.
        yaw: comma-separated yaws (radians).
        pitch: comma-separated pitches (radians).
        resolution: render resolution (default: the generator's).
        video: write a camera-sweep mp4 (RGB | depth).
        trajectory: the sweep's path.
        frames: frames of the sweep.
        fps: frames per second of the video.
        mesh: marching cubes over the alpha volume -> mesh file(s).
        mesh_level: iso-level on the smoothed alpha volume.
        mesh_format: mesh files: ply, glb (glTF binary, vertex colours) or both: ply,glb (default ply; implies --mesh).
        plane_chunk: planes per chunk in generation/compositing (memory).
        allow_outside: render rays that miss the background plane (transparent) instead of stopping.
        web: also write OUT/web/: the WebGL viewer page of these MPIs (as gmpi export-web; open index.html from disk).
        wandb_project: log that page to W&B (wandb.Html) in this project (implies --web).
        device: cuda or cpu (default: cuda when available).
    """
    device, mesh_formats = device or default_device(), parse_mesh_formats("ply" if mesh_format is None else mesh_format)
    mesh = mesh or mesh_format is not None
    loaded = load_generator(ckpt, config, preset, device)
    sampler = Sampler(loaded.G, loaded.preset, planes, device, loaded.G.img_resolution if resolution is None else
                      resolution, truncation, noise_mode, plane_chunk, check_inside=not allow_outside)
    out, seeds = Path(out), parse_seeds(seeds)
    views = [(y, p) for p in pitch for y in yaw]
    print(f"{loaded.kind} generator from {loaded.source} | preset {loaded.preset.name} | {len(seeds)} seeds x "
          f"{len(views)} views, {planes} planes, {sampler.resolution}px -> {out}")
    info = {"checkpoint": Path(ckpt).name, "truncation_psi": truncation, "noise_mode": noise_mode}
    page = ViewerWriter(out / "web", loaded.preset, sampler.scene.planes, sampler.resolution, loaded.G.img_resolution,
                        seeds, info) if web or wandb_project else None  # OUT/web: the same MPIs in a browser
    bar = export.progress(total=len(seeds) * (len(views) + (frames if video else 0) + mesh), unit="render",
                          desc="gmpi render")
    for seed in seeds:
        mpi, stem = sampler.mpi(seed), out / f"seed{seed:04d}"
        if page is not None:
            page.add(seed, mpi[0])
        export.save_png(f"{stem}_planes.png", export.plane_strip(mpi[0]))
        for v, (y, p) in enumerate(views):
            rgb, depth = sampler.view(mpi, y, p)
            export.save_png(f"{stem}_view{v:02d}.png", rgb)
            export.save_png(f"{stem}_view{v:02d}_depth.png", depth)
            bar.update()
        if video:
            export.write_video(f"{stem}_{trajectory}.mp4", sampler.sweep(mpi, trajectory, frames), fps=fps)
            bar.update(frames)
        if mesh:
            write_mesh(f"{stem}_mesh", *sampler.mesh(seed, level=mesh_level), mesh_formats)
            bar.update()
    bar.close()
    print(f"wrote {len(list(out.glob('seed*')))} files to {out}")
    if page is not None:
        print(f"wrote the viewer page {page.close()}")
        if wandb_project:
            log_to_wandb(page.out, project=wandb_project)
    return out


@torch.no_grad()
def export_web(ckpt: str, out: str, seeds: Seeds = FOUR_SEEDS, config: str | None = None,
               preset: str | None = None, planes: int = 32, resolution: int | None = None, truncation: float = 1.0,
               noise_mode: Literal["const", "random", "none"] = "const", plane_chunk: int | None = None,
               force: bool = False, wandb_project: str | None = None, device: str | None = None) -> Path:
    """Write a self-contained WebGL viewer (index.html + scripts) of the seeds' MPIs: open it from disk in any
    browser, drag to orbit, toggle depth. The MPIs are generated as `gmpi render` generates them.

    Args:
        ckpt: our checkpoint (.pt or a training .ckpt), an official generator.pth/ema.pth, or a StyleGAN2 .pkl.
        out: output folder.
        seeds: e.g. 0-3,7.
        config: official runs: config.pth or JSON with the generator kwargs.
        preset: camera/plane preset (default: stored in the checkpoint, else by resolution).
        planes: planes of the exported MPIs.
        resolution: page render size in pixels (default: the generator's); planes are stored at min(this, the
            generator's), so below the generator's own size the page is lighter, close to but not equal to gmpi render.
        truncation: truncation psi.
        noise_mode: the generator's noise.
        plane_chunk: planes per chunk in generation (memory).
        force: write a page over the texture budget (e.g. 96 planes at 512 px).
        wandb_project: also log the page to W&B (wandb.Html) in this project.
        device: cuda or cpu (default: cuda when available).
    """
    device = device or default_device()
    loaded = load_generator(ckpt, config, preset, device)
    seeds, res_g = parse_seeds(seeds), loaded.G.img_resolution
    sampler = Sampler(loaded.G, loaded.preset, planes, device, res_g if resolution is None else resolution,
                      truncation, noise_mode, plane_chunk)
    info = {"checkpoint": Path(ckpt).name, "generator": loaded.kind, "truncation_psi": truncation,
            "noise_mode": noise_mode}
    with ViewerWriter(out, loaded.preset, sampler.scene.planes, sampler.resolution, min(sampler.resolution, res_g),
                      seeds, info, force) as page:
        for seed in export.progress(seeds, unit="seed", desc="gmpi export-web"):
            page.add(seed, sampler.mpi(seed)[0])
    index = page.out / "index.html"
    total = sum(f.stat().st_size for f in page.out.iterdir())
    print(f"wrote {index} ({total / 2**20:.1f} MB): open it in a browser (file://), "
          f"e.g. {index.resolve().as_uri()}?seed={seeds[0]}&yaw=0.2&pitch=-0.1")
    if wandb_project:
        log_to_wandb(page.out, project=wandb_project)
    return index
