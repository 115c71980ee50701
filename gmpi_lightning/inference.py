"""Load any generator checkpoint as an MPI generator with its preset (``gmpi render``, ``export-web``, ``evaluate``,
``invert``).

Checkpoint kinds (detected from the file):
* ours (``gmpi-lightning/gmpi``, written by training or :func:`~gmpi_lightning.io.save_gmpi_checkpoint`);
* a released GMPI ``generator.pth`` / ``ema.pth`` (with ``--config`` = the run's config.pth or JSON);
* an NVlabs StyleGAN2-ADA pickle or its converted ``.pt``: the flat 2D baseline (image on the nearest plane).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, warner
from .io import load_gmpi_checkpoint, load_official_gmpi, load_stylegan2_pkl
from .io.gmpi_ckpt import GMPI_FORMAT
from .io.stylegan2_pkl import FORMAT as SG2_FORMAT
from .nn.gmpi import FlatMPIGenerator, GMPIGenerator
from .presets import PRESETS, Preset, get_preset


@dataclass
class LoadedGenerator:
    G: nn.Module
    preset: Preset
    kind: str  # 'gmpi' | 'official' | 'stylegan2-flat'
    source: Path
    training_data: str | None = None  # the shards it was trained on, where the checkpoint records them


def _preset_for(name: str | None, resolution: int, stored: dict | None = None) -> Preset:
    if stored and not name:
        return Preset(**{k: v for k, v in stored.items() if k in Preset.__dataclass_fields__})
    # the named preset, else an FFHQ preset of the same resolution, else FFHQ geometry at this resolution
    ffhq = (p for p in PRESETS.values() if p.name.startswith("FFHQ") and p.resolution == resolution)
    preset = get_preset(name) if name else next(ffhq, get_preset("FFHQ256"))
    return preset if preset.resolution == resolution else get_preset(preset.name, resolution=resolution)


def _file_kind(path: Path) -> str:
    with open(path, "rb") as f:
        if not f.read(4).startswith(b"PK"):
            return "pickle"
    blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    blob = blob if isinstance(blob, dict) else {}
    if blob.get("format") in (GMPI_FORMAT, SG2_FORMAT):
        return "gmpi" if blob["format"] == GMPI_FORMAT else "stylegan2"
    return "lightning" if "state_dict" in blob and "hyper_parameters" in blob else "official"


def load_training_checkpoint(path: Path) -> tuple[nn.Module, Preset, str, str | None]:
    """G_ema of a Lightning checkpoint of GMPIModule, rebuilt from the kwargs stored with it: (G, preset, kind,
    the training data folder of its run config or None)."""
    from .nn.synthesis import Generator

    ck = torch.load(path, map_location="cpu", weights_only=True)
    hp, kwargs = ck["hyper_parameters"], ck.get("generator_init_kwargs")
    if kwargs is None:
        raise InputError(f"{path}: no generator_init_kwargs (not a GMPIModule checkpoint of this version)")
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
    """A checkpoint of any kind (module docstring) as an MPI generator on ``device``, with its preset."""
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}. Nothing is downloaded; pass a local file "
                                f"(our .pt, an official generator.pth/ema.pth, or a StyleGAN2 .pkl).")
    kind, stored, data = _file_kind(path), None, None
    if kind == "gmpi":
        blob = load_gmpi_checkpoint(path)
        G, stored, data = blob["G"], blob["preset"], (blob["extra"] or {}).get("data")
    elif kind == "lightning":
        G, stored, kind, data = load_training_checkpoint(path)
        stored = stored.to_dict()
    elif kind == "official":
        G = load_official_gmpi(path, config)
    else:
        nets = load_stylegan2_pkl(path)
        sg2 = nets.get("G_ema") or nets.get("G")
        if sg2 is None:
            raise InputError(f"{path}: holds no generator (G_ema or G)")
        G, kind = FlatMPIGenerator(sg2).eval(), "stylegan2-flat"
    return LoadedGenerator(G.to(device), _preset_for(preset, G.img_resolution, stored), kind, path, data)


_warn = warner("gmpi")


def load_gmpi(ckpt, device):
    """A GMPI generator (ours or the official release) from ``ckpt``; anything else is a clear error."""
    try:
        loaded = load_generator(ckpt, device=device)
    except FileNotFoundError:
        raise
    except Exception as e:  # the loaders' many ways of saying "not that format"
        raise InputError(f"{ckpt}: not a GMPI generator checkpoint ({type(e).__name__}: {e}); pass the .pt that "
                         f"training writes (e.g. runs/synthetic/gmpi.pt) or an official generator.pth") from None
    if not isinstance(loaded.G, GMPIGenerator):
        raise InputError(f"{ckpt}: a {loaded.kind} generator, not a GMPI one: a 2D StyleGAN2 has no geometry to "
                         f"invert into; pass a GMPI checkpoint (e.g. runs/synthetic/gmpi.pt)")
    return loaded


def load_image(path: str | Path, resolution: int, crop: bool = True, warn=_warn) -> torch.Tensor:
    """An image file as ``1 x 3 x R x R`` in [0, 1] (quantised to 8 bits, so input.png is exactly what is
    inverted), read as :func:`~gmpi_lightning.data.read_picture` reads any mode: grey or transparent images made RGB, a
    non-square image centre-cropped (with ``crop``; otherwise an error), another size resized; each change is
    reported through ``warn``."""
    from .data import read_picture

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    img, transparent, grey = read_picture(path, path)
    if grey:
        warn(f"{path}: a grey image, inverted as RGB with equal channels")
    if transparent:
        warn(f"{path}: alpha channel ignored (the RGB under its transparent pixels is inverted as it is; flatten the "
             f"image onto a background first)")
    x = torch.from_numpy(np.ascontiguousarray(img).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    h, w = x.shape[-2:]
    if h != w:
        if not crop:
            raise InputError(f"{path}: the image is {w} x {h}, not square; crop it to the face yourself, or drop "
                             f"--no-crop to centre-crop it to {min(h, w)} x {min(h, w)}")
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        warn(f"{path}: {w} x {h} is not square: centre-cropped to {side} x {side} (pass --no-crop to refuse)")
        x = x[..., top:top + side, left:left + side]
    if x.shape[-1] != resolution:
        warn(f"{path}: {x.shape[-1]} x {x.shape[-1]} resized to the generator's {resolution} x {resolution}")
        shrink = x.shape[-1] > resolution  # area: the mean of the pixels each output pixel covers
        x = F.interpolate(x, size=(resolution, resolution), mode="area" if shrink else "bicubic",
                          **({} if shrink else {"align_corners": False})).clamp(0, 1)
    return (x * 255 + 0.5).floor() / 255
