"""The camera of an image by analysis-by-synthesis: the pose of the prior from which the generator reproduces it best.

    found = search_pose(G, scene, target, SearchSettings(), latent_stats(G))   # target: 1 x 3 x R x R in [0, 1]
    found.yaw, found.pitch, found.confidence, found.summary()

A yaw x pitch grid over the preset's pose prior, each candidate with its own w (W space, from the mean of mapped
latents) optimised a few steps, all in one batch with their losses summed (each w follows only its own loss), and
scored by the lowest image loss it reached. The winner starts stage 1 of :func:`~gmpi_lightning.inversion.invert`;
the runner-up and the confidence: :class:`PoseSearch` (docs/INVERSION.md, "Confidence").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .cameras import pose_range
from .errors import InputError
from .image_losses import image_loss
from .presets import Preset
from .scene import Scene


@dataclass
class SearchSettings:
    yaws: int = 7                 # grid columns over the prior's yaw range
    pitches: int = 3              # grid rows over the prior's pitch range
    steps: int = 30               # latent steps per candidate (Adam, W space)
    lr: float = 0.05              # Adam learning rate of the candidates' w
    pose_lr: float = 0.01         # Adam step of each candidate's yaw and pitch (0: the grid poses stay fixed)
    ssim_weight: float = 1.0      # image loss = L1 + ssim_weight * (1 - pyramid SSIM), as in the inversion
    neighbourhood: float = 1.0    # the runner-up ends more than this many grid cells from the winner
    batch: int | None = None      # candidates optimised at once (memory at high resolution); None: all
    plane_chunk: int | None = None
    yaw_range: tuple[float, float] | None = None  # search these yaws only (inside the prior); None: the prior's

    def __post_init__(self):
        if self.yaws < 1 or self.pitches < 1 or self.steps < 1:
            raise InputError(f"the pose search needs yaws, pitches and steps >= 1, got {self.yaws}, {self.pitches} "
                             f"and {self.steps}")
        if self.yaw_range is not None and not self.yaw_range[0] < self.yaw_range[1]:
            raise InputError(f"the pose search's yaw_range must be (low, high) with low < high, got {self.yaw_range}")

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole search (steps per batch of candidates): the progress bar's share."""
        n = self.yaws * self.pitches
        return self.steps * math.ceil(n / (self.batch or n))


def search_range(preset: Preset, yaw_range: tuple[float, float] | None = None):
    """((yaw low, high), (pitch low, high)) that the search covers: the prior's range, its yaw narrowed to
    ``yaw_range`` (intersected with the prior) when given."""
    (y0, y1), pitch = pose_range(preset)
    if yaw_range is not None:
        y0, y1 = max(y0, yaw_range[0]), min(y1, yaw_range[1])
        if not y0 < y1:
            raise InputError(f"yaw_range {yaw_range} lies outside the prior's yaw range {pose_range(preset)[0]}")
    return (y0, y1), pitch


def pose_grid(preset: Preset, yaws: int, pitches: int,
              yaw_range: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(yaw, pitch) of the grid's candidates, each of length ``yaws * pitches``, pitch-major (candidate
    ``k = row * yaws + column``): the centres of equal cells of the searched range (:func:`search_range`, float64)."""
    (y0, y1), (p0, p1) = search_range(preset, yaw_range)
    ys = y0 + (torch.arange(yaws, dtype=torch.float64) + 0.5) * (y1 - y0) / yaws
    ps = p0 + (torch.arange(pitches, dtype=torch.float64) + 0.5) * (p1 - p0) / pitches
    pitch, yaw = torch.meshgrid(ps, ys, indexing="ij")
    return yaw.reshape(-1), pitch.reshape(-1)


@dataclass
class PoseSearch:
    """Every candidate of the grid: where it started, the camera and w of its lowest loss, and that loss (inf for a
    candidate that Ctrl-C left unscored)."""

    start_yaws: torch.Tensor      # N (float64), the grid
    start_pitches: torch.Tensor   # N
    yaws: torch.Tensor            # N: each candidate's camera at its lowest loss
    pitches: torch.Tensor         # N
    losses: torch.Tensor          # N
    ws: torch.Tensor              # N x w_dim: each candidate's w at its lowest loss
    grid: tuple[int, int]         # (pitches, yaws)
    cell: tuple[float, float]     # (yaw, pitch) width of a grid cell, radians
    neighbourhood: float
    seconds: float
    interrupted: bool = False

    @property
    def best(self) -> int:
        return int(self.losses.argmin())

    @property
    def runner_up(self) -> int | None:
        """The best scored candidate whose camera ends more than ``neighbourhood`` cells (the larger of yaw and pitch)
        from the winner's (None: every candidate ended near the winner, or none other was scored)."""
        b = self.best
        cells = torch.maximum((self.yaws - self.yaws[b]).abs() / self.cell[0],
                              (self.pitches - self.pitches[b]).abs() / self.cell[1])
        other = (cells > self.neighbourhood) & torch.isfinite(self.losses)
        if not bool(other.any()):
            return None
        return int(torch.where(other, self.losses, torch.full_like(self.losses, math.inf)).argmin())

    @property
    def yaw(self) -> float:
        return float(self.yaws[self.best])

    @property
    def pitch(self) -> float:
        return float(self.pitches[self.best])

    @property
    def w(self) -> torch.Tensor:
        """The winner's w, 1 x w_dim."""
        return self.ws[self.best][None]

    @property
    def loss_gap(self) -> float | None:
        r = self.runner_up
        return None if r is None else float(self.losses[r] - self.losses[self.best])

    @property
    def confidence(self) -> float | None:
        """Runner-up's loss minus the winner's, over the runner-up's; 1.0 when no candidate ended elsewhere."""
        r = self.runner_up
        if r is None:
            return 1.0 if bool(torch.isfinite(self.losses).all()) else None
        return self.loss_gap / float(self.losses[r])

    def _candidate(self, k: int | None) -> dict | None:
        return None if k is None else {
            "yaw": float(self.yaws[k]), "pitch": float(self.pitches[k]), "loss": float(self.losses[k]),
            "start": [float(self.start_yaws[k]), float(self.start_pitches[k])]}

    def summary(self) -> dict:
        """What metrics.json and the pose report record: winner, runner-up, gap, confidence, every candidate."""
        r6 = lambda v: round(float(v), 6)
        return {"best": self._candidate(self.best), "runner_up": self._candidate(self.runner_up),
                "loss_gap": self.loss_gap, "confidence": self.confidence,
                "grid": {"yaws": self.grid[1], "pitches": self.grid[0], "neighbourhood_cells": self.neighbourhood,
                         "yaw_range": [r6(self.start_yaws.min() - self.cell[0] / 2),
                                       r6(self.start_yaws.max() + self.cell[0] / 2)],
                         "candidates": [{"start": [r6(y0), r6(p0)], "end": [r6(y), r6(p)],
                                         "loss": float(v) if math.isfinite(float(v)) else None}
                                        for y0, p0, y, p, v in zip(self.start_yaws, self.start_pitches, self.yaws,
                                                                   self.pitches, self.losses)]},
                "seconds": self.seconds, **({"interrupted": True} if self.interrupted else {})}


def search_pose(G, scene: Scene, target: torch.Tensor, settings: SearchSettings, stats, bar=None) -> PoseSearch:
    """Score every pose of the grid by how well a few latent steps there reproduce ``target`` (1 x 3 x R x R in
    [0, 1]); with ``settings.pose_lr`` each camera moves too, inside the searched range (:func:`search_range`).
    ``stats``: (mean w 1 x w_dim, spread) of mapped latents (:func:`~gmpi_lightning.inversion.latent_stats`). ``G``:
    eval mode, no parameter gradients. Ctrl-C keeps the candidates scored so far (``interrupted``); if none, raises."""
    s, t0 = settings, time.perf_counter()
    grid_yaws, grid_pitches = pose_grid(scene.preset, s.yaws, s.pitches, s.yaw_range)
    (y0, y1), (p0, p1) = search_range(scene.preset, s.yaw_range)
    n, device, w_mean = len(grid_yaws), target.device, stats[0]
    losses = torch.full((n,), math.inf, dtype=torch.float64)
    best_w = w_mean.detach().expand(n, -1).clone()
    best_yaw, best_pitch = grid_yaws.clone(), grid_pitches.clone()
    batch, interrupted, moving = s.batch or n, False, s.pose_lr > 0
    try:
        for start in range(0, n, batch):
            idx = slice(start, min(start + batch, n))
            yaw, pitch = (g[idx].to(device, torch.float32).requires_grad_(moving) for g in (grid_yaws, grid_pitches))
            w = w_mean.detach().expand(len(yaw), -1).clone().requires_grad_(True)
            opt = torch.optim.Adam([{"params": [w], "lr": s.lr}] +
                                   ([{"params": [yaw, pitch], "lr": s.pose_lr}] if moving else []), betas=(0.9, 0.999))
            goal = target.expand(len(yaw), -1, -1, -1)
            for _ in range(s.steps):
                mpi = G.synthesize(w[:, None].expand(-1, G.num_ws, -1), scene.planes.normalized, noise_mode="const",
                                   plane_chunk=s.plane_chunk, check_planes=False)
                rgb = scene.render(mpi, scene.camera(yaw, pitch), plane_chunk=s.plane_chunk, validate=False)["rgb"]
                per_candidate = image_loss(rgb, goal, s.ssim_weight, per_sample=True)
                opt.zero_grad(set_to_none=True)
                per_candidate.sum().backward()
                with torch.no_grad():  # each candidate's lowest loss so far, with the w and camera that rendered it
                    better = per_candidate.detach().double().cpu() < losses[idx]
                    best_w[idx][better.to(device)] = w.detach()[better.to(device)]
                    for kept, now in ((losses, per_candidate), (best_yaw, yaw), (best_pitch, pitch)):
                        kept[idx] = torch.where(better, now.detach().double().cpu(), kept[idx])
                opt.step()
                if moving:
                    with torch.no_grad():
                        yaw.clamp_(y0, y1)
                        pitch.clamp_(p0, p1)
                if bar is not None:
                    bar.set_postfix(stage="pose search", loss=f"{float(losses.min()):.4f}", refresh=False)
                    bar.update()
    except KeyboardInterrupt:
        if not bool(torch.isfinite(losses).any()):
            raise
        interrupted = True
    cell = ((y1 - y0) / s.yaws, (p1 - p0) / s.pitches)
    return PoseSearch(grid_yaws, grid_pitches, best_yaw, best_pitch, losses, best_w, (s.pitches, s.yaws), cell,
                      s.neighbourhood, time.perf_counter() - t0, interrupted)
