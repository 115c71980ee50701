"""Inference helpers behind ``gmpi render``: load any generator checkpoint, seed latents, render and save.

Checkpoint kinds (detected from the file):
* ours (``gmpi-lightning/gmpi``, written by training or :func:`~gmpi_lightning.io.save_gmpi_checkpoint`);
* a released GMPI ``generator.pth`` / ``ema.pth`` (with ``--config`` = the run's config.pth or JSON);
* an NVlabs StyleGAN2-ADA pickle or its converted ``.pt``: the flat 2D baseline (image on the nearest plane).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .io import load_gmpi_checkpoint, load_official_gmpi, load_stylegan2_pkl
from .io.gmpi_ckpt import GMPI_FORMAT
from .io.stylegan2_pkl import FORMAT as SG2_FORMAT
from .nn.gmpi import FlatMPIGenerator, GMPIGenerator
from .presets import PRESETS, Preset, get_preset
from .scene import Scene


@dataclass
class LoadedGenerator:
    G: nn.Module
    preset: Preset
    kind: str  # 'gmpi' | 'official' | 'stylegan2-flat'
    source: Path
    training_data: str | None = None  # the shards it was trained on, where the checkpoint records them


def add_generator_arguments(p, seeds: bool = True) -> None:
    """The options every command that loads a generator shares: --ckpt, --config, --preset (and --seeds)."""
    p.add_argument("--ckpt", required=True, help="our checkpoint (.pt or a training .ckpt), an official "
                                                  "generator.pth/ema.pth, or a StyleGAN2 .pkl (flat baseline)")
    p.add_argument("--config", help="official runs: config.pth or JSON with the generator kwargs")
    p.add_argument("--preset", help="camera/plane preset (default: stored in the checkpoint, else by resolution)")
    if seeds:
        p.add_argument("--seeds", default="0-3", help="e.g. 0-3,7 (z = RandomState(seed).randn, as NVlabs)")


def _preset_for(name: str | None, resolution: int, stored: dict | None = None) -> Preset:
    if name:
        preset = get_preset(name)
    elif stored:
        known = {k: v for k, v in stored.items() if k in Preset.__dataclass_fields__}
        return Preset(**known)
    else:  # an FFHQ preset of the same resolution, else FFHQ geometry at this resolution
        preset = next((p for p in PRESETS.values() if p.name.startswith("FFHQ") and p.resolution == resolution),
                      get_preset("FFHQ256"))
    return preset if preset.resolution == resolution else get_preset(preset.name, resolution=resolution)


def _file_kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(b"PK"):
        return "pickle"
    blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(blob, dict) and blob.get("format") == GMPI_FORMAT:
        return "gmpi"
    if isinstance(blob, dict) and blob.get("format") == SG2_FORMAT:
        return "stylegan2"
    if isinstance(blob, dict) and "state_dict" in blob and "hyper_parameters" in blob:
        return "lightning"
    return "official"


def load_training_checkpoint(path: Path) -> tuple[nn.Module, Preset, str, str | None]:
    """G_ema of a Lightning checkpoint of GMPIModule, rebuilt from the kwargs stored with it: (G, preset, kind,
    the training data folder of its run config or None)."""
    from .nn.synthesis import Generator

    ck = torch.load(path, map_location="cpu", weights_only=True)
    hp, kwargs = ck["hyper_parameters"], ck.get("generator_init_kwargs")
    if kwargs is None:
        raise ValueError(f"{path}: no generator_init_kwargs (not a GMPIModule checkpoint of this version)")
    stylegan2 = ck.get("model_mode", hp.get("mode")) == "stylegan2"
    G = (Generator if stylegan2 else GMPIGenerator)(**kwargs)
    G.load_state_dict({k[len("G_ema."):]: v for k, v in ck["state_dict"].items() if k.startswith("G_ema.")})
    G.eval().requires_grad_(False)
    preset = get_preset(hp["preset"], **({"resolution": hp["resolution"]} if hp.get("resolution") else {}))
    data = _run_config_data(ck.get("run_config"))
    return (FlatMPIGenerator(G).eval(), preset, "stylegan2-flat", data) if stylegan2 else (G, preset, "gmpi", data)


def _run_config_data(run_config) -> str | None:
    """``data.data`` of the resolved run config (YAML text, under its subcommand: ``fit: {data: ...}``) that a
    training checkpoint stores, if any."""
    import yaml

    try:
        cfg = yaml.safe_load(run_config) if isinstance(run_config, str) else None
    except yaml.YAMLError:
        return None
    cfg = cfg if isinstance(cfg, dict) else {}
    for section in (cfg.get("fit"), cfg):
        data = section.get("data") if isinstance(section, dict) else None
        if isinstance(data, dict) and isinstance(data.get("data"), str):
            return data["data"]
    return None


def load_generator(ckpt: str | Path, config: str | Path | None = None, preset: str | None = None,
                   device: str | torch.device = "cpu") -> LoadedGenerator:
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}. Nothing is downloaded; pass a local file "
                                f"(our .pt, an official generator.pth/ema.pth, or a StyleGAN2 .pkl).")
    kind = _file_kind(path)
    if kind == "gmpi":
        blob = load_gmpi_checkpoint(path)
        G, stored = blob["G"], blob["preset"]
        out = LoadedGenerator(G, _preset_for(preset, G.img_resolution, stored), "gmpi", path,
                              (blob["extra"] or {}).get("data"))
    elif kind == "lightning":
        G, stored, kind, data = load_training_checkpoint(path)
        out = LoadedGenerator(G, _preset_for(preset, G.img_resolution, stored.to_dict()), kind, path, data)
    elif kind == "official":
        G = load_official_gmpi(path, config)
        out = LoadedGenerator(G, _preset_for(preset, G.img_resolution), "official", path)
    else:
        nets = load_stylegan2_pkl(path)
        sg2 = nets.get("G_ema") or nets.get("G")
        if sg2 is None:
            raise ValueError(f"{path}: holds no generator (G_ema or G)")
        out = LoadedGenerator(FlatMPIGenerator(sg2).eval(), _preset_for(preset, sg2.img_resolution),
                              "stylegan2-flat", path)
    out.G.to(device)
    return out


def parse_seeds(text: str) -> list[int]:
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11]."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if m := re.fullmatch(r"(\d+)-(\d+)", part):
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ValueError(f"seed range {part!r} is empty")
            seeds += list(range(a, b + 1))
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise ValueError(f"cannot parse seeds {text!r}: use e.g. 0-3,7")
    return seeds


@torch.no_grad()
def run_render(args) -> None:
    """The `gmpi render` job (arguments as parsed by the CLI)."""
    from . import export
    from .mesh_io import parse_mesh_formats, write_mesh

    seeds = parse_seeds(args.seeds)
    mesh_formats = parse_mesh_formats(getattr(args, "mesh_format", "ply"))
    loaded = load_generator(args.ckpt, args.config, args.preset, args.device)
    preset, out = loaded.preset, Path(args.out)
    res = args.resolution or loaded.G.img_resolution
    views = [(y, pt) for pt in args.pitch for y in args.yaw]
    sweep = export.sweep_poses(args.trajectory, args.frames, preset.yaw_mean, preset.pitch_mean) if args.video else []
    print(f"{loaded.kind} generator from {loaded.source} | preset {preset.name} | {len(seeds)} seeds x "
          f"{len(views)} views, {args.planes} planes, {res}px -> {out}")
    total = len(seeds) * (len(views) + len(sweep) + (1 if args.mesh else 0))
    bar = export.progress(total=total, unit="render", desc="gmpi render")
    render_kw = dict(resolution=res, plane_chunk=args.plane_chunk, check_inside=not args.allow_outside)
    scene = Scene.for_generator(loaded.G, preset, args.planes, args.device)
    gen_kw = dict(truncation_psi=args.truncation, noise_mode=args.noise_mode, plane_chunk=args.plane_chunk)
    page = None
    if getattr(args, "web", False) or getattr(args, "wandb_project", None):  # OUT/web: the same MPIs in a browser
        from .web import ViewerWriter

        page = ViewerWriter(out / "web", preset, scene.planes, res, loaded.G.img_resolution, seeds,
                            {"checkpoint": Path(args.ckpt).name, "truncation_psi": args.truncation,
                             "noise_mode": args.noise_mode})
    for seed in seeds:
        z = scene.seed_latents([seed], loaded.G.z_dim)
        mpi = scene.generate(loaded.G, z, **gen_kw)
        if page is not None:
            page.add(seed, mpi[0])
        export.save_png(out / f"seed{seed:04d}_planes.png", export.plane_strip(mpi[0]))
        for v, (yaw, pitch) in enumerate(views):
            r = scene.render_pose(mpi, yaw, pitch, **render_kw)
            export.save_png(out / f"seed{seed:04d}_view{v:02d}.png", export.to_uint8(r["rgb"][0]))
            export.save_png(out / f"seed{seed:04d}_view{v:02d}_depth.png",
                            export.depth_to_color(r["depth"][0], preset.near, preset.far, r["alpha"][0]))
            bar.update()
        if sweep:
            frames = []
            for yaw, pitch in sweep:
                r = scene.render_pose(mpi, yaw, pitch, **render_kw)
                depth = export.depth_to_color(r["depth"][0], preset.near, preset.far, r["alpha"][0])
                frames.append(np.concatenate([export.to_uint8(r["rgb"][0]), depth], axis=1))
                bar.update()
            export.write_video(out / f"seed{seed:04d}_{args.trajectory}.mp4", frames, fps=args.fps)
        if args.mesh:
            verts, faces, colors = export.extract_mesh(loaded.G, z, preset, export.mesh_extent(scene.planes.extents),
                                                       level=args.mesh_level, truncation_psi=args.truncation,
                                                       noise_mode=args.noise_mode)
            write_mesh(out / f"seed{seed:04d}_mesh", verts, faces, colors, mesh_formats)
            bar.update()
    bar.close()
    print(f"wrote {len(list(out.glob('seed*')))} files to {out}")
    if page is not None:
        print(f"wrote the viewer page {page.close()}")
        if getattr(args, "wandb_project", None):
            from .web import log_to_wandb

            log_to_wandb(page.out, project=args.wandb_project)
