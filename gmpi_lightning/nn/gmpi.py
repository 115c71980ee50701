"""The GMPI generator: StyleGAN2 synthesis + an alpha branch + a background plane (docs/METHOD.md).

Output: an MPI ``B x L x 4 x R x R`` in [0, 1], plane 0 nearest. All foreground planes share one RGB
image (the StyleGAN2 ToRGB skip sum); the farthest plane's RGB is a background synthesised from the
left/right border features; alpha comes from the alpha branch selected by ``alpha_mode`` (:mod:`.alpha`: the paper's
``normalize_add_z``, ``add_z``, ``learnable_tokens``, ``vanilla``, ``depth2alpha``). ``pos_enc_multires > 0`` feeds
``[z, sin(2^k z), cos(2^k z)]`` to the depth MLP instead of z.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError
from .alpha import alpha_branch
from .layers import MappingNetwork
from .ops import upsample2d
from .synthesis import Generator, SynthesisBlock, SynthesisNetwork

FINAL_ACTIVATIONS = ("tanh", "sigmoid", "none")


def positional_encoding(z: torch.Tensor, multires: int) -> torch.Tensor:
    """L -> L x (1 + 2M): [z, sin(f_0 z), cos(f_0 z), ...] with f_k = 2^k (no pi)."""
    feats = [z[:, None]]
    for f in 2.0 ** torch.linspace(0, multires - 1, multires):
        feats += [torch.sin(z[:, None] * f), torch.cos(z[:, None] * f)]
    return torch.cat(feats, dim=1)


def border_background(x: torch.Tensor, ratio: float = 0.05) -> torch.Tensor:
    """Background features: left/right borders of x kept, interior columns blended between the
    columns just inside them. Built without gradient (only ToRGB learns from the background)."""
    with torch.no_grad():
        r = x.shape[-1]
        pad = max(1, int(math.floor(ratio * r)))
        t = (torch.arange(pad, r - pad, device=x.device, dtype=x.dtype) - pad) / (r - 2 * pad + 1e-8)
        out = x.detach().clone()
        out[..., pad:r - pad] = x[..., pad:pad + 1] * (1 - t) + x[..., r - pad - 1:r - pad] * t
    return out


class GMPISynthesisBlock(SynthesisBlock):
    """A StyleGAN2 synthesis block plus its alpha branch's layers (official names: ``pos_enc_embed``, ``toalpha``,
    ``plane_tokens``, ``todepth``)."""

    def __init__(self, *args, alpha_mode: str, pos_enc_multires: int, n_train_planes: int,
                 gen_alpha_largest_res: int, **kwargs):  # GMPIGenerator's settings (its defaults are the only ones)
        super().__init__(*args, **kwargs)
        self.alpha = alpha_branch(alpha_mode)
        self.gen_alpha = self.alpha.any_resolution or self.resolution <= gen_alpha_largest_res
        if self.gen_alpha:
            self.alpha.build(self, self.out_channels, self.w_dim, kwargs.get("conv_clamp"), n_train_planes,
                             pos_enc_multires)
        if "pos_enc_embed" in self._modules:  # official parameter order (matters for torch_ema files)
            self._modules = {"pos_enc_embed": self._modules.pop("pos_enc_embed"), **self._modules}

    def alpha_features(self, x: torch.Tensor, w_conv1: torch.Tensor, w_rgba: torch.Tensor) -> dict | None:
        return self.alpha.features(self, x.to(torch.float32), w_conv1, w_rgba) if self.gen_alpha else None


class GMPISynthesisNetwork(SynthesisNetwork):
    block_class = GMPISynthesisBlock


def token_interpolation(query: torch.Tensor, token_depths: torch.Tensor) -> torch.Tensor:
    """Lq x Lt weights: linear interpolation between the neighbouring training depths (clamped)."""
    q = query.to(torch.float64).clamp(float(token_depths[0]), float(token_depths[-1]))
    t = token_depths.to(torch.float64)
    hi = torch.searchsorted(t, q).clamp(1, len(t) - 1)
    lo = hi - 1
    lam = (q - t[lo]) / (t[hi] - t[lo])
    w = torch.zeros(len(q), len(t), dtype=torch.float64)
    w[torch.arange(len(q)), lo] = 1 - lam
    w[torch.arange(len(q)), hi] += lam
    return w.to(torch.float32)


class GMPIGenerator(nn.Module):
    """``G(z, c=None, plane_depths=...) -> MPI B x L x 4 x R x R`` in [0, 1] (plane 0 nearest).

    ``plane_depths`` are the *normalised* depths in [0, 1] fed to the alpha branch (see
    :meth:`~gmpi_lightning.presets.Preset.normalized_plane_depths`); any L works except for the
    ``vanilla`` branch, which is fixed at ``n_train_planes``.

    Where the new alpha branch starts (the official code: StyleGAN2's initialisation, ``gain 1, logit 0``):
    ``alpha_init_gain`` scales the ToAlpha weights (per-pixel and per-plane terms alike), ``alpha_init_logit`` sets
    the logit of every plane. ``alpha_depth_slope`` (0: off, the official architecture) adds a fixed ramp
    ``slope * (d - alpha_depth_center)`` to the logit of the plane at normalised depth ``d``: with a steep slope a
    pixel turns opaque at the plane where its own logit crosses the ramp, so the start is an opaque layer at
    ``alpha_depth_center`` and a per-pixel logit change of ``slope * dz`` moves a pixel's depth by ``dz``.
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int = 3,
                 mapping_kwargs: dict | None = None, synthesis_kwargs: dict | None = None,
                 alpha_mode: str = "normalize_add_z", pos_enc_multires: int = 0, n_train_planes: int = 32,
                 token_depths: list[float] | None = None, gen_alpha_largest_res: int = 256,
                 separate_background: bool = True, background_ratio: float = 0.05,
                 background_alpha_full: bool = True, final_activation: str = "tanh",
                 depth2alpha_z_range: float = 1.0, depth2alpha_n_z_bins: int = 256,
                 alpha_init_gain: float = 1.0, alpha_init_logit: float = 0.0, alpha_depth_slope: float = 0.0,
                 alpha_depth_center: float = 0.0):
        super().__init__()
        if final_activation not in FINAL_ACTIVATIONS:
            raise InputError(f"final_activation must be one of {FINAL_ACTIVATIONS}, got {final_activation!r}")
        if img_channels != 3:
            raise InputError("GMPI generates RGB planes: img_channels must be 3")
        self.init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.init_kwargs["mapping_kwargs"] = dict(mapping_kwargs or {})
        self.init_kwargs["synthesis_kwargs"] = dict(synthesis_kwargs or {})
        self.z_dim, self.c_dim, self.w_dim, self.img_resolution = z_dim, c_dim, w_dim, img_resolution
        self.alpha_mode, self.n_train_planes, self.pos_enc_multires = alpha_mode, n_train_planes, pos_enc_multires
        self.alpha = alpha_branch(alpha_mode)
        self.separate_background, self.background_ratio = separate_background, background_ratio
        self.background_alpha_full = background_alpha_full and not self.alpha.fixed_planes
        self.final_activation = final_activation
        if alpha_depth_slope and not self.alpha.per_plane_logits:
            raise InputError(f"alpha_depth_slope offsets per-plane alpha logits; {alpha_mode} has none")
        self.alpha_depth_slope, self.alpha_depth_center = float(alpha_depth_slope), float(alpha_depth_center)
        self.depth2alpha_delta = depth2alpha_z_range / depth2alpha_n_z_bins
        self.synthesis = GMPISynthesisNetwork(
            w_dim=w_dim, img_resolution=img_resolution, img_channels=3, alpha_mode=alpha_mode,
            pos_enc_multires=pos_enc_multires, n_train_planes=n_train_planes,
            gen_alpha_largest_res=gen_alpha_largest_res, **(synthesis_kwargs or {}))
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws,
                                      **(mapping_kwargs or {}))
        self._init_alpha(alpha_init_gain, alpha_init_logit)
        if self.alpha.uses_tokens:
            td = torch.linspace(0, 1, n_train_planes) if token_depths is None else torch.tensor(token_depths)
            if td.shape != (n_train_planes,) or bool((td[1:] <= td[:-1]).any()):
                raise InputError(f"token_depths must be {n_train_planes} increasing normalised depths")
            self.register_buffer("token_depths", td.to(torch.float32))

    # ------------------------------------------------------------------------------------------ build
    @torch.no_grad()
    def _init_alpha(self, gain: float, logit: float) -> None:
        """Optional start for the new alpha branch (official: gain 1, logit 0, i.e. StyleGAN2 defaults).
        ``gain`` scales the ToAlpha weights (small: soft alphas instead of per-pixel 0/1); ``logit`` is the
        initial alpha logit of every plane, split over the blocks (negative: a transparent start)."""
        heads = [b.toalpha for b in self.synthesis.blocks() if b.gen_alpha and hasattr(b, "toalpha")]
        for head in heads:
            head.weight.mul_(gain)
            head.bias.fill_(logit / len(heads))

    @classmethod
    def from_stylegan2(cls, G: Generator, **gmpi_kwargs) -> GMPIGenerator:
        """A GMPI generator whose backbone is ``G`` (e.g. an imported G_ema); new modules initialised as
        the official code does (StyleGAN2 defaults: N(0, 1) weights, affine biases 1, other biases 0)."""
        gmpi = cls(**G.init_kwargs, **gmpi_kwargs)
        missing, unexpected = gmpi.load_state_dict(G.state_dict(), strict=False)
        new = ("pos_enc_embed", "toalpha", "todepth", "plane_tokens", "token_depths")
        if unexpected or any(not any(n in k for n in new) for k in missing):
            raise InputError(f"StyleGAN2 weights do not fit the GMPI backbone: unexpected {unexpected[:5]}, "
                             f"missing {[k for k in missing if not any(n in k for n in new)][:5]}")
        return gmpi.to(next(G.parameters()).device)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, plane_depths: torch.Tensor | None = None,
                truncation_psi: float = 1.0, truncation_cutoff: int | None = None, noise_mode: str = "const",
                plane_chunk: int | None = None, force_fp32: bool = False, fused_modconv: bool | None = None,
                opaque_background: bool | None = None, noise_generator: torch.Generator | None = None,
                check_planes: bool = True) -> torch.Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesize(ws, plane_depths, noise_mode=noise_mode, plane_chunk=plane_chunk,
                               force_fp32=force_fp32, fused_modconv=fused_modconv,
                               opaque_background=opaque_background, noise_generator=noise_generator,
                               check_planes=check_planes)

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_activation == "tanh":
            return (torch.tanh(x) + 1) / 2
        if self.final_activation == "sigmoid":
            return torch.sigmoid(x)
        return (x.clamp(-1, 1) + 1) / 2

    def _check_planes(self, plane_depths, values: bool = True) -> torch.Tensor:
        if plane_depths is None:
            raise InputError("plane_depths (normalised, L values in [0, 1], index 0 nearest) are required; "
                             "e.g. get_preset('FFHQ256').normalized_plane_depths(32)")
        d = torch.as_tensor(plane_depths, dtype=torch.float32).reshape(-1)
        if d.numel() < 2 or (values and not bool(torch.isfinite(d).all())):
            raise InputError(f"plane_depths must hold at least 2 finite values, got {d.tolist()}")
        if self.alpha.fixed_planes and d.numel() != self.n_train_planes:
            raise InputError(f"the vanilla alpha branch generates exactly {self.n_train_planes} planes, "
                             f"got {d.numel()} plane depths")
        return d

    def synthesize(self, ws: torch.Tensor, plane_depths, noise_mode: str = "const", plane_chunk: int | None = None,
                   force_fp32: bool = False, fused_modconv: bool | None = None,
                   opaque_background: bool | None = None, noise_generator: torch.Generator | None = None,
                   check_planes: bool = True) -> torch.Tensor:
        """ws (B x num_ws x w_dim) -> MPI B x L x 4 x R x R (random noise drawn from ``noise_generator``).
        ``check_planes=False`` skips reading the depths' values (a :class:`~gmpi_lightning.planes.Planes` checked them).

        ``opaque_background`` overrides ``background_alpha_full`` (mesh extraction turns it off)."""
        depths = self._check_planes(plane_depths, check_planes)
        n_planes = depths.numel()
        rgb = bg = x = None
        alpha_feats = []
        for block, bws in zip(self.synthesis.blocks(), self.synthesis.split_ws(ws)):
            x, fused = block.forward_features(x, bws, force_fp32, fused_modconv, noise_mode, noise_generator)
            w_rgba, w_conv1 = bws[:, block.num_conv], bws[:, block.num_conv - 1]
            if rgb is not None:
                rgb = upsample2d(rgb, block.resample_filter)
                bg = upsample2d(bg, block.resample_filter) if bg is not None else None
            y = block.torgb(x, w_rgba, fused_modconv=fused).to(torch.float32)
            rgb = y if rgb is None else rgb + y
            if self.separate_background:
                y = block.torgb(border_background(x, self.background_ratio), w_rgba, fused_modconv=fused)
                bg = y.to(torch.float32) if bg is None else bg + y.to(torch.float32)
            alpha_feats.append(block.alpha_features(x, w_conv1, w_rgba))

        alpha = torch.cat([self._alpha_chunk(alpha_feats, depths[i:i + (plane_chunk or n_planes)])
                           for i in range(0, n_planes, plane_chunk or n_planes)], dim=1)
        rgb = self._activation(rgb)
        bg = self._activation(bg) if bg is not None else rgb
        b, r = rgb.shape[0], rgb.shape[-1]
        mpi = torch.cat([rgb[:, None].expand(b, n_planes - 1, 3, r, r), bg[:, None]], dim=1)
        if self.background_alpha_full if opaque_background is None else opaque_background:
            alpha = torch.cat([alpha[:, :-1], torch.ones_like(alpha[:, -1:])], dim=1)
        return torch.cat([mpi, alpha[:, :, None]], dim=2)

    def _alpha_chunk(self, feats: list, depths: torch.Tensor) -> torch.Tensor:
        """Alpha (after the final activation) for one chunk of planes: B x Lc x R x R."""
        device = next(self.parameters()).device
        code = positional_encoding(depths, self.pos_enc_multires).to(device)
        token_w = token_interpolation(depths, self.token_depths).to(device) if self.alpha.uses_tokens else None
        acc = None
        for block, f in zip(self.synthesis.blocks(), feats):
            if acc is not None:
                acc = upsample2d(acc, block.resample_filter)
            if f is not None:
                y = block.alpha.logits(block, f, code, token_w)
                acc = y if acc is None else acc + y
        if self.alpha_depth_slope:  # a fixed ramp over the planes (see the class docstring)
            d = depths.to(device=device, dtype=acc.dtype)
            acc = acc + self.alpha_depth_slope * (d - self.alpha_depth_center)[None, :, None, None]
        if not self.alpha.per_plane_logits:  # depth2alpha, a soft step: planes behind the predicted surface are opaque
            surface = self._activation(acc)  # B x 1 x R x R in [0, 1]
            d = depths.to(device)[None, :, None, None]
            return ((d - surface) / (2 * self.depth2alpha_delta) + 0.5).clamp(0, 1)
        return self._activation(acc)

    def extra_repr(self) -> str:
        return f"alpha_mode={self.alpha_mode}, resolution={self.img_resolution}, num_ws={self.num_ws}"


class FlatMPIGenerator(nn.Module):
    """A pretrained 2D StyleGAN2 as an MPI: its image, mapped to [0, 1], on the nearest plane, fully opaque
    (GMPI's 'flat billboard' sanity baseline). Same call signature as :class:`GMPIGenerator`."""

    def __init__(self, G: Generator):
        super().__init__()
        self.G, self.z_dim, self.c_dim, self.img_resolution = G, G.z_dim, G.c_dim, G.img_resolution
        self.mapping = G.mapping

    def forward(self, z, c=None, plane_depths=None, truncation_psi: float = 1.0, truncation_cutoff=None,
                noise_mode: str = "const", plane_chunk=None, opaque_background=None, noise_generator=None,
                **kwargs) -> torch.Tensor:
        n = torch.as_tensor(plane_depths).numel()
        img = self.G(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff, noise_mode=noise_mode,
                     noise_generator=noise_generator)
        rgb = ((img + 1) / 2).clamp(0, 1)
        mpi = torch.zeros(img.shape[0], n, 4, *img.shape[-2:], device=img.device)
        mpi[:, 0, :3], mpi[:, 0, 3] = rgb, 1.0
        return mpi
