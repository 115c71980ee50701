"""StyleGAN2 discriminator (NVlabs StyleGAN2-ADA architecture, pure PyTorch).

``D(img B x C x R x R in [-1, 1], c) -> logits B x 1``. With ``c_dim > 0`` the logit is the projection
``<out(x), mapping(c)> / sqrt(cmap_dim)`` (projection conditioning).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from .layers import DEFAULT_FILTER, Conv2dLayer, FullyConnectedLayer, MappingNetwork, block_format, check_resolution
from .ops import assert_shape, downsample2d, normalize_2nd_moment, setup_filter


class DiscriminatorBlock(nn.Module):
    """(FromRGB) + conv + 2x down-conv, with a 1x1 down-sampling residual for ``resnet``."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int, img_channels: int,
                 first_layer_idx: int, architecture: str = "resnet", activation: str = "lrelu",
                 resample_filter: Sequence[float] = DEFAULT_FILTER, conv_clamp: float | None = None,
                 use_fp16: bool = False, fp16_channels_last: bool = False, freeze_layers: int = 0):
        super().__init__()
        if in_channels not in (0, tmp_channels):
            raise InputError(f"DiscriminatorBlock: in_channels must be 0 or {tmp_channels}, got {in_channels}")
        if architecture not in ("orig", "skip", "resnet"):
            raise InputError(f"discriminator architecture must be orig|skip|resnet, got {architecture!r}")
        self.in_channels, self.resolution, self.img_channels = in_channels, resolution, img_channels
        self.first_layer_idx, self.architecture, self.use_fp16 = first_layer_idx, architecture, use_fp16
        self.channels_last = use_fp16 and fp16_channels_last
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_layers = 0

        def trainable() -> bool:  # layers numbered from the input side; the first `freeze_layers` are frozen
            idx = self.first_layer_idx + self.num_layers
            self.num_layers += 1
            return idx >= freeze_layers

        common = dict(activation=activation, conv_clamp=conv_clamp, channels_last=self.channels_last)
        if in_channels == 0 or architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, trainable=trainable(), **common)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, trainable=trainable(), **common)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, down=2, trainable=trainable(),
                                 resample_filter=resample_filter, **common)
        if architecture == "resnet":
            self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                    trainable=trainable(), resample_filter=resample_filter,
                                    channels_last=self.channels_last)

    def forward(self, x, img, force_fp32: bool = False):
        ref = x if x is not None else img
        dtype, memory_format = block_format(self.use_fp16, self.channels_last, force_fp32, ref.device)
        if x is not None:
            assert_shape(x, [None, self.in_channels, self.resolution, self.resolution],
                         f"DiscriminatorBlock@{self.resolution} input")
            x = x.to(dtype=dtype, memory_format=memory_format)
        if self.in_channels == 0 or self.architecture == "skip":
            assert_shape(img, [None, self.img_channels, self.resolution, self.resolution],
                         f"DiscriminatorBlock@{self.resolution} img")
            img = img.to(dtype=dtype, memory_format=memory_format)
            y = self.fromrgb(img)
            x = x + y if x is not None else y
            img = downsample2d(img, self.resample_filter) if self.architecture == "skip" else None
        if self.architecture == "resnet":
            y = self.skip(x, gain=np.sqrt(0.5))
            x = self.conv0(x)
            x = self.conv1(x, gain=np.sqrt(0.5))
            return y + x, img
        return self.conv1(self.conv0(x)), img


class MinibatchStdLayer(nn.Module):
    """Appends the per-group feature std (averaged over channels and pixels) as ``num_channels`` maps.

    Groups are strided: sample n belongs to group ``n mod (N / G)``. With ``group_size=1`` the
    appended channel is the constant sqrt(1e-8) (GMPI uses this to keep samples independent).
    """

    def __init__(self, group_size: int | None, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n) if self.group_size is not None else n
        if n % g != 0:
            raise InputError(f"minibatch-stddev: batch {n} is not divisible by the group size {g}")
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)
        y = y - y.mean(dim=0)
        y = (y.square().mean(dim=0) + 1e-8).sqrt()
        y = y.mean(dim=[2, 3, 4]).reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """4x4 head: (FromRGB) + mbstd + conv + FC + output (1 logit, or cmap_dim for projection)."""

    def __init__(self, in_channels: int, cmap_dim: int, resolution: int, img_channels: int,
                 architecture: str = "resnet", mbstd_group_size: int | None = 4, mbstd_num_channels: int = 1,
                 activation: str = "lrelu", conv_clamp: float | None = None):
        super().__init__()
        self.in_channels, self.cmap_dim, self.resolution = in_channels, cmap_dim, resolution
        self.img_channels, self.architecture = img_channels, architecture
        if architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, in_channels, kernel_size=1, activation=activation)
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation=activation,
                                conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution**2, in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x, img, cmap, force_fp32: bool = False):
        assert_shape(x, [None, self.in_channels, self.resolution, self.resolution], "DiscriminatorEpilogue input")
        x = x.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        if self.architecture == "skip":
            x = x + self.fromrgb(img.to(torch.float32))
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        x = self.fc(x.flatten(1))
        x = self.out(x)
        if self.cmap_dim > 0:
            assert_shape(cmap, [x.shape[0], self.cmap_dim], "cmap")
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / np.sqrt(self.cmap_dim))
        return x


class Discriminator(nn.Module):
    """StyleGAN2 discriminator with NVlabs' constructor arguments and parameter names."""

    def __init__(self, c_dim: int, img_resolution: int, img_channels: int, architecture: str = "resnet",
                 channel_base: int = 32768, channel_max: int = 512, num_fp16_res: int = 0,
                 conv_clamp: float | None = None, cmap_dim: int | None = None, block_kwargs: dict | None = None,
                 mapping_kwargs: dict | None = None, epilogue_kwargs: dict | None = None):
        super().__init__()
        self.init_kwargs = dict(c_dim=c_dim, img_resolution=img_resolution, img_channels=img_channels,
                                architecture=architecture, channel_base=channel_base, channel_max=channel_max,
                                num_fp16_res=num_fp16_res, conv_clamp=conv_clamp, cmap_dim=cmap_dim,
                                block_kwargs=dict(block_kwargs or {}), mapping_kwargs=dict(mapping_kwargs or {}),
                                epilogue_kwargs=dict(epilogue_kwargs or {}))
        log2 = check_resolution(img_resolution, channel_base)
        self.c_dim, self.img_resolution, self.img_channels = c_dim, img_resolution, img_channels
        self.block_resolutions = [2**i for i in range(log2, 2, -1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions + [4]}
        fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)
        if cmap_dim is None:
            cmap_dim = channels[4]
        if c_dim == 0:
            cmap_dim = 0
        self.cmap_dim = cmap_dim
        common = dict(img_channels=img_channels, architecture=architecture, conv_clamp=conv_clamp)
        layer_idx = 0
        for res in self.block_resolutions:
            block = DiscriminatorBlock(channels[res] if res < img_resolution else 0, channels[res], channels[res // 2],
                                       resolution=res, first_layer_idx=layer_idx, use_fp16=(res >= fp16_resolution),
                                       **(block_kwargs or {}), **common)
            self.add_module(f"b{res}", block)
            layer_idx += block.num_layers
        if c_dim > 0:
            self.mapping = self.build_condition_mapping(c_dim, cmap_dim, mapping_kwargs or {})
        self.b4 = DiscriminatorEpilogue(channels[4], cmap_dim=cmap_dim, resolution=4, **(epilogue_kwargs or {}),
                                        **common)

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None, force_fp32: bool = False) -> torch.Tensor:
        assert_shape(img, [None, self.img_channels, self.img_resolution, self.img_resolution], "D input image")
        x = None
        for res in self.block_resolutions:
            x, img = getattr(self, f"b{res}")(x, img, force_fp32=force_fp32)
        cmap = self.embed_condition(c) if self.c_dim > 0 else None
        return self.b4(x, img, cmap)

    def build_condition_mapping(self, c_dim: int, cmap_dim: int, mapping_kwargs: dict) -> nn.Module:
        """c -> cmap network (NVlabs: an 8-layer mapping network without z)."""
        return MappingNetwork(z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None, **mapping_kwargs)

    def embed_condition(self, c: torch.Tensor | None) -> torch.Tensor:
        return self.mapping(None, c)


class PoseConditionedDiscriminator(Discriminator):
    """GMPI's discriminator (docs/METHOD.md §5): StyleGAN2 ResNet D with projection conditioning on the
    flattened world-to-camera matrix, ``cmap = normalize_2nd_moment(Linear(16, cmap_dim)(w2c))``.

    Minibatch-stddev uses group size 1 by default: a constant channel that keeps the pretrained conv
    shape while keeping samples independent (needed to score views one by one).
    """

    def __init__(self, img_resolution: int, img_channels: int = 3, c_dim: int = 16, cmap_dim: int = 16,
                 mbstd_group_size: int = 1, channel_base: int = 32768, channel_max: int = 512,
                 num_fp16_res: int = 0, conv_clamp: float | None = None, architecture: str = "resnet",
                 block_kwargs: dict | None = None, epilogue_kwargs: dict | None = None):
        epilogue = dict(epilogue_kwargs or {}, mbstd_group_size=mbstd_group_size)
        super().__init__(c_dim=c_dim, img_resolution=img_resolution, img_channels=img_channels,
                         architecture=architecture, channel_base=channel_base, channel_max=channel_max,
                         num_fp16_res=num_fp16_res, conv_clamp=conv_clamp, cmap_dim=cmap_dim,
                         block_kwargs=block_kwargs, epilogue_kwargs=epilogue)
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, c_dim=c_dim,
                                cmap_dim=cmap_dim, mbstd_group_size=mbstd_group_size, channel_base=channel_base,
                                channel_max=channel_max, num_fp16_res=num_fp16_res, conv_clamp=conv_clamp,
                                architecture=architecture, block_kwargs=dict(block_kwargs or {}),
                                epilogue_kwargs=dict(epilogue_kwargs or {}))

    def build_condition_mapping(self, c_dim: int, cmap_dim: int, mapping_kwargs: dict) -> nn.Module:
        return nn.Linear(c_dim, cmap_dim)  # PyTorch default init, as the official code

    def embed_condition(self, c: torch.Tensor | None) -> torch.Tensor:
        if c is None or c.ndim != 2 or c.shape[1] != self.c_dim:
            raise InputError(f"the pose condition must be B x {self.c_dim} (flattened w2c), got "
                             f"{None if c is None else tuple(c.shape)}")
        return normalize_2nd_moment(self.mapping(c.to(torch.float32)))

    @classmethod
    def from_stylegan2(cls, D: Discriminator, c_dim: int = 16, cmap_dim: int = 16, mbstd_group_size: int = 1,
                       pose_init: str = "official") -> PoseConditionedDiscriminator:
        """Pose-conditioned D initialised from an unconditional pretrained D.

        ``pose_init`` says how the new parts start:

        ``official``
            the pretrained 1-row output layer broadcast to all ``cmap_dim`` rows and the pose mapping at PyTorch's
            default init (the official weight copy). The logit is then the pretrained one times the pose-dependent
            gain ``sum(cmap(c)) / sqrt(cmap_dim)``, whose size and sign depend only on the random init
            (:func:`pose_gain` measures it): it can call every real image fake, or flip sign across the poses.
        ``pretrained_logit``
            the logit equals the pretrained logit at every pose: pose mapping weight 0 and bias 1 (so ``cmap`` is
            all ones whatever the pose), and output row ``i`` is the pretrained row times
            ``(1 + delta_i) / sqrt(cmap_dim)`` with ``delta`` a fixed zero-mean pattern (``sum(rows) / sqrt(cmap_dim)``
            is the pretrained row). ``delta`` breaks the symmetry between the rows: with identical rows the
            gradient reaching the pose mapping through the normalisation is exactly zero and D would never learn
            to use the pose.
        """
        if D.c_dim != 0:
            raise InputError("from_stylegan2 expects an unconditional discriminator (c_dim = 0)")
        if pose_init not in POSE_INITS:
            raise InputError(f"pose_init must be one of {POSE_INITS}, got {pose_init!r}")
        kw = D.init_kwargs
        new = cls(img_resolution=kw["img_resolution"], img_channels=kw["img_channels"], c_dim=c_dim,
                  cmap_dim=cmap_dim, mbstd_group_size=mbstd_group_size, channel_base=kw["channel_base"],
                  channel_max=kw["channel_max"], num_fp16_res=kw["num_fp16_res"], conv_clamp=kw["conv_clamp"],
                  architecture=kw["architecture"], block_kwargs=kw["block_kwargs"],
                  epilogue_kwargs={k: v for k, v in kw["epilogue_kwargs"].items() if k != "mbstd_group_size"})
        own = new.state_dict()
        with torch.no_grad():
            for name, t in D.state_dict().items():
                if name not in own:
                    raise InputError(f"pretrained D tensor {name} has no counterpart in the pose-conditioned D")
                own[name].copy_(t.expand_as(own[name]) if name.startswith("b4.out.") else t)
            if pose_init == "pretrained_logit":
                rows = (1 + row_pattern(cmap_dim)) / math.sqrt(cmap_dim)
                own["b4.out.weight"].mul_(rows[:, None])
                own["b4.out.bias"].mul_(rows)
                own["mapping.weight"].zero_()
                own["mapping.bias"].fill_(1.0)
        new.load_state_dict(own)
        return new.to(next(D.parameters()).device)


POSE_INITS = ("official", "pretrained_logit")


def row_pattern(n: int, amplitude: float = 0.5) -> torch.Tensor:
    """A fixed zero-mean pattern of ``n`` numbers (a cosine over the rows), the rows' spread in ``pretrained_logit``."""
    return amplitude * torch.cos(2 * math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n).float()


@torch.no_grad()
def pose_gain(D: PoseConditionedDiscriminator, w2c_flat: torch.Tensor) -> torch.Tensor:
    """What the pose condition multiplies a logit by when every output row is the same (the official start):
    ``sum(cmap(c)) / sqrt(cmap_dim)`` per pose (B). 1 everywhere = the pretrained verdict at every pose."""
    return D.embed_condition(w2c_flat).sum(1) / math.sqrt(D.cmap_dim)
