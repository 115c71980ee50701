"""Reproducible fakes for evaluation: latent k is ``RandomState(k).randn`` (NVlabs' convention, as
``gmpi render``), its camera is drawn from the preset's training prior with ``torch.Generator().manual_seed(k)``
(a second, independent camera for two-view metrics uses stream 1), the EMA generator renders at full resolution
with ``planes`` planes (paper: 96) and truncation psi (paper: 1.0). Under DDP rank r renders seeds r, r+W, ...
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..cameras import sample_preset_pose
from ..sampling import Sampler
from ..scene import Scene

POSE_STREAMS = 2  # stream 0: the image's camera; stream 1: the second view of two-view metrics


@dataclass
class FakeSettings:
    planes: int = 96
    truncation: float = 1.0
    noise_mode: str = "random"   # official evaluation: random noise (here seeded by each fake's own seed)
    resolution: int | None = None
    batch_size: int = 4
    plane_chunk: int | None = None


def seed_poses(seeds, preset, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(yaw, pitch) per seed from the preset's prior; independent of batch size, rank and order."""
    poses = [sample_preset_pose(1, preset, generator=torch.Generator().manual_seed(int(s) * POSE_STREAMS + stream))
             for s in seeds]
    return torch.stack([y[0] for y, _ in poses]), torch.stack([p[0] for _, p in poses])


def rank_seeds(num: int, rank: int = 0, world: int = 1, first: int = 0) -> list[int]:
    return list(range(first + rank, first + num, world))


def iter_fakes(G, preset, seeds: list[int], settings: FakeSettings, device="cpu", streams=(0,),
               return_weights: bool = False) -> Iterator[dict]:
    """Batches of rendered fakes: {'seeds', 'mpi', 'scene', 'nonfinite', 'views': [per stream {rgb, depth, alpha,
    yaw, pitch, c2w}], 'render_at': c2w -> the fakes' views from those cameras}. ``return_weights`` adds the
    per-plane weights to the first view only (B x L x 1 x H x W: memory). A fake whose MPI holds NaN/inf is
    flagged in ``nonfinite`` (bool, B) and rendered as an empty MPI, so that under DDP every rank still reaches the
    gathers and the caller can stop on all ranks at once."""
    sampler = Sampler(G, preset, settings.planes, device, settings.resolution or G.img_resolution,
                      settings.truncation, settings.noise_mode, settings.plane_chunk)
    for i in range(0, len(seeds), settings.batch_size):
        chunk = seeds[i:i + settings.batch_size]
        with torch.no_grad():
            mpi = sampler.mpis(chunk)
        nonfinite = ~torch.isfinite(mpi).flatten(1).all(1)
        if bool(nonfinite.any()):
            mpi = torch.where(nonfinite[:, None, None, None, None], torch.zeros_like(mpi), mpi)

        @torch.no_grad()
        def render_at(c2w, mpi=mpi, weights=False):
            return sampler.render(mpi, c2w, return_weights=weights)

        yield fake_batch(chunk, mpi, sampler.scene, render_at, streams, return_weights, nonfinite)


def fake_batch(seeds: list[int], mpi, scene: Scene, render_at, streams=(0,), return_weights: bool = False,
               nonfinite: torch.Tensor | None = None) -> dict:
    """One batch as :func:`iter_fakes` yields it: every stream's views of ``seeds`` from their cameras
    (:func:`seed_poses`), rendered by ``render_at(c2w, weights=...)``."""
    views = []
    for stream in streams:
        yaw, pitch = seed_poses(seeds, scene.preset, stream)
        c2w = scene.camera(yaw, pitch)
        views.append(dict(render_at(c2w, weights=return_weights and stream == streams[0]), yaw=yaw, pitch=pitch,
                          c2w=c2w))
    return {"seeds": seeds, "mpi": mpi, "scene": scene, "views": views, "render_at": render_at,
            "nonfinite": torch.zeros(len(seeds), dtype=torch.bool) if nonfinite is None else nonfinite}


IMAGE_METRICS = ("fid", "kid", "pr", "is", "est_fd")  # what a 2D generator's pictures can be scored on


def iter_images_2d(G, preset, seeds: list[int], settings: FakeSettings, device="cpu", streams=(0,),
                   return_weights: bool = False) -> Iterator[dict]:
    """A 2D StyleGAN2's images as :func:`iter_fakes` batches
    (``evaluate(..., source=partial(iter_images_2d, G, preset))``): fake k is ``G(RandomState(k).randn)``, the same
    picture at every camera (only :data:`IMAGE_METRICS` apply)."""
    for i in range(0, len(seeds), settings.batch_size):
        chunk = seeds[i:i + settings.batch_size]
        scene = Scene(preset, 2, device)
        with torch.no_grad():
            img = G(scene.seed_latents(chunk, G.z_dim), None, truncation_psi=settings.truncation, noise_mode="const")
        rgb = ((img.float() + 1) / 2).clamp(0, 1)
        blank = torch.zeros_like(rgb[:, :1])

        def render_at(c2w, rgb=rgb, blank=blank, weights=False):
            return {"rgb": rgb, "depth": blank, "alpha": blank + 1}

        yield fake_batch(chunk, None, scene, render_at, streams, False,
                         ~torch.isfinite(rgb).flatten(1).all(1).cpu())
