"""MPI plane geometry (docs/METHOD.md §2): depths, normalised depths, extents, the out-of-volume check.

Plane 0 is the nearest, L-1 the farthest (the background). Each plane is a fronto-parallel rectangle ``z = d_i``
centred on the z-axis; its *extent* is its (height, width) in world units; texel centres sit at
``linspace(-W/2, W/2, R)`` (consistent with align_corners=True).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cameras import sphere_c2w
from .errors import InputError

DEPTH_SAMPLE_METHODS = ("inverse", "uniform", "log-uniform")
MAX_PLANE_HALF_EXTENT = 5.0  # the official heuristic bound (apple/ml-gmpi issue #12)


def make_plane_depths(near: float, far: float, n_planes: int, method: str = "inverse") -> torch.Tensor:
    """Plane depths (float32, length L, ascending: index 0 = near): ``inverse`` is uniform in disparity (the paper),
    ``uniform`` linear in depth, ``log-uniform`` geometric. Computed in float64, clamped to [near, far]."""
    if not 0 < near < far:
        raise InputError(f"need 0 < near < far, got near={near}, far={far}")
    if n_planes < 2:
        raise InputError(f"an MPI needs at least 2 planes, got {n_planes}")
    if method == "inverse":
        d = 1.0 / torch.linspace(1.0 / far, 1.0 / near, n_planes, dtype=torch.float64)
        d = d.flip(0)
    elif method == "uniform":
        d = torch.linspace(near, far, n_planes, dtype=torch.float64)
    elif method == "log-uniform":
        d = torch.logspace(math.log10(near), math.log10(far), n_planes, dtype=torch.float64)
    else:
        raise InputError(f"unknown plane spacing {method!r}; expected one of {DEPTH_SAMPLE_METHODS}")
    return d.clamp(near, far).to(torch.float32)


def normalize_depths(depths: torch.Tensor, near: float, far: float) -> torch.Tensor:
    """(d - near) / (far - near) in [0, 1]: the depth code of GMPI's alpha branch (float32 arithmetic, as the
    official code: the nearest plane maps to exactly 0)."""
    return (torch.as_tensor(depths, dtype=torch.float32) - near) / (far - near)


def pose_grid(yaw_mean, yaw_std, pitch_mean, pitch_std, n_stds, n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """An n x n grid over the prior's truncated range plus the mean pose (used to size the planes)."""
    yaws = torch.linspace(yaw_mean - n_stds * yaw_std, yaw_mean + n_stds * yaw_std, n, dtype=torch.float64)
    pitches = torch.linspace(pitch_mean - n_stds * pitch_std, pitch_mean + n_stds * pitch_std, n,
                             dtype=torch.float64)
    y, p = torch.meshgrid(yaws, pitches, indexing="ij")
    return (torch.cat([y.reshape(-1), torch.tensor([yaw_mean], dtype=torch.float64)]),
            torch.cat([p.reshape(-1), torch.tensor([pitch_mean], dtype=torch.float64)]))


def corner_rays(c2w: torch.Tensor, fov_deg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """World directions of the 4 exact image corners (B x 4 x 3) and the camera origins (B x 3)."""
    t = math.tan(math.radians(fov_deg) / 2.0)
    corners = torch.tensor([[-t, -t, 1.0], [t, -t, 1.0], [-t, t, 1.0], [t, t, 1.0]], dtype=c2w.dtype)
    corners = corners / corners.norm(dim=-1, keepdim=True)
    return torch.einsum("bij,kj->bki", c2w[:, :3, :3], corners), c2w[:, :3, 3]


def plane_extents(depths: torch.Tensor, fov_deg: float, sphere_center_z: float, sphere_r: float,
                  yaw_mean: float, yaw_std: float, pitch_mean: float, pitch_std: float, n_truncated_stds: float,
                  spatial_enlarge_factor: float = 1.001, confined_volume: bool = True,
                  grid_size: int = 100) -> torch.Tensor:
    """(height, width) of each plane in world units, L x 2 (float32). The background plane covers every training
    frustum (100 x 100 pose grid over the prior's range plus the mean pose) at the far depth, times
    ``spatial_enlarge_factor``. With ``confined_volume`` every other plane is the canonical frustum's cross-section
    *at the far depth* (a box-shaped volume); otherwise each plane fills the canonical view at its own depth."""
    depths = torch.as_tensor(depths, dtype=torch.float64)
    far = float(depths[-1])
    yaw, pitch = pose_grid(yaw_mean, yaw_std, pitch_mean, pitch_std, n_truncated_stds, grid_size)
    c2w = sphere_c2w(yaw, pitch, sphere_center_z, sphere_r, dtype=torch.float64)
    dirs, origins = corner_rays(c2w, fov_deg)
    s = (far - origins[:, None, 2]) / dirs[..., 2]
    hits = origins[:, None, :2] + s[..., None] * dirs[..., :2]
    max_x, max_y = float(hits[..., 0].abs().max()), float(hits[..., 1].abs().max())
    if max(max_x, max_y) > MAX_PLANE_HALF_EXTENT:
        raise InputError(
            f"the camera range is too large for an MPI: training frusta reach |x|={max_x:.2f}, |y|={max_y:.2f} at "
            f"the far plane (limit {MAX_PLANE_HALF_EXTENT}). Reduce the yaw/pitch std or n_truncated_stds.")
    half_fov = math.tan(math.radians(fov_deg) / 2.0)
    ext = torch.empty(len(depths), 2, dtype=torch.float64)
    ext[:-1] = 2.0 * far * half_fov if confined_volume else (2.0 * depths[:-1] * half_fov)[:, None]
    ext[-1, 0] = 2.0 * max_y * spatial_enlarge_factor
    ext[-1, 1] = 2.0 * max_x * spatial_enlarge_factor
    return ext.to(torch.float32)


@dataclass(frozen=True)
class Planes:
    """The planes of an L-plane MPI, in the two forms its two consumers need: ``depths`` (metric z, ascending, index 0
    nearest: the renderer's), ``normalized`` ((d - near) / (far - near): the generator's alpha-branch input) and
    ``extents`` (L x 2 (height, width) in world units: the renderer's). Checked once here, on the host; device copies
    (:meth:`to`) are trusted by the renderer and generator, which then never read their values back."""

    depths: torch.Tensor
    normalized: torch.Tensor
    extents: torch.Tensor

    def __post_init__(self):
        n = self.depths.numel()
        if self.depths.shape != (n,) or self.normalized.shape != (n,) or self.extents.shape != (n, 2) or n < 2:
            raise InputError(f"planes need depths (L,), normalized (L,) and extents (L, 2) with L >= 2; got "
                             f"{tuple(self.depths.shape)}, {tuple(self.normalized.shape)}, {tuple(self.extents.shape)}")
        if self.depths.device.type == "cpu":
            if not all(bool(torch.isfinite(t).all()) for t in (self.depths, self.normalized, self.extents)):
                raise InputError("plane depths and extents must be finite")
            if bool((self.depths[1:] <= self.depths[:-1]).any()):
                raise InputError(f"plane depths must increase from near to far, got {self.depths.tolist()}")

    def __len__(self) -> int:
        return self.depths.numel()

    @property
    def device(self) -> torch.device:
        return self.depths.device

    def to(self, device) -> Planes:
        if torch.device(device) == self.device:
            return self
        return Planes(*(t.to(device) for t in (self.depths, self.normalized, self.extents)))


def preset_planes(preset, n_planes: int, method: str | None = None) -> Planes:
    """Depths, normalised depths and extents of an L-plane MPI for a preset."""
    p, depths = preset, preset.plane_depths(n_planes, method)
    return Planes(depths, normalize_depths(depths, p.near, p.far),
                  plane_extents(depths, p.fov_deg, p.sphere_center_z, p.sphere_r, p.yaw_mean, p.yaw_std, p.pitch_mean,
                                p.pitch_std, p.n_truncated_stds, p.spatial_enlarge_factor, p.confined_volume))


def texel_xyz(depth, extent_hw, resolution: int) -> torch.Tensor:
    """World xyz of a plane's texel centres, R x R x 3 float32 (row index along +y, column along +x). ``depth`` and
    ``extent_hw`` may be numbers or tensors; computed in float64 where the extent lives, without reading it back."""
    ext = torch.as_tensor(extent_hw, dtype=torch.float64)
    steps = torch.linspace(0, 1, resolution, dtype=torch.float64, device=ext.device)
    ys, xs = (-ext[0] / 2 + steps * ext[0]), (-ext[1] / 2 + steps * ext[1])  # linspace(-h/2, h/2, R), (-w/2, w/2, R)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    z = torch.as_tensor(depth, dtype=torch.float64, device=ext.device).expand_as(x)
    return torch.stack([x, y, z], dim=-1).to(torch.float32)
