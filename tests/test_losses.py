"""GAN losses and EMA rates as numbers (docs/METHOD.md §6), at inputs where a sign or a default slip shows."""

import math

import pytest
import torch

from gmpi_lightning.losses import g_nonsaturating_loss, stylegan2_ema_beta, torch_ema_beta


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_generator_loss_rewards_higher_fake_logits():
    """At asymmetric logits the generator loss is mean softplus(-D(G(z))), and raising a fake logit lowers it.
    Rules out the saturating sign softplus(+D(G(z))), which logits symmetric about 0 cannot tell apart."""
    logits = torch.tensor([[2.0], [-0.5]], requires_grad=True)
    loss = g_nonsaturating_loss(logits)
    assert float(loss.detach()) == pytest.approx((_softplus(-2.0) + _softplus(0.5)) / 2)
    loss.backward()
    assert bool((logits.grad < 0).all())


def test_ema_defaults_are_the_nvlabs_ones_and_the_first_step_copies_the_live_weights():
    """With its defaults the StyleGAN2 EMA has a half-life of 10 kimg, ramped up over 5 % of the images seen, and
    before any image it takes the live weights (beta = 0); torch_ema's default decay is 0.999. Rules out other
    default half-lives or ramp-ups (e.g. 11 kimg, a ramp of 1.05) and a floor on the half-life that keeps beta
    above 0 at the start."""
    assert stylegan2_ema_beta(32, 10_000_000) == pytest.approx(0.5 ** (32 / 10_000))
    assert stylegan2_ema_beta(32, 1000) == pytest.approx(0.5 ** (32 / 50))
    assert stylegan2_ema_beta(1, 0) == 0.0
    assert torch_ema_beta(1_000_000) == 0.999
