"""The alpha branches of the GMPI generator, one class each, keyed by the names the configs use (``alpha_mode``).

========================  ==========================================================================
``normalize_add_z``       the paper: ToAlpha(instance_norm(x) + e(z_i)); e is a 4-layer MLP on the
                          plane's normalised depth, style-modulated by the block's conv1 w
``add_z``                 as above without the instance normalisation
``learnable_tokens``      e is a learned token per training plane (interpolated in depth for other L)
``vanilla``               one ToAlpha with L outputs per block (L fixed at n_train_planes)
``depth2alpha``           one predicted depth map D; alpha_i = clamp((z_i - D) / (2 delta) + 1/2, 0, 1)
========================  ==========================================================================

A branch is a strategy, not a module: it creates its layers on the synthesis block under the official names
(``pos_enc_embed``, ``toalpha``, ``plane_tokens``, ``todepth``), so released checkpoints load unchanged. Per block it
computes what does not depend on the planes once (:meth:`AlphaBranch.features`), then the logits of any chunk of
planes (:meth:`AlphaBranch.logits`).

ToAlpha is linear in its input, so ``ToAlpha(x_hat + e_i)`` is computed as ``ToAlpha-without-bias(x_hat)`` (one
R x R map per sample) plus a per-plane scalar: memory O(B C R^2 + B L R^2) instead of O(B L C R^2), and chunks of
planes give exactly the MPI of one chunk (the backbone runs once).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from .layers import FullyConnectedLayer
from .ops import bias_act
from .synthesis import ToRGBLayer


class DepthEmbedding(nn.Module):
    """Style-modulated 1x1-conv MLP on the depth code: in -> C/4 -> C/2 -> C -> C, lrelu*sqrt(2) after each layer.

    Parameter names follow the official ``pos_enc_embed`` module (weight1..4, bias1..4, affine1..4).
    """

    def __init__(self, in_features: int, channels: int, w_dim: int, conv_clamp: float | None = None):
        super().__init__()
        self.dims = [in_features, channels // 4, channels // 2, channels, channels]
        self.conv_clamp = conv_clamp
        for k in range(1, 5):
            self.register_parameter(f"weight{k}", nn.Parameter(torch.randn(self.dims[k], self.dims[k - 1], 1, 1)))
            self.register_parameter(f"bias{k}", nn.Parameter(torch.zeros(self.dims[k])))
        for k in range(1, 5):
            self.add_module(f"affine{k}", FullyConnectedLayer(w_dim, self.dims[k - 1], bias_init=1))

    def forward(self, code: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """code: L x in (shared by the batch), w: B x w_dim -> B x L x C."""
        h = code.to(w.dtype)[None].expand(w.shape[0], -1, -1)
        for k in range(1, 5):
            styles = getattr(self, f"affine{k}")(w) / np.sqrt(self.dims[k - 1])
            weight = getattr(self, f"weight{k}")[:, :, 0, 0]
            h = torch.einsum("oi,bi,bli->blo", weight, styles, h)
            h = bias_act(h, getattr(self, f"bias{k}"), dim=2, act="lrelu", clamp=self.conv_clamp)
        return h


def instance_normalize(x: torch.Tensor) -> torch.Tensor:
    """Per sample and channel over pixels: (x - mean) / (sqrt(unbiased var + 1e-8) + 1e-8)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = (x.var(dim=(2, 3), keepdim=True, unbiased=True) + 1e-8).sqrt()
    return (x - mean) / (std + 1e-8)


class AlphaBranch:
    """How one variant makes alpha. Class attributes say what the rest of the code may rely on."""

    name = ""
    fixed_planes = False       # generates exactly n_train_planes planes (no other plane count, no dense volume)
    per_plane_logits = True    # logits per plane (False: one surface map turned into alphas, depth2alpha)
    uses_tokens = False        # learnable per-plane tokens, interpolated in depth
    any_resolution = False     # makes alpha at every block, not only up to gen_alpha_largest_res

    def build(self, block, channels: int, w_dim: int, clamp, n_train_planes: int, pos_enc_multires: int) -> None:
        block.toalpha = ToRGBLayer(channels, 1, w_dim=w_dim, conv_clamp=clamp)

    def features(self, block, x: torch.Tensor, w_conv1: torch.Tensor, w_rgba: torch.Tensor) -> dict:
        """What the branch needs from this block that does not depend on the planes."""
        raise NotImplementedError

    def logits(self, block, feats: dict, depth_code: torch.Tensor, token_weights) -> torch.Tensor:
        """Alpha logits B x Lc x R x R (or B x 1 x R x R without per-plane logits)."""
        raise NotImplementedError


class DepthAddedAlpha(AlphaBranch):
    """``add_z``: ToAlpha(x + e(z_i)) with e an MLP on the plane's (encoded) normalised depth."""

    name, normalize = "add_z", False

    def build(self, block, channels, w_dim, clamp, n_train_planes, pos_enc_multires):
        block.pos_enc_embed = DepthEmbedding(1 + 2 * pos_enc_multires, channels, w_dim, clamp)
        super().build(block, channels, w_dim, clamp, n_train_planes, pos_enc_multires)

    def features(self, block, x, w_conv1, w_rgba):
        # ToAlpha(h) = sum_c k[b, c] h[b, c] + bias, with k = weight * styles.
        k = block.toalpha.weight[0, :, 0, 0] * block.toalpha.affine(w_rgba) * block.toalpha.weight_gain  # B x C
        feat = instance_normalize(x) if self.normalize else x
        return {"map": torch.einsum("bc,bchw->bhw", k, feat), "k": k, "w_conv1": w_conv1}

    def plane_embedding(self, block, feats, depth_code, token_weights) -> torch.Tensor:
        return block.pos_enc_embed(depth_code, feats["w_conv1"])  # B x Lc x C

    def logits(self, block, feats, depth_code, token_weights):
        emb = self.plane_embedding(block, feats, depth_code, token_weights)
        per_plane = (emb * feats["k"][:, None]).sum(-1)  # B x Lc
        logits = feats["map"][:, None] + per_plane[:, :, None, None] + block.toalpha.bias[0]
        return bias_act(logits, clamp=block.toalpha.conv_clamp)


class NormalizedDepthAddedAlpha(DepthAddedAlpha):
    """``normalize_add_z`` (the paper): ToAlpha(instance_norm(x) + e(z_i))."""

    name, normalize = "normalize_add_z", True


class TokenAlpha(NormalizedDepthAddedAlpha):
    """``learnable_tokens``: ToAlpha(instance_norm(x) + t_i) with a learned token per training plane."""

    name, uses_tokens = "learnable_tokens", True

    def build(self, block, channels, w_dim, clamp, n_train_planes, pos_enc_multires):
        block.plane_tokens = nn.Parameter(torch.rand(1, n_train_planes, channels))
        AlphaBranch.build(self, block, channels, w_dim, clamp, n_train_planes, pos_enc_multires)

    def plane_embedding(self, block, feats, depth_code, token_weights):
        return (token_weights @ block.plane_tokens[0])[None]  # 1 x Lc x C


class VanillaAlpha(AlphaBranch):
    """``vanilla``: one ToAlpha with a channel per training plane (no depth conditioning)."""

    name, fixed_planes, any_resolution = "vanilla", True, True

    def build(self, block, channels, w_dim, clamp, n_train_planes, pos_enc_multires):
        block.toalpha = ToRGBLayer(channels, n_train_planes, w_dim=w_dim, conv_clamp=clamp)

    def features(self, block, x, w_conv1, w_rgba):
        return {"logits": block.toalpha(x, w_rgba)}

    def logits(self, block, feats, depth_code, token_weights):
        return feats["logits"]


class DepthToAlpha(VanillaAlpha):
    """``depth2alpha``: one predicted surface depth per pixel; planes behind it are opaque (a soft step)."""

    name, fixed_planes, per_plane_logits, any_resolution = "depth2alpha", False, False, False

    def build(self, block, channels, w_dim, clamp, n_train_planes, pos_enc_multires):
        block.todepth = ToRGBLayer(channels, 1, w_dim=w_dim, conv_clamp=clamp)

    def features(self, block, x, w_conv1, w_rgba):
        return {"logits": block.todepth(x, w_rgba)}


ALPHA_MODES = {cls.name: cls() for cls in (NormalizedDepthAddedAlpha, DepthAddedAlpha, TokenAlpha, VanillaAlpha,
                                            DepthToAlpha)}


def fixed_planes(G) -> bool:
    """Whether generator ``G`` makes only its training planes (the vanilla branch), not any plane count or volume."""
    return bool(getattr(getattr(G, "alpha", None), "fixed_planes", False))


def alpha_branch(name: str) -> AlphaBranch:
    if name not in ALPHA_MODES:
        raise InputError(f"unknown alpha_mode {name!r}; expected one of {tuple(ALPHA_MODES)}")
    return ALPHA_MODES[name]
