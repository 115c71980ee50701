"""GAN inversion of one image into a GMPI scene: a latent (W, then W+) and optionally a pivotally tuned generator.

    inv = invert(G, preset, target, yaw=0.1, pitch=0.0)     # target: 1 x 3 x R x R in [0, 1]
    out = inv.render(0.4, 0.0)                              # {'rgb', 'depth', 'alpha'} from a novel camera
    inv = invert(G, preset, target)                         # camera unknown: searched, then learned (inv.yaw)

Stage 1 optimises the latent so that the MPI rendered at the input's camera reproduces the image: first one w
(started from the mean of mapped samples, with decaying noise to escape poor basins), then, for the second part of
the steps, one w per synthesis layer (W+) pulled towards their mean. Stage 2 (PTI, Roich et al. 2021) fine-tunes the
synthesis network of a copy of G with that latent fixed (the pivot). Its regularisers keep the geometry: the rendered
depth of the pivot's MPI at cameras drawn from the preset's prior stays close to the untuned generator's (the input
camera alone cannot say where things are), and the MPIs of latents between the pivot and random samples stay close
too (PTI's locality term, so the tuned file is still a generator). The image loss is L1 plus a pyramid SSIM: it runs
offline, needs no pretrained network (LPIPS would download VGG/AlexNet weights and sees little at 32 px). Ctrl-C
ends the current stage and keeps the best step so far. Without a camera, :mod:`~gmpi_lightning.pose_search` finds a
start and stage 1 learns yaw and pitch with the latent (inside the prior). docs/INVERSION.md explains the choices
and the measurements.
The command and its files: :mod:`gmpi_lightning.invert_cli`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .cameras import pose_range
from .errors import InputError
from .image_losses import image_loss, psnr_ssim
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
    pose_lr: float = 0.01         # stage 1 with a refined camera: Adam step on yaw and pitch (radians)
    seed: int = 0                 # w noise, prior cameras and locality latents
    plane_chunk: int | None = None  # planes per chunk in generation/compositing (memory at high resolution)

    def __post_init__(self):
        if self.steps < 1 or self.pti_steps < 0:
            raise InputError(f"--steps must be >= 1 and --pti-steps >= 0, got {self.steps} and {self.pti_steps}")
        if not 0.0 <= self.w_plus_from <= 1.0:
            raise InputError(f"w_plus_from must be in [0, 1], got {self.w_plus_from}")


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


class _Camera:
    """The input camera of stage 1: fixed, or (``refine``) yaw and pitch learned with the latent by Adam at
    ``lr``, projected back into the prior's range after every step."""

    def __init__(self, scene: Scene, yaw: float, pitch: float, refine: bool, lr: float):
        device = scene.device
        self.scene, self.refine = scene, refine
        self.yaw = torch.tensor(float(yaw), device=device, requires_grad=refine)
        self.pitch = torch.tensor(float(pitch), device=device, requires_grad=refine)
        self.range = pose_range(scene.preset)
        self.opt = torch.optim.Adam([self.yaw, self.pitch], lr=lr, betas=(0.9, 0.999)) if refine else None
        self.lr, self._given = lr, (float(yaw), float(pitch))
        self._fixed = None if refine else scene.camera(*self._given)

    def c2w(self) -> torch.Tensor:
        return self.scene.camera(self.yaw, self.pitch) if self.refine else self._fixed

    def pose(self) -> tuple[float, float]:
        return (float(self.yaw.detach()), float(self.pitch.detach())) if self.refine else self._given

    def step(self, step: int, total: int) -> None:
        if not self.refine:
            return
        for group in self.opt.param_groups:
            group["lr"] = _cosine_lr(step, total, self.lr)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            (y0, y1), (p0, p1) = self.range
            self.yaw.clamp_(y0, y1)
            self.pitch.clamp_(p0, p1)


def optimise_latent(G, scene: Scene, pose: tuple[float, float], target, s: InvertSettings, stats, bar=None,
                    refine_pose: bool = False, w_start: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Stage 1: the ws (1 x num_ws x w_dim) whose rendering at the camera ``pose`` = (yaw, pitch) best matches
    ``target``; with ``refine_pose`` the camera is learned too (``s.pose_lr``, kept inside the prior). The search
    starts at ``w_start`` (1 x w_dim; default the mean of mapped latents). The info's ``yaw``/``pitch`` are the
    camera of the kept step."""
    w_mean, w_spread = stats
    noise_gen = torch.Generator(device=target.device).manual_seed(s.seed)
    switch = math.ceil(s.steps * s.w_plus_from)
    camera = _Camera(scene, *pose, refine=refine_pose, lr=s.pose_lr)
    param = (w_mean if w_start is None else w_start).detach().clone().requires_grad_(True)  # 1 x w_dim: all layers
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
            rgb = _render_rgb(G, ws, scene, camera.c2w(), s.plane_chunk)["rgb"]
            loss = image_loss(rgb, target, s.ssim_weight)
            total = loss
            if param.ndim == 3:  # W+: the layers' w stay near their mean (near W, where G was trained)
                spread = ((param - param.mean(1, keepdim=True)) ** 2).sum(-1).mean()
                total = loss + s.w_plus_reg * spread / w_spread ** 2
            opt.zero_grad(set_to_none=True)
            total.backward()
            rendered_at = camera.pose()
            opt.step()
            camera.step(step, s.steps)
            # ws as rendered (noise included), and the camera it was rendered from
            best.offer(loss.item(), step, lambda ws=ws, at=rendered_at: (ws.detach().clone(), at))
            if bar is not None:
                bar.set_postfix(stage="W+" if param.ndim == 3 else "W", loss=f"{loss.item():.4f}", refresh=False,
                                **({"yaw": f"{rendered_at[0]:+.3f}"} if refine_pose else {}))
                bar.update()
        step += 1
    except KeyboardInterrupt:
        if best.value is None:
            raise
        info = {"interrupted": True}
    else:
        info = {}
    ws, (yaw, pitch) = best.value
    return ws, {"steps": step, "best_loss": best.loss, "best_step": best.step, "seconds": time.perf_counter() - t0,
                "yaw": yaw, "pitch": pitch, "pose_refined": refine_pose, **info}


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


def invert(G, preset: Preset, target: torch.Tensor, yaw: float | None = None, pitch: float | None = None,
           settings: InvertSettings | None = None, progress: bool = False, refine_pose: bool | None = None,
           search=None) -> Inversion:
    """Invert ``target`` (1 x 3 x R x R in [0, 1], R = G's resolution, on G's device) seen from the camera
    (``yaw``, ``pitch``) of ``preset``'s sphere. Returns an :class:`Inversion`; ``G`` itself is never changed.

    Without a camera (``yaw`` and ``pitch`` None) it is estimated: a grid search over the preset's pose prior
    (:func:`~gmpi_lightning.pose_search.search_pose`, ``search``: its
    :class:`~gmpi_lightning.pose_search.SearchSettings`), then refined with the latent in stage 1. ``refine_pose``
    (default: only when the camera is estimated) learns yaw and pitch in stage 1 from the given or found start."""
    s = settings or InvertSettings()
    if target.ndim != 4 or target.shape[:2] != (1, 3) or target.shape[-1] != G.img_resolution \
            or target.shape[-2] != G.img_resolution:
        raise InputError(f"target must be 1 x 3 x {G.img_resolution} x {G.img_resolution}, got {tuple(target.shape)}")
    if (yaw is None) != (pitch is None):
        raise InputError("give both yaw and pitch, or neither (then the camera is searched for)")
    searched = yaw is None
    refine_pose = searched if refine_pose is None else refine_pose
    device = next(G.parameters()).device
    target = target.to(device, torch.float32)
    scene = Scene.for_generator(G, preset, s.planes or preset.train_planes, device)
    flags, training = [p.requires_grad for p in G.parameters()], G.training
    G.eval().requires_grad_(False)  # only the latent (stage 1) and a copy of G (stage 2) learn; restored below
    bar = None
    if searched:
        from .pose_search import SearchSettings, search_pose

        search = search or SearchSettings()
    if progress:
        from .export import progress as progress_bar

        bar = progress_bar(total=(search.total_steps if searched else 0) + s.steps + s.pti_steps, desc="gmpi invert",
                           unit="step")
    history, w_start = {}, None
    try:
        stats = latent_stats(G, seed=s.seed)
        if searched:
            found = search_pose(G, scene, target, search, stats, bar)
            history["pose_search"] = found.summary()
            yaw, pitch, w_start = found.yaw, found.pitch, found.w
        tuned, h1 = G, {}
        if history.get("pose_search", {}).get("interrupted"):  # keep the best candidate's latent and camera
            ws = w_start[:, None].expand(-1, G.num_ws, -1).clone()
        else:
            ws, h1 = optimise_latent(G, scene, (yaw, pitch), target, s, stats, bar, refine_pose, w_start)
            history["latent"] = h1
            yaw, pitch = h1["yaw"], h1["pitch"]
        if s.pti_steps and h1 and not h1.get("interrupted"):
            tuned, history["pti"] = pivotal_tuning(G, ws, scene, scene.camera(yaw, pitch), target, s, stats, bar)
    finally:
        if bar is not None:
            bar.close()
        for p, flag in zip(G.parameters(), flags):
            p.requires_grad_(flag)
        G.train(training)
    interrupted = any(h.get("interrupted") for h in history.values())
    return Inversion(tuned, ws, scene, float(yaw), float(pitch), target, tuned is not G, interrupted, history)
