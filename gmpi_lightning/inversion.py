"""GAN inversion of one image into a GMPI scene: a latent (W, then W+) and optionally a pivotally tuned generator.

    inv = invert(G, preset, target, yaw=0.1, pitch=0.0)     # target: 1 x 3 x R x R in [0, 1]
    out = inv.render(0.4, 0.0)                              # {'rgb', 'depth', 'alpha'} from a novel camera

Stage 1 optimises the latent so that the MPI rendered at the input's camera reproduces the image: first one w
(started from the mean of mapped samples, with decaying noise to escape poor basins), then, for the second part of
the steps, one w per synthesis layer (W+) pulled towards their mean. Stage 2 (PTI, Roich et al. 2021) fine-tunes the
synthesis network of a copy of G with that latent fixed (the pivot). Its regularisers keep the geometry: the rendered
depth of the pivot's MPI at cameras drawn from the preset's prior stays close to the untuned generator's (the input
camera alone cannot say where things are), and the MPIs of latents between the pivot and random samples stay close
too (PTI's locality term, so the tuned file is still a generator). The image loss is L1 plus a pyramid SSIM: it runs
offline, needs no pretrained network (LPIPS would download VGG/AlexNet weights and sees little at 32 px). Ctrl-C
ends the current stage and keeps the best step so far. docs/INVERSION.md explains the choices and the measurements.
The command and its files: :mod:`gmpi_lightning.invert_cli`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .presets import Preset
from .scene import Scene


@dataclass
class InvertSettings:
    steps: int = 300              # stage 1 (latent) optimiser steps
    pti_steps: int = 150          # stage 2 (pivotal tuning of the synthesis network); 0 = latent only
    w_plus_from: float = 0.5      # fraction of stage 1 after which each layer gets its own w (1.0: W only)
    planes: int | None = None     # MPI planes while optimising and rendering (default: the preset's train_planes)
    lr: float = 0.05              # Adam, stage 1 (cosine ramp-down over the last quarter)
    noise: float = 0.05           # stage 1: noise on w, times the spread of mapped w, decaying to 0 at 3/4 of it
    w_plus_reg: float = 0.01      # W+: squared distance of the layers from their mean / spread^2
    ssim_weight: float = 1.0      # image loss = L1 + ssim_weight * (1 - pyramid SSIM)
    pti_lr: float = 1e-3          # Adam, stage 2 (cosine ramp-down; 2e-3 already oscillates at 32 px)
    depth_weight: float = 1.0     # stage 2: |depth - untuned depth| / (far - near) at prior cameras
    depth_cameras: int = 2        # prior cameras per stage-2 step for the depth term
    locality_weight: float = 0.1  # stage 2: |MPI - untuned MPI| at a latent between the pivot and a random sample
    seed: int = 0                 # w noise, prior cameras and locality latents
    plane_chunk: int | None = None  # planes per chunk in generation/compositing (memory at high resolution)

    def __post_init__(self):
        if self.steps < 1 or self.pti_steps < 0:
            raise ValueError(f"--steps must be >= 1 and --pti-steps >= 0, got {self.steps} and {self.pti_steps}")
        if not 0.0 <= self.w_plus_from <= 1.0:
            raise ValueError(f"w_plus_from must be in [0, 1], got {self.w_plus_from}")


# ============================================================================================== losses
def pyramid_ssim_loss(x: torch.Tensor, y: torch.Tensor, window: int = 7, min_size: int = 16) -> torch.Tensor:
    """Mean of ``1 - SSIM`` (7 x 7 Gaussian window) over an average-pooled pyramid down to ``min_size`` pixels:
    structure at every scale, and no pretrained weights. B x 3 x H x W in [0, 1] -> scalar."""
    from kornia.metrics import ssim

    terms = []
    while min(x.shape[-2:]) >= window:
        terms.append(1 - ssim(x, y, window).mean())
        if min(x.shape[-2:]) // 2 < min_size:
            break
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.stack(terms).mean() if terms else x.new_zeros(())


def image_loss(pred: torch.Tensor, target: torch.Tensor, ssim_weight: float = 1.0) -> torch.Tensor:
    """L1 + ``ssim_weight`` * pyramid SSIM loss; B x 3 x H x W in [0, 1]."""
    loss = (pred - target).abs().mean()
    return loss + ssim_weight * pyramid_ssim_loss(pred, target) if ssim_weight else loss


def psnr_ssim(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """torchmetrics PSNR (dB) and SSIM of images in [0, 1] (B x 3 x H x W)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    pred, target = pred.detach().float().clamp(0, 1), target.detach().float().to(pred.device)
    return (float(peak_signal_noise_ratio(pred, target, data_range=1.0)),
            float(structural_similarity_index_measure(pred, target, data_range=1.0)))


# ============================================================================================= latents
@torch.no_grad()
def latent_stats(G, n: int = 1000, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Mean (1 x w_dim) and spread (root mean squared distance from it) of ``n`` mapped latents. Works for any
    mapping network, including one whose ``w_avg`` was never tracked."""
    device = next(G.parameters()).device
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    c = torch.zeros(n, G.c_dim, device=device) if G.c_dim else None
    w = G.mapping(z, c, skip_w_avg_update=True)[:, 0]
    mean = w.mean(0, keepdim=True)
    return mean, float(((w - mean) ** 2).sum(1).mean().sqrt())


class PinnedLatent(nn.Module):
    """``G`` with its latent fixed to ``ws`` (1 x num_ws x w_dim), behind the ``G(z, c, plane_depths, ...)`` call that
    :func:`~gmpi_lightning.export.extract_mesh` makes (``z`` only sets the batch size)."""

    def __init__(self, G, ws: torch.Tensor):
        super().__init__()
        self.G, self.ws = G, ws
        self.img_resolution, self.alpha_mode, self.alpha = G.img_resolution, G.alpha_mode, G.alpha

    def forward(self, z, c=None, plane_depths=None, noise_mode: str = "const", plane_chunk=None,
                opaque_background=None, **_) -> torch.Tensor:
        return self.G.synthesize(self.ws.expand(len(z), -1, -1), plane_depths, noise_mode=noise_mode,
                                 plane_chunk=plane_chunk, opaque_background=opaque_background)


# ============================================================================================= result
@dataclass
class Inversion:
    """What :func:`invert` found: the generator (tuned copy or the given one), the latent, the input camera."""

    G: nn.Module
    ws: torch.Tensor                  # 1 x num_ws x w_dim
    scene: Scene
    yaw: float
    pitch: float
    target: torch.Tensor              # 1 x 3 x R x R in [0, 1]
    tuned: bool = False               # stage 2 changed G
    interrupted: bool = False         # Ctrl-C: the best step so far of the stage it stopped in
    history: dict = field(default_factory=dict)  # per stage: steps done, best loss, seconds
    _mpi: torch.Tensor | None = field(default=None, repr=False)

    @torch.no_grad()
    def mpi(self, plane_chunk: int | None = None) -> torch.Tensor:
        """The scene, 1 x L x 4 x R x R (made once: views and video frames reuse it)."""
        if self._mpi is None:
            self._mpi = self.G.synthesize(self.ws, self.scene.planes.normalized, noise_mode="const",
                                          plane_chunk=plane_chunk, check_planes=False)
        return self._mpi

    @torch.no_grad()
    def render(self, yaw: float, pitch: float, resolution: int | None = None, plane_chunk: int | None = None,
               check_inside: bool = True) -> dict[str, torch.Tensor]:
        return self.scene.render_pose(self.mpi(plane_chunk), yaw, pitch, resolution=resolution,
                                      plane_chunk=plane_chunk, check_inside=check_inside)

    def reconstruction(self) -> dict[str, torch.Tensor]:
        return self.render(self.yaw, self.pitch)

    def metrics(self) -> dict:
        psnr, ssim = psnr_ssim(self.reconstruction()["rgb"], self.target)
        return {"recon_psnr": psnr, "recon_ssim": ssim}


# ======================================================================================== optimisation
class _Best:
    """The lowest loss so far and a copy of what produced it."""

    def __init__(self):
        self.loss, self.value, self.step = math.inf, None, -1

    def offer(self, loss: float, step: int, value: Callable[[], object]) -> None:
        if loss < self.loss:
            self.loss, self.value, self.step = loss, value(), step


def _render_rgb(G, ws, scene: Scene, c2w, chunk) -> dict[str, torch.Tensor]:
    mpi = G.synthesize(ws, scene.planes.normalized, noise_mode="const", plane_chunk=chunk, check_planes=False)
    return scene.render(mpi, c2w, plane_chunk=chunk, validate=False) | {"mpi": mpi}


def _cosine_lr(step: int, total: int, base: float, ramp_up: float = 0.05, ramp_down: float = 0.25) -> float:
    t = step / max(total, 1)
    return base * min(1.0, t / ramp_up) * (0.5 + 0.5 * math.cos(math.pi * max(0.0, (t - (1 - ramp_down)) / ramp_down)))


def optimise_latent(G, scene: Scene, c2w, target, s: InvertSettings, stats, bar=None) -> tuple[torch.Tensor, dict]:
    """Stage 1: the ws (1 x num_ws x w_dim) whose rendering at ``c2w`` best matches ``target``."""
    w_mean, w_spread = stats
    noise_gen = torch.Generator(device=target.device).manual_seed(s.seed)
    switch = math.ceil(s.steps * s.w_plus_from)
    param = w_mean.clone().requires_grad_(True)  # 1 x w_dim: the same w for every layer
    opt = torch.optim.Adam([param], lr=s.lr, betas=(0.9, 0.999))
    best, t0, step = _Best(), time.perf_counter(), 0
    try:
        for step in range(s.steps):
            if step == switch:  # W -> W+: one w per layer, starting where W ended
                param = param.detach()[:, None].repeat(1, G.num_ws, 1).requires_grad_(True)
                opt = torch.optim.Adam([param], lr=s.lr, betas=(0.9, 0.999))
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(step, s.steps, s.lr)
            sigma = w_spread * s.noise * max(0.0, 1 - step / (0.75 * s.steps)) ** 2
            ws = param + sigma * torch.randn(param.shape, generator=noise_gen, device=param.device)
            ws = ws[:, None].expand(-1, G.num_ws, -1) if ws.ndim == 2 else ws
            rgb = _render_rgb(G, ws, scene, c2w, s.plane_chunk)["rgb"]
            loss = image_loss(rgb, target, s.ssim_weight)
            total = loss
            if param.ndim == 3:  # W+: the layers' w stay near their mean (near W, where G was trained)
                spread = ((param - param.mean(1, keepdim=True)) ** 2).sum(-1).mean()
                total = loss + s.w_plus_reg * spread / w_spread ** 2
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            best.offer(loss.item(), step, lambda ws=ws: ws.detach().clone())  # ws as rendered (noise included)
            if bar is not None:
                bar.set_postfix(stage="W+" if param.ndim == 3 else "W", loss=f"{loss.item():.4f}", refresh=False)
                bar.update()
        step += 1
    except KeyboardInterrupt:
        if best.value is None:
            raise
        info = {"interrupted": True}
    else:
        info = {}
    return best.value, {"steps": step, "best_loss": best.loss, "best_step": best.step,
                        "seconds": time.perf_counter() - t0, **info}


def pivotal_tuning(G, ws: torch.Tensor, scene: Scene, c2w, target, s: InvertSettings, stats,
                   bar=None) -> tuple[nn.Module, dict]:
    """Stage 2: a copy of ``G`` whose synthesis network is tuned so that the pivot ``ws`` reproduces ``target``,
    regularised to keep the pivot's rendered depth at prior cameras and the MPIs of nearby latents."""
    w_mean, w_spread = stats
    tuned = copy.deepcopy(G).eval().requires_grad_(False)  # G: eval, no grad (invert set it)
    tuned.synthesis.requires_grad_(True)
    params = [p for p in tuned.synthesis.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=s.pti_lr, betas=(0.9, 0.999))
    device = ws.device
    gen = torch.Generator(device=device).manual_seed(s.seed + 1)
    far_near = scene.preset.far - scene.preset.near
    with torch.no_grad():
        mpi0 = G.synthesize(ws, scene.planes.normalized, noise_mode="const", plane_chunk=s.plane_chunk,
                            check_planes=False)
    best, t0, step = _Best(), time.perf_counter(), 0
    try:
        for step in range(s.pti_steps):
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(step, s.pti_steps, s.pti_lr)
            with torch.no_grad():  # a latent between the pivot and a random mapped sample
                z = torch.randn(1, G.z_dim, generator=gen, device=device)
                c = torch.zeros(1, G.c_dim, device=device) if G.c_dim else None
                w_near = ws.lerp(G.mapping(z, c, skip_w_avg_update=True), float(torch.rand((), generator=gen,
                                                                                            device=device)))
                mpi_near0 = G.synthesize(w_near, scene.planes.normalized, noise_mode="const",
                                         plane_chunk=s.plane_chunk, check_planes=False)
                cams = scene.sample_cameras(s.depth_cameras, generator=gen) if s.depth_weight else None
                depth0 = scene.render(mpi0.expand(len(cams), -1, -1, -1, -1), cams, plane_chunk=s.plane_chunk,
                                      validate=False)["depth"] if s.depth_weight else None
            mpis = tuned.synthesize(torch.cat([ws, w_near]), scene.planes.normalized, noise_mode="const",
                                    plane_chunk=s.plane_chunk, check_planes=False)
            rgb = scene.render(mpis[:1], c2w, plane_chunk=s.plane_chunk, validate=False)["rgb"]
            loss = image_loss(rgb, target, s.ssim_weight)
            total = loss + s.locality_weight * (mpis[1:] - mpi_near0).abs().mean()
            if s.depth_weight:
                depth = scene.render(mpis[:1].expand(len(cams), -1, -1, -1, -1), cams, plane_chunk=s.plane_chunk,
                                     validate=False)["depth"]
                total = total + s.depth_weight * (depth - depth0).abs().mean() / far_near
            opt.zero_grad(set_to_none=True)
            total.backward()
            # the state that produced `total`, kept in case Ctrl-C comes (a finished run keeps the last state)
            best.offer(total.item(), step, lambda: {k: v.detach().clone() for k, v in tuned.state_dict().items()})
            opt.step()
            if bar is not None:
                bar.set_postfix(stage="PTI", loss=f"{loss.item():.4f}", refresh=False)
                bar.update()
        step += 1
    except KeyboardInterrupt:
        info = {"interrupted": True}
    else:
        info = {}
    if best.value is not None and info:  # interrupted: back to the best tuned state seen
        tuned.load_state_dict(best.value)
    return tuned.requires_grad_(False), {"steps": step, "best_loss": best.loss, "seconds": time.perf_counter() - t0,
                                         **info}


def invert(G, preset: Preset, target: torch.Tensor, yaw: float, pitch: float,
           settings: InvertSettings | None = None, progress: bool = False) -> Inversion:
    """Invert ``target`` (1 x 3 x R x R in [0, 1], R = G's resolution, on G's device) seen from the camera
    (``yaw``, ``pitch``) of ``preset``'s sphere. Returns an :class:`Inversion`; ``G`` itself is never changed."""
    s = settings or InvertSettings()
    if target.ndim != 4 or target.shape[:2] != (1, 3) or target.shape[-1] != G.img_resolution \
            or target.shape[-2] != G.img_resolution:
        raise ValueError(f"target must be 1 x 3 x {G.img_resolution} x {G.img_resolution}, got {tuple(target.shape)}")
    device = next(G.parameters()).device
    target = target.to(device, torch.float32)
    scene = Scene.for_generator(G, preset, s.planes or preset.train_planes, device)
    c2w = scene.camera(yaw, pitch)
    flags, training = [p.requires_grad for p in G.parameters()], G.training
    G.eval().requires_grad_(False)  # only the latent (stage 1) and a copy of G (stage 2) learn; restored below
    bar = None
    if progress:
        from .export import progress as progress_bar

        bar = progress_bar(total=s.steps + s.pti_steps, desc="gmpi invert", unit="step")
    try:
        stats = latent_stats(G, seed=s.seed)
        ws, h1 = optimise_latent(G, scene, c2w, target, s, stats, bar)
        history = {"latent": h1}
        tuned = G
        if s.pti_steps and not h1.get("interrupted"):
            tuned, history["pti"] = pivotal_tuning(G, ws, scene, c2w, target, s, stats, bar)
    finally:
        if bar is not None:
            bar.close()
        for p, flag in zip(G.parameters(), flags):
            p.requires_grad_(flag)
        G.train(training)
    interrupted = any(h.get("interrupted") for h in history.values())
    return Inversion(tuned, ws, scene, float(yaw), float(pitch), target, tuned is not G, interrupted, history)
