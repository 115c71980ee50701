"""The consistency metric's unprojection / reprojection go through kornia; they must equal the explicit pinhole
formulas they replaced (rays through pixel centres (u + 0.5, v + 0.5), principal point (W/2, H/2))."""

from __future__ import annotations

import torch

from gmpi_lightning.cameras import focal_from_fov, invert_rigid, sphere_c2w
from gmpi_lightning.evaluation import geometry


def _pinhole_unproject(depth, c2w, fov_deg):
    """The hand-written version kornia replaced: B x 1 x H x W z-depth -> B x H x W x 3 world points (float64)."""
    b, _, h, w = depth.shape
    f = focal_from_fov(fov_deg, w)
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                          indexing="ij")
    d = depth[:, 0].double()
    x_cam = torch.stack([(u - w / 2) / f * d, (v - h / 2) / f * d, d], dim=-1)
    c2w = c2w.double().reshape(-1, 4, 4).expand(b, 4, 4)
    return torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], x_cam) + c2w[:, None, None, :3, 3]


def _pinhole_reproject(depth_b, c2w_b, c2w_a, fov_deg):
    _, _, h, w = depth_b.shape
    f = focal_from_fov(fov_deg, w)
    w2c_a = invert_rigid(c2w_a.double().reshape(-1, 4, 4))
    x_a = torch.einsum("bij,bhwj->bhwi", w2c_a[:, :3, :3], _pinhole_unproject(depth_b, c2w_b, fov_deg))
    x_a = x_a + w2c_a[:, None, None, :3, 3]
    z = x_a[..., 2].clamp_min(1e-9)
    grid = torch.stack([(f * x_a[..., 0] / z + w / 2) / w * 2 - 1, (f * x_a[..., 1] / z + h / 2) / h * 2 - 1], -1)
    return grid, z[:, None]


def _cameras(b, seed):
    g = torch.Generator().manual_seed(seed)
    yaw, pitch = (torch.rand(b, generator=g) - 0.5) * 0.8, (torch.rand(b, generator=g) - 0.5) * 0.4
    return sphere_c2w(yaw, pitch, 1.0, 1.0, dtype=torch.float64)


def test_kornia_unprojection_equals_pinhole_formula():
    g = torch.Generator().manual_seed(0)
    depth = 0.9 + 0.3 * torch.rand(3, 1, 24, 40, generator=g)  # non-square, so H and W cannot be swapped silently
    c2w = _cameras(3, 1)
    ours, ref = geometry.unproject(depth, c2w, 12.6), _pinhole_unproject(depth, c2w, 12.6)
    assert ours.shape == (3, 24, 40, 3) and ours.dtype == torch.float64
    assert (ours - ref).abs().max().item() < 1e-12  # measured 2.2e-16


def test_kornia_reprojection_equals_pinhole_formula():
    g = torch.Generator().manual_seed(2)
    depth_b = 0.9 + 0.3 * torch.rand(2, 1, 32, 32, generator=g)
    c2w_b, c2w_a = _cameras(2, 3), _cameras(2, 4)
    grid, z = geometry.reproject(depth_b, c2w_b, c2w_a, 12.6)
    grid_ref, z_ref = _pinhole_reproject(depth_b, c2w_b, c2w_a, 12.6)
    assert grid.shape == (2, 32, 32, 2) and z.shape == (2, 1, 32, 32)
    # float32 outputs: measured 6.0e-8 from the float64 reference, 0 (bit-identical) against its float32 cast
    assert (grid.double() - grid_ref).abs().max().item() < 1e-6
    assert (z.double() - z_ref).abs().max().item() < 1e-6
    # The identity: every pixel lands on its own centre.
    grid_id, z_id = geometry.reproject(depth_b, c2w_b, c2w_b, 12.6)
    ys, xs = torch.meshgrid((torch.arange(32) + 0.5) / 16 - 1, (torch.arange(32) + 0.5) / 16 - 1, indexing="ij")
    assert (grid_id - torch.stack([xs, ys], -1)).abs().max().item() < 1e-5
    assert (z_id - depth_b).abs().max().item() < 1e-6


def test_points_behind_camera_a_are_outside():
    depth = torch.ones(1, 1, 8, 8)
    c2w_b = torch.eye(4, dtype=torch.float64)[None]
    c2w_a = c2w_b.clone()
    c2w_a[0, 2, 3] = 2.0  # camera A in front of B's points, looking the same way: they are behind it
    grid, _ = geometry.reproject(depth, c2w_b, c2w_a, 12.6)
    assert not bool((grid.abs() <= 1).all(-1).any())
