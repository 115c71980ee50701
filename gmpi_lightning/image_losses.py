"""Image reconstruction losses and scores: what inversion and the pose search minimise (L1 + a pyramid of SSIM, no
pretrained weights) and what they report (PSNR, SSIM)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mean(x: torch.Tensor, per_sample: bool) -> torch.Tensor:
    return x.mean((1, 2, 3)) if per_sample else x.mean()


def pyramid_ssim_loss(x: torch.Tensor, y: torch.Tensor, window: int = 7, min_size: int = 16,
                      per_sample: bool = False) -> torch.Tensor:
    """Mean of ``1 - SSIM`` (7 x 7 Gaussian window) over an average-pooled pyramid down to ``min_size`` pixels:
    structure at every scale, and no pretrained weights. B x 3 x H x W in [0, 1] -> scalar (``per_sample``: B)."""
    from kornia.metrics import ssim

    terms = []
    while min(x.shape[-2:]) >= window:
        terms.append(1 - _mean(ssim(x, y, window), per_sample))
        if min(x.shape[-2:]) // 2 < min_size:
            break
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    if not terms:
        return x.new_zeros(x.shape[0]) if per_sample else x.new_zeros(())
    return torch.stack(terms).mean(0)


def image_loss(pred: torch.Tensor, target: torch.Tensor, ssim_weight: float = 1.0,
               per_sample: bool = False) -> torch.Tensor:
    """L1 + ``ssim_weight`` * pyramid SSIM loss; B x 3 x H x W in [0, 1] -> scalar (``per_sample``: B)."""
    loss = _mean((pred - target).abs(), per_sample)
    return loss + ssim_weight * pyramid_ssim_loss(pred, target, per_sample=per_sample) if ssim_weight else loss


def psnr_ssim(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """torchmetrics PSNR (dB) and SSIM of images in [0, 1] (B x 3 x H x W)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    pred, target = pred.detach().float().clamp(0, 1), target.detach().float().to(pred.device)
    return (float(peak_signal_noise_ratio(pred, target, data_range=1.0)),
            float(structural_similarity_index_measure(pred, target, data_range=1.0)))
