"""3D metrics that need no external network (docs/EVALUATION.md defines each): two-view consistency (photometric
and depth error of B's pixels reprojected into A; occlusion boundaries are not errors, hence a median depth error),
the semi-transparent fraction (fog-like MPIs ~1, a surface ~0), depth relief (a flat billboard scores 0: a flat card
is itself a consistent 3D scene, so consistency alone cannot tell it apart) and depth FD (Fréchet distance of pooled
normalised z-depth of reals and fakes at the same cameras). Depth-like errors are in units of (far - near).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.geometry.camera import project_points
from kornia.geometry.depth import depth_to_3d_v2
from kornia.geometry.linalg import transform_points

from ..cameras import intrinsics, invert_rigid


def kornia_intrinsics(fov_deg: float, height: int, width: int, batch: int, device=None) -> torch.Tensor:
    """Our camera as kornia sees it (B x 3 x 3, float64). Kornia puts pixel centres at integer coordinates, the
    renderer at +0.5: the same rays need the principal point half a pixel up and left, (W/2 - 0.5, H/2 - 0.5)."""
    K = intrinsics(fov_deg, height, width, torch.float64)
    K[:2, 2] -= 0.5
    return K.to(device).expand(batch, 3, 3)


def unproject(depth: torch.Tensor, c2w: torch.Tensor, fov_deg: float) -> torch.Tensor:
    """World points (B x H x W x 3, float64) of every pixel of a z-depth map (B x 1 x H x W). Pixel (u, v) is the
    ray through (u + 0.5, v + 0.5), as the renderer (kornia's unprojection, tested equal to the pinhole formula)."""
    b, _, h, w = depth.shape
    x_cam = depth_to_3d_v2(depth[:, 0].to(torch.float64), kornia_intrinsics(fov_deg, h, w, b, depth.device))
    c2w = c2w.to(depth.device, torch.float64).reshape(-1, 4, 4).expand(b, 4, 4)
    return transform_points(c2w[:, None], x_cam)


def reproject(depth_b: torch.Tensor, c2w_b: torch.Tensor, c2w_a: torch.Tensor, fov_deg: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """B's pixels (z-depth B x 1 x H x W) seen from camera A: (grid_sample grid B x H x W x 2 for
    align_corners=False, z-depth in A B x 1 x H x W). Points behind A get a grid value outside [-1, 1]."""
    b, _, h, w = depth_b.shape
    x_w = unproject(depth_b, c2w_b, fov_deg)
    w2c_a = invert_rigid(c2w_a.to(depth_b.device, torch.float64).reshape(-1, 4, 4)).expand(b, 4, 4)
    x_a = transform_points(w2c_a[:, None], x_w)
    uv = project_points(x_a, kornia_intrinsics(fov_deg, h, w, b, depth_b.device)[:, None, None])  # centres at k
    size = torch.tensor([w, h], dtype=torch.float64, device=depth_b.device)
    grid = (uv + 0.5) / size * 2 - 1  # align_corners=False: pixel k spans [k - 0.5, k + 0.5]
    in_front = x_a[..., 2:] > 1e-8  # kornia does not flag points behind the camera (its #4555): we do
    grid = torch.where(in_front, grid, torch.full_like(grid, -2.0))
    return grid.float(), x_a[..., 2].clamp_min(1e-9)[:, None].float()


@torch.no_grad()
def two_view_consistency(view_a: dict, view_b: dict, fov_deg: float, near: float, far: float,
                         opaque: float = 0.5, covis_tol: float = 0.05) -> dict[str, torch.Tensor]:
    """Per image (tensors of length B): photo_l1 (mean |rgb_B - rgb_A| over co-visible pixels: inside A, opaque in
    both, depths within ``covis_tol`` x (far - near)), depth_err (median |z_A(X) - depth_A| / (far - near) over the
    pixels inside A and opaque in both), covisible (fraction of B's pixels). Each view: rgb B x 3 x H x W in [0, 1],
    depth and alpha B x 1 x H x W as rendered (depth is divided by alpha here), c2w B x 4 x 4."""
    depth_b = surface_depth(view_b["depth"], view_b["alpha"])
    grid, z_in_a = reproject(depth_b, view_b["c2w"], view_a["c2w"], fov_deg)
    inside = (grid.abs() <= 1).all(-1)[:, None]
    depth_a = surface_depth(view_a["depth"], view_a["alpha"])
    sample = F.grid_sample(torch.cat([view_a["rgb"], depth_a, view_a["alpha"]], 1).float(), grid,
                           mode="bilinear", padding_mode="border", align_corners=False)
    rgb_a, depth_a, alpha_a = sample[:, :3], sample[:, 3:4], sample[:, 4:5]
    valid = inside & (view_b["alpha"] > opaque) & (alpha_a > opaque)
    dz = (z_in_a - depth_a).abs() / (far - near)
    covis = valid & (dz < covis_tol)
    photo = (view_b["rgb"].float() - rgb_a).abs().mean(1, keepdim=True)

    m = covis.float()
    n = m.sum(dim=(1, 2, 3))
    photo_l1 = torch.where(n > 0, (photo * m).sum(dim=(1, 2, 3)) / n.clamp_min(1), torch.full_like(n, float("nan")))
    depth_err = torch.stack([x[v].median() if bool(v.any()) else x.new_tensor(float("nan"))
                             for x, v in zip(dz, valid)])
    return {"photo_l1": photo_l1, "depth_err": depth_err, "covisible": covis.float().mean(dim=(1, 2, 3))}


def surface_depth(depth: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Rendered depth is sum w_i z_i (not normalised): divide by the accumulated alpha to get the surface's depth
    where a ray is partly covered (image borders, soft edges)."""
    return depth / alpha.clamp_min(1e-6)


@torch.no_grad()
def semi_transparent_fraction(weights: torch.Tensor, plane_depths: torch.Tensor, near: float, far: float,
                              window: float = 0.05, concentration: float = 0.5, opaque: float = 0.5) -> torch.Tensor:
    """Per image: fraction of opaque rays (total weight > ``opaque``) with < ``concentration`` of their weight
    within +-``window`` x (far - near) of some plane. weights: B x L x 1 x H x W (render_mpi(return_weights))."""
    d = torch.as_tensor(plane_depths, dtype=torch.float32, device=weights.device)
    near_mat = ((d[:, None] - d[None, :]).abs() <= window * (far - near)).float()  # L x L
    w = weights[:, :, 0].float()
    total = w.sum(1)
    best = torch.einsum("ij,bjhw->bihw", near_mat, w).amax(1)
    ray = total > opaque
    semi = ray & (best < concentration * total)
    return semi.float().sum(dim=(1, 2)) / ray.float().sum(dim=(1, 2)).clamp_min(1)


@torch.no_grad()
def depth_relief(view: dict, fov_deg: float, near: float, far: float, opaque: float = 0.5,
                 q: tuple[float, float] = (0.05, 0.95)) -> torch.Tensor:
    """Per image: (q95 - q5) of the world z of the visible surface over opaque pixels, divided by (far - near).
    World z, not camera depth: a flat card seen at an angle has no relief."""
    z = unproject(surface_depth(view["depth"], view["alpha"]), view["c2w"], fov_deg)[..., 2]
    out = []
    for zi, a in zip(z, view["alpha"][:, 0]):
        v = zi[a > opaque]
        if v.numel() < 2:
            out.append(torch.tensor(float("nan"), dtype=torch.float64))
            continue
        lo, hi = torch.quantile(v, torch.tensor(q, dtype=v.dtype, device=v.device))
        out.append(((hi - lo) / (far - near)).cpu())
    return torch.stack(out).float()


def depth_features(depth: torch.Tensor, near: float, far: float, pool: int = 16) -> torch.Tensor:
    """B x 1 x H x W z-depth -> B x pool^2 features (normalised depth, area-pooled)."""
    x = ((depth.float() - near) / (far - near)).clamp(0, 1)
    if x.shape[-1] != pool or x.shape[-2] != pool:
        x = F.adaptive_avg_pool2d(x, pool)
    return x.flatten(1).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two N x d feature sets (the FID formula; equal to torchmetrics'
    FID on the same features to ~1e-9, tested), through symmetric eigen-decompositions:
    tr sqrt(S_a S_b) = sum sqrt(eig(R S_b R)) with R = S_a^(1/2). Fast enough for the bootstrap below."""
    a, b = a.double(), b.double()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(sa)
    root = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root @ sb @ root).clamp_min(0).sqrt().sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + sa.trace() + sb.trace() - 2 * cross)


def frechet_bootstrap_se(a: torch.Tensor, b: torch.Tensor, rounds: int = 50, seed: int = 0) -> float:
    """Standard error of the Fréchet distance: std over ``rounds`` bootstrap resamples of both sets."""
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 256 x 256 problems: one thread is fastest, and does not stall on a busy machine
    try:
        values = [frechet_distance(a[torch.randint(len(a), (len(a),), generator=g)],
                                   b[torch.randint(len(b), (len(b),), generator=g)]) for _ in range(rounds)]
    finally:
        torch.set_num_threads(threads)
    return float(torch.tensor(values, dtype=torch.float64).std())
