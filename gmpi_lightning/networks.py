"""The networks a training run starts from: a pretrained 2D StyleGAN2 (an NVlabs pickle or its converted ``.pt``), a
new one from scratch, or the weights of a Lightning checkpoint of the same module; and GMPI's generator and
pose-conditioned discriminator built on that backbone (docs/METHOD.md §3, §5).
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import torch

from .errors import InputError
from .hparams import Alpha, Architecture, PoseDiscriminator
from .nn.alpha import alpha_branch
from .nn.discriminator import Discriminator, PoseConditionedDiscriminator
from .nn.gmpi import GMPIGenerator
from .nn.synthesis import Generator
from .presets import Preset


def stylegan2_backbone(init_from: str | None, preset: Preset,
                       arch: Architecture = Architecture()) -> tuple[Generator, Discriminator]:
    """2D (G, D) from a StyleGAN2 file, or from scratch (``None`` or a ``.ckpt``, whose weights
    :func:`load_checkpoint_weights` puts in later) with the architecture ``arch``."""
    init = Path(init_from) if init_from else None
    if init is not None and init.suffix != ".ckpt":
        from .io import load_stylegan2_pkl

        nets = load_stylegan2_pkl(init)
        G2d, D2d = nets.get("G_ema") or nets.get("G"), nets.get("D")
        if G2d is None or G2d.img_resolution != preset.resolution:
            raise InputError(f"{init}: needs a {preset.resolution}px generator (the data's resolution), got "
                             f"{None if G2d is None else G2d.img_resolution}")
        if D2d is None:
            raise InputError(f"{init} holds no discriminator; fine-tuning starts from a pretrained D")
        return G2d, D2d
    synth = dict(channel_base=arch.channel_base or preset.channel_base, channel_max=arch.channel_max or
                 preset.channel_max, num_fp16_res=preset.num_fp16_res, conv_clamp=preset.conv_clamp)
    G2d = Generator(z_dim=arch.z_dim, c_dim=0, w_dim=arch.w_dim, img_resolution=preset.resolution, img_channels=3,
                    mapping_kwargs=dict(num_layers=arch.mapping_layers), synthesis_kwargs=synth)
    return G2d, Discriminator(c_dim=0, img_resolution=preset.resolution, img_channels=3, **synth)


def load_checkpoint_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Every weight of ``module`` from a Lightning checkpoint of the same module and architecture, read as plain data
    (code in a downloaded checkpoint never runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: not a plain-data Lightning checkpoint of this module; it holds objects that only "
                         f"run as code when loaded ({str(e).splitlines()[0]})") from None
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise InputError(f"{path}: weights do not fit this model ({type(module).__name__}); missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}. A .ckpt initialises the same module and architecture; use "
                         f"the exported .pt of a StyleGAN2 run for GMPI")


def gmpi_networks(G2d: Generator, D2d: Discriminator, preset: Preset, train_planes: int = 32, alpha: Alpha = Alpha(),
                  discriminator: PoseDiscriminator = PoseDiscriminator()) -> tuple[GMPIGenerator, Discriminator]:
    """GMPI's generator on ``G2d`` and its pose-conditioned discriminator from ``D2d`` (without pose conditioning,
    the ablation: ``D2d`` itself with GMPI's minibatch-stddev group)."""
    tokens = preset.normalized_plane_depths(train_planes).tolist() if alpha_branch(alpha.mode).uses_tokens else None
    G = GMPIGenerator.from_stylegan2(G2d, alpha_mode=alpha.mode, pos_enc_multires=alpha.pos_enc_multires,
                                     n_train_planes=train_planes, token_depths=tokens, alpha_init_gain=alpha.init_gain,
                                     alpha_init_logit=alpha.init_logit, alpha_depth_slope=alpha.depth_slope,
                                     alpha_depth_center=alpha.depth_center)
    group = discriminator.mbstd_group_size
    if discriminator.pose_conditioning:
        D = PoseConditionedDiscriminator.from_stylegan2(D2d, mbstd_group_size=group, pose_init=discriminator.pose_init)
    else:
        D = copy.deepcopy(D2d)
        D.b4.mbstd.group_size = group
    return G, D
