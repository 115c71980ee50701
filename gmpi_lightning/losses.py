"""GAN losses and the EMA rule as small pure functions (docs/METHOD.md §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .nn.ops import input_gradients_only


def d_logistic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic D loss: softplus(-D(x)).mean() + softplus(D(G(z))).mean()."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma / 2 * mean_b ||dD(x_b)/dx_b||^2; ``real_images`` must require grad. Differentiable (double backward)."""
    with input_gradients_only():  # only the images' gradient is wanted here: no weight gradients (see ops)
        (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return 0.5 * gamma * grad.square().sum(dim=[1, 2, 3]).mean()


def stylegan2_ema_beta(batch_total: int, cur_nimg: int, ema_kimg: float = 10.0,
                       ema_rampup: float | None = 0.05) -> float:
    """StyleGAN2-ADA: beta = 0.5 ** (batch / ema_nimg), ema_nimg ramped up with the images seen."""
    ema_nimg = ema_kimg * 1000
    if ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * ema_rampup)
    return 0.5 ** (batch_total / max(ema_nimg, 1e-8))


def torch_ema_beta(num_updates: int, decay: float = 0.999) -> float:
    """torch_ema with warm-up (the official GMPI behaviour): min(decay, (1 + t) / (10 + t)), t = updates so far + 1."""
    t = num_updates + 1
    return min(decay, (1 + t) / (10 + t))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, live: torch.nn.Module, beta: float) -> None:
    """p_ema <- beta * p_ema + (1 - beta) * p for parameters; buffers copied as they are."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in live.parameters()], 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), live.buffers()):
        b_ema.copy_(b)
