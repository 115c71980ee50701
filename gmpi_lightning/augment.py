"""Pose-safe adaptive augmentation of what the discriminator sees: StyleGAN2-ADA's method under GMPI's constraint
(docs/SMALL_DATA.md: the transforms, why each keeps the camera label true, why the others are refused).

D is conditioned on the camera, so :class:`PoseSafeAugment` only uses transforms after which the label is still true
of the picture (:data:`OPS`: a whole-pixel translate, which only moves the principal point; brightness; contrast;
cutout), each applied to each image independently with probability ``p``. Every parameter is drawn from the caller's
``torch.Generator`` (the training module's per-rank stream), the same number of draws whatever ``p`` is; an image
not augmented by a transform gets its identity parameters. kornia's modules only apply the parameters (left to
themselves they would draw from torch's global generator). :class:`AdaptiveP` is StyleGAN2-ADA's controller of ``p``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import kornia.augmentation as K
import torch
from torch import nn

from .errors import InputError

OPS = ("translate", "brightness", "contrast", "cutout")  # applied in this order
NOT_POSE_SAFE = {
    "xflip": "it mirrors the head, so the camera label would have to be mirrored with it; use the data's xflip "
             "(--data.xflip=true), which mirrors image and pose together",
    "rotate": "a rotated picture is what a camera rolled about its axis sees, not the labelled camera",
    "scale": "a zoomed picture is what a closer camera (or a longer lens) sees, not the labelled camera",
    "aniso": "a stretched picture is seen by no camera with the preset's intrinsics",
    "xfrac": "fractional shifts resample the picture; the whole-pixel translate is the pose-safe shift",
}


def check_ops(ops: Sequence[str]) -> tuple[str, ...]:
    """``ops`` in application order, or a ValueError naming the option and the transforms allowed."""
    ops = tuple(ops)
    for op in ops:
        if op in NOT_POSE_SAFE:
            raise InputError(f"augment.ops: {op!r} is not pose-safe for a camera-conditioned D: {NOT_POSE_SAFE[op]}. "
                             f"Pose-safe transforms: {', '.join(OPS)}")
        if op not in OPS:
            raise InputError(f"augment.ops: unknown transform {op!r}; choose from {', '.join(OPS)}")
    if not ops:
        raise InputError(f"augment.ops is empty: name at least one of {', '.join(OPS)}, or set augment.mode: none")
    return tuple(op for op in OPS if op in ops)


class PoseSafeAugment(nn.Module):
    """B x C x H x W images in [-1, 1] -> the same shape, each transform of ``ops`` applied to each image with
    probability ``p``. Differentiable (twice: R1 differentiates D's gradient through it). No state of its own.

    Args:
        ops: transforms to use (:data:`OPS`).
        translate: largest shift as a fraction of the image side (rounded to whole pixels).
        brightness_std, contrast_std: std of the added offset and of the log2 of the contrast factor.
        cutout_size: side of the cutout square as a fraction of the image side.
    """

    def __init__(self, ops: Sequence[str] = OPS, translate: float = 1 / 16, brightness_std: float = 0.2,
                 contrast_std: float = 0.5, cutout_size: float = 0.5):
        super().__init__()
        self.ops = check_ops(ops)
        self.translate, self.brightness_std, self.contrast_std = translate, brightness_std, contrast_std
        self.cutout_size = cutout_size
        # p=1: kornia applies the parameters given to every image (the per-image choice is in the parameters). Kept
        # out of the module tree: their own sampling ranges are unused and would only add entries to checkpoints.
        self._kornia = {"translate": K.RandomTranslate((-1.0, 1.0), (-1.0, 1.0), padding_mode="reflection", p=1.0),
                        "brightness": K.RandomBrightness(clip_output=False, p=1.0),
                        "contrast": K.RandomContrast(clip_output=False, p=1.0),
                        "cutout": K.RandomErasing(value=0.0, p=1.0)}

    def sample(self, n: int, height: int, width: int, p: torch.Tensor, generator: torch.Generator) -> dict:
        """kornia parameters of every op for n images: the sampled value where a uniform draw is below ``p``, the
        identity elsewhere (no shift, offset 0, factor 1, an empty box)."""
        dev = generator.device
        p = torch.as_tensor(p, device=dev, dtype=torch.float32)
        size = torch.tensor([width, height], device=dev, dtype=torch.float32)
        params = {}
        for op in self.ops:
            on = torch.rand(n, generator=generator, device=dev) < p
            if op == "translate":
                shift = torch.round((torch.rand(n, 2, generator=generator, device=dev) * 2 - 1) * self.translate * size)
                shift = torch.where(on[:, None], shift, 0.0)
                params[op] = {"translate_x": shift[:, 0], "translate_y": shift[:, 1]}
            elif op == "brightness":
                offset = torch.randn(n, generator=generator, device=dev) * self.brightness_std
                params[op] = {"brightness_factor": 1 + torch.where(on, offset, 0.0)}
            elif op == "contrast":
                factor = torch.exp2(torch.randn(n, generator=generator, device=dev) * self.contrast_std)
                params[op] = {"contrast_factor": torch.where(on, factor, 1.0)}
            else:  # cutout: boxes partly outside the image are clipped by kornia
                centre = torch.rand(n, 2, generator=generator, device=dev)
                side = size * self.cutout_size
                start = torch.round(centre * size - side / 2)
                extent = torch.where(on[:, None], torch.round(side).expand(n, 2), 0.0)
                params[op] = {"xs": start[:, 0], "ys": start[:, 1], "widths": extent[:, 0], "heights": extent[:, 1],
                              "values": torch.zeros(n, device=dev)}
        return params

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """``images`` transformed with the parameters of :meth:`sample`."""
        for op in self.ops:
            images = self._kornia[op](images, params=dict(params[op]))
        return images

    def forward(self, images: torch.Tensor, p: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
        if images.ndim != 4:
            raise InputError(f"PoseSafeAugment expects B x C x H x W images, got shape {tuple(images.shape)}")
        if images.device != generator.device:
            raise InputError(f"PoseSafeAugment: images on {images.device} but the random generator on "
                             f"{generator.device}; draw from a generator on the images' device")
        b, _, h, w = images.shape
        return self.apply(images, self.sample(b, h, w, p, generator))

    def extra_repr(self) -> str:
        return f"ops={','.join(self.ops)}, translate={self.translate:g}, cutout_size={self.cutout_size:g}"


class AdaptiveP(nn.Module):
    """StyleGAN2-ADA's controller of the augmentation probability ``p`` from r_t = E[sign(D(real))] over the reals
    since the last update (0: D's logits on them as often negative as positive, 1: all positive, memorised). Each
    update moves p by ``sign(r_t - target) * N / (kimg * 1000)`` (N: reals counted over all ranks, through
    ``reduce``), within [0, 1]; ``adaptive=False`` keeps p where it started.

    State: ``p`` (the same on every rank) and ``signs`` = (sum of signs, count) since the last update (per rank):
    non-persistent buffers, so they follow the module's device; the training module checkpoints them.
    """

    def __init__(self, p: float = 0.0, target: float = 0.6, kimg: float = 100.0, adaptive: bool = True):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise InputError(f"augment.p must be a probability in [0, 1], got {p}")
        if not 0.0 < target < 1.0:
            raise InputError(f"augment.target must lie strictly between 0 and 1 (StyleGAN2-ADA: 0.6), got {target}")
        if kimg <= 0:
            raise InputError(f"augment.kimg must be > 0 (thousands of reals for p to move from 0 to 1), got {kimg}")
        self.target, self.kimg, self.adaptive = target, kimg, adaptive
        self.register_buffer("p", torch.tensor(float(p)), persistent=False)
        self.register_buffer("signs", torch.zeros(2), persistent=False)

    @torch.no_grad()
    def observe(self, real_logits: torch.Tensor) -> None:
        """Count the signs of D's logits on a batch of reals."""
        s = real_logits.detach().float().sign()
        self.signs += torch.stack([s.sum(), torch.ones_like(s).sum()])

    @torch.no_grad()
    def update(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Move p from the signs counted since the last update (summed over ranks by ``reduce``), start counting
        afresh, and return r_t. Reads nothing back to the host."""
        total = self.signs.clone() if reduce is None else reduce(self.signs.clone())
        rt = total[0] / total[1].clamp_min(1)
        if self.adaptive:
            self.p.copy_((self.p + torch.sign(rt - self.target) * total[1] / (self.kimg * 1000)).clamp(0.0, 1.0))
        self.signs.zero_()
        return rt

    def extra_repr(self) -> str:
        return f"target={self.target:g}, kimg={self.kimg:g}, adaptive={self.adaptive}"
