"""GAN inversion of one image into a GMPI scene: a latent (W, then W+) and optionally a pivotally tuned generator.

    inv = invert(G, preset, target, yaw=0.1, pitch=0.0)     # target: 1 x 3 x R x R in [0, 1]
    out = inv.render(0.4, 0.0)                              # {'rgb', 'depth', 'alpha'} from a novel camera
    inv = invert(G, preset, target)                         # camera unknown: searched, then learned (inv.yaw)

Stage 1 optimises the latent (one w, then one per synthesis layer) to reproduce the image at its camera; stage 2
(PTI, Roich et al. 2021) tunes a copy of G's synthesis network around it. The loss is L1 + pyramid SSIM (offline: no
pretrained network); Ctrl-C ends a stage, keeping its best step. Choices and measurements: docs/INVERSION.md; the
command and its files: :mod:`gmpi_lightning.invert_cli`.
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
from .export import progress as progress_bar
from .image_losses import image_loss, psnr_ssim
from .pose_search import SearchSettings, search_pose
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


def _synthesize(G, ws: torch.Tensor, scene: Scene, chunk: int | None) -> torch.Tensor:
    """The MPI of ``ws`` at the scene's planes (const noise)."""
    return G.synthesize(ws, scene.planes.normalized, noise_mode="const", plane_chunk=chunk, check_planes=False)


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
            self._mpi = _synthesize(self.G, self.ws, self.scene, plane_chunk)
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


def _schedule(opt, step: int, total: int, base: float) -> None:
    """Set ``opt``'s learning rate: linear ramp-up over the first 5 % of ``total``, ``base``, cosine ramp-down."""
    t = step / max(total, 1)
    lr = base * min(1.0, t / 0.05) * (0.5 + 0.5 * math.cos(math.pi * max(0.0, (t - 0.75) / 0.25)))
    for group in opt.param_groups:
        group["lr"] = lr


def optimise_latent(G, scene: Scene, pose: tuple[float, float], target, s: InvertSettings, stats, bar=None,
                    refine_pose: bool = False, w_start: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Stage 1: the ws (1 x num_ws x w_dim) whose rendering at the camera ``pose`` = (yaw, pitch) best matches
    ``target``; ``refine_pose`` learns the camera too (``s.pose_lr``, inside the prior). It starts at ``w_start``
    (1 x w_dim; default the mean of mapped latents). The info's ``yaw``/``pitch``: the camera of the kept step."""
    w_mean, w_spread = stats
    noise_gen = torch.Generator(device=target.device).manual_seed(s.seed)
    switch = math.ceil(s.steps * s.w_plus_from)
    given = (float(pose[0]), float(pose[1]))  # a refined camera: yaw and pitch learned by their own Adam
    yaw, pitch = (torch.tensor(v, device=scene.device, requires_grad=refine_pose) for v in given)
    pose_opt = torch.optim.Adam([yaw, pitch], lr=s.pose_lr, betas=(0.9, 0.999)) if refine_pose else None
    fixed = None if refine_pose else scene.camera(*given)
    (y0, y1), (p0, p1) = pose_range(scene.preset)
    param = (w_mean if w_start is None else w_start).detach().clone().requires_grad_(True)  # 1 x w_dim: all layers
    opt = torch.optim.Adam([param], lr=s.lr, betas=(0.9, 0.999))
    best, t0, step, info = _Best(), time.perf_counter(), 0, {}
    try:
        for step in range(s.steps):
            if step == switch:  # W -> W+: one w per layer, starting where W ended
                param = param.detach()[:, None].repeat(1, G.num_ws, 1).requires_grad_(True)
                opt = torch.optim.Adam([param], lr=s.lr, betas=(0.9, 0.999))
            _schedule(opt, step, s.steps, s.lr)
            sigma = w_spread * s.noise * max(0.0, 1 - step / (0.75 * s.steps)) ** 2
            ws = param + sigma * torch.randn(param.shape, generator=noise_gen, device=param.device)
            ws = ws[:, None].expand(-1, G.num_ws, -1) if ws.ndim == 2 else ws
            mpi = _synthesize(G, ws, scene, s.plane_chunk)
            c2w = scene.camera(yaw, pitch) if refine_pose else fixed
            rgb = scene.render(mpi, c2w, plane_chunk=s.plane_chunk, validate=False)["rgb"]
            loss = total = image_loss(rgb, target, s.ssim_weight)
            if param.ndim == 3:  # W+: the layers' w stay near their mean (near W, where G was trained)
                spread = ((param - param.mean(1, keepdim=True)) ** 2).sum(-1).mean()
                total = loss + s.w_plus_reg * spread / w_spread ** 2
            opt.zero_grad(set_to_none=True)
            total.backward()
            rendered_at = (float(yaw.detach()), float(pitch.detach())) if refine_pose else given
            opt.step()
            if refine_pose:  # the camera's step, then back into the prior's range
                _schedule(pose_opt, step, s.steps, s.pose_lr)
                pose_opt.step()
                pose_opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    yaw.clamp_(y0, y1)
                    pitch.clamp_(p0, p1)
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
    ws, (yaw, pitch) = best.value
    return ws, {"steps": step, "best_loss": best.loss, "best_step": best.step, "seconds": time.perf_counter() - t0,
                "yaw": yaw, "pitch": pitch, "pose_refined": refine_pose, **info}


def pivotal_tuning(G, ws: torch.Tensor, scene: Scene, c2w, target, s: InvertSettings,
                   bar=None) -> tuple[nn.Module, dict]:
    """Stage 2: a copy of ``G`` whose synthesis network is tuned so that the pivot ``ws`` reproduces ``target``,
    regularised to keep the pivot's rendered depth at prior cameras and the MPIs of nearby latents."""
    tuned = copy.deepcopy(G).eval().requires_grad_(False)  # G: eval, no grad (invert set it)
    opt = torch.optim.Adam(tuned.synthesis.requires_grad_(True).parameters(), lr=s.pti_lr, betas=(0.9, 0.999))
    device, chunk = ws.device, s.plane_chunk
    gen = torch.Generator(device=device).manual_seed(s.seed + 1)
    depth = lambda mpi, cams: scene.render(mpi.expand(len(cams), -1, -1, -1, -1), cams, plane_chunk=chunk,
                                           validate=False)["depth"]
    with torch.no_grad():
        mpi0 = _synthesize(G, ws, scene, chunk)
    best, t0, step, info = _Best(), time.perf_counter(), 0, {}
    try:
        for step in range(s.pti_steps):
            _schedule(opt, step, s.pti_steps, s.pti_lr)
            with torch.no_grad():  # a latent between the pivot and a random mapped sample
                z = torch.randn(1, G.z_dim, generator=gen, device=device)
                c = torch.zeros(1, G.c_dim, device=device) if G.c_dim else None
                w_sample = G.mapping(z, c, skip_w_avg_update=True)
                w_near = ws.lerp(w_sample, float(torch.rand((), generator=gen, device=device)))
                mpi_near0 = _synthesize(G, w_near, scene, chunk)
                cams = scene.sample_cameras(s.depth_cameras, generator=gen) if s.depth_weight else None
                depth0 = depth(mpi0, cams) if s.depth_weight else None
            mpis = _synthesize(tuned, torch.cat([ws, w_near]), scene, chunk)
            loss = image_loss(scene.render(mpis[:1], c2w, plane_chunk=chunk, validate=False)["rgb"], target,
                              s.ssim_weight)
            total = loss + s.locality_weight * (mpis[1:] - mpi_near0).abs().mean()
            if s.depth_weight:
                far_near = scene.preset.far - scene.preset.near
                total = total + s.depth_weight * (depth(mpis[:1], cams) - depth0).abs().mean() / far_near
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
        if best.value is not None:  # back to the best tuned state seen
            tuned.load_state_dict(best.value)
    return tuned.requires_grad_(False), {"steps": step, "best_loss": best.loss, "seconds": time.perf_counter() - t0,
                                         **info}


def invert(G, preset: Preset, target: torch.Tensor, yaw: float | None = None, pitch: float | None = None,
           settings: InvertSettings | None = None, progress: bool = False, refine_pose: bool | None = None,
           search: SearchSettings | None = None) -> Inversion:
    """Invert ``target`` (1 x 3 x R x R in [0, 1], R = G's resolution, on G's device) seen from the camera
    (``yaw``, ``pitch``) of ``preset``'s sphere. Returns an :class:`Inversion`; ``G`` itself is never changed.

    Without a camera (``yaw`` and ``pitch`` None) it is estimated: a grid search over the pose prior
    (:func:`~gmpi_lightning.pose_search.search_pose` with ``search``), then refined with the latent in stage 1.
    ``refine_pose`` (default: only when the camera is estimated) learns yaw and pitch in stage 1 from the start."""
    s, search = settings or InvertSettings(), search or SearchSettings()
    R = G.img_resolution
    if target.ndim != 4 or target.shape[:2] != (1, 3) or target.shape[-2:] != (R, R):
        raise InputError(f"target must be 1 x 3 x {R} x {R}, got {tuple(target.shape)}")
    if (yaw is None) != (pitch is None):
        raise InputError("give both yaw and pitch, or neither (then the camera is searched for)")
    searched = yaw is None
    refine_pose = searched if refine_pose is None else refine_pose
    device = next(G.parameters()).device
    target = target.to(device, torch.float32)
    scene = Scene.for_generator(G, preset, s.planes or preset.train_planes, device)
    flags, training = [p.requires_grad for p in G.parameters()], G.training
    G.eval().requires_grad_(False)  # only the latent (stage 1) and a copy of G (stage 2) learn; restored below
    bar = progress_bar(total=(search.total_steps if searched else 0) + s.steps + s.pti_steps, desc="gmpi invert",
                       unit="step") if progress else None
    history, w_start, tuned, h1 = {}, None, G, {}
    try:
        stats = latent_stats(G, seed=s.seed)
        if searched:
            found = search_pose(G, scene, target, search, stats, bar)
            history["pose_search"] = found.summary()
            yaw, pitch, w_start = found.yaw, found.pitch, found.w
        if searched and found.interrupted:  # keep the best candidate's latent and camera
            ws = w_start[:, None].expand(-1, G.num_ws, -1).clone()
        else:
            ws, h1 = optimise_latent(G, scene, (yaw, pitch), target, s, stats, bar, refine_pose, w_start)
            history["latent"] = h1
            yaw, pitch = h1["yaw"], h1["pitch"]
        if s.pti_steps and h1 and not h1.get("interrupted"):
            tuned, history["pti"] = pivotal_tuning(G, ws, scene, scene.camera(yaw, pitch), target, s, bar)
    finally:
        if bar is not None:
            bar.close()
        for p, flag in zip(G.parameters(), flags):
            p.requires_grad_(flag)
        G.train(training)
    interrupted = any(h.get("interrupted") for h in history.values())
    return Inversion(tuned, ws, scene, float(yaw), float(pitch), target, tuned is not G, interrupted, history)
