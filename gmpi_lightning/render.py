"""MPI rendering and shading (docs/METHOD.md §4). Pure functions of tensors, float32, differentiable in the MPI (and in
the camera when ``c2w`` requires grad).

An MPI is ``B x L x 4 x Ht x Wt`` RGBA in [0, 1], plane 0 nearest, fixed in the world frame. A view intersects each
pixel's ray with every plane ``z = d_i``, samples its texture bilinearly (``align_corners=True``, transparent outside
the plane) and composites front to back: ``w_i = a_i * prod_{j<i} (1 - a_j + 1e-10)``, ``rgb = sum w_i rgb_i``,
``depth = sum w_i z_i`` (z along the optical axis). Colours are *not* renormalised by ``sum w`` (opaque background).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from .cameras import pixel_rays, sphere_c2w, truncated_normal
from .errors import InputError
from .planes import texel_xyz

TRANSMITTANCE_EPS = 1e-10


def _check_mpi(mpi: torch.Tensor, plane_depths: torch.Tensor, plane_extents: torch.Tensor, values: bool) -> None:
    if mpi.ndim != 5 or mpi.shape[2] != 4:
        raise InputError(f"mpi must be B x L x 4 x H x W (RGBA planes), got shape {tuple(mpi.shape)}")
    n = mpi.shape[1]
    if plane_depths.shape != (n,) or plane_extents.shape != (n, 2):
        raise InputError(f"an MPI of {n} planes needs plane_depths ({n},) and plane_extents ({n}, 2); got "
                         f"{tuple(plane_depths.shape)} and {tuple(plane_extents.shape)}")
    if not values:
        return
    if not bool(torch.isfinite(mpi).all()):
        raise InputError("mpi contains NaN or Inf values")
    lo, hi = float(mpi.detach().amin()), float(mpi.detach().amax())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise InputError(f"mpi values must lie in [0, 1] (RGBA), got range [{lo:.4g}, {hi:.4g}]")


def composite(rgb: torch.Tensor, alpha: torch.Tensor, depth: torch.Tensor | None = None,
              transmittance: torch.Tensor | None = None, plane_weights: list | None = None):
    """Front-to-back 'over' of a plane stack. rgb: B x L x 3 x H x W, alpha and depth (or None): B x L x 1 x H x W;
    ``transmittance`` (B x 1 x H x W) carries over from nearer planes. Returns (rgb B x 3 x H x W, depth or None,
    accumulated weight B x 1 x H x W, transmittance after); a list ``plane_weights`` receives the weights w_i."""
    keep = torch.cumprod(1.0 - alpha + TRANSMITTANCE_EPS, dim=1)
    before = torch.cat([torch.ones_like(keep[:, :1]), keep[:, :-1]], dim=1)
    keep_last = keep[:, -1]
    if transmittance is not None:
        before, keep_last = before * transmittance[:, None], keep_last * transmittance
    w = alpha * before
    if plane_weights is not None:
        plane_weights.append(w)
    out_depth = (w * depth).sum(1) if depth is not None else None
    return (w * rgb).sum(1), out_depth, w.sum(1), keep_last


def render_mpi(mpi: torch.Tensor, plane_depths: torch.Tensor, plane_extents: torch.Tensor, c2w: torch.Tensor,
               fov_deg: float, height: int, width: int, check_inside: bool = True,
               plane_chunk: int | None = None, return_weights: bool = False,
               validate: bool = True) -> dict[str, torch.Tensor]:
    """Render ``mpi`` (B x L x 4 x Ht x Wt, [0, 1]) from cameras ``c2w`` (B x 4 x 4 or 4 x 4).

    Returns ``rgb`` (B x 3 x H x W in [0, 1]), ``depth`` (z-depth) and ``alpha`` (accumulated opacity), B x 1 x H x W.
    ``plane_chunk`` warps that many planes at a time (same result, less memory: e.g. 96 planes at 1024 px; default all).
    ``check_inside`` raises if any ray misses the background plane (the official renderer exits).
    ``return_weights`` adds ``weights``: every plane's compositing weight per pixel (B x L x 1 x H x W).
    ``validate=False`` skips every check that reads tensor values (finite and in [0, 1], camera in front of the
    planes, ``check_inside``), each a device wait on a GPU: for the training loop's own MPIs and prior cameras.
    """
    plane_depths = torch.as_tensor(plane_depths, dtype=torch.float32, device=mpi.device)
    plane_extents = torch.as_tensor(plane_extents, dtype=torch.float32, device=mpi.device)
    _check_mpi(mpi, plane_depths, plane_extents, values=validate)
    b, n_planes = mpi.shape[:2]
    c2w = torch.as_tensor(c2w, device=mpi.device)
    c2w = (c2w[None] if c2w.ndim == 2 else c2w).to(torch.float64)
    if c2w.shape[0] == 1 and b > 1:
        c2w = c2w.expand(b, 4, 4)
    if c2w.shape != (b, 4, 4):
        raise InputError(f"c2w must be 4 x 4 or {b} x 4 x 4 for a batch of {b} MPIs, got {tuple(c2w.shape)}")
    # Cameras are constants in training (no graph); a c2w that requires grad (pose refinement in inversion) gets one.
    camera_grad = torch.is_grad_enabled() and c2w.requires_grad
    with torch.set_grad_enabled(camera_grad):  # per-pixel ray slopes in float64, then for plane z = d the hit is
        # o + (d - o_z) * (r / r_z): affine in the plane depth, so planes cost two FMAs each.
        rays, origins = pixel_rays(c2w, fov_deg, height, width)
        oz = origins[:, 2]
        if validate and bool((oz[:, None] > plane_depths.to(torch.float64)[None, 0] + 1e-9).any()):
            raise InputError(f"camera behind the nearest plane (camera z up to {float(oz.max()):.4f}, "
                             f"nearest plane at {float(plane_depths[0]):.4f}): the MPI cannot render it")
        slope_x = (rays[..., 0] / rays[..., 2]).to(torch.float32)[:, None]  # B x 1 x H x W
        slope_y = (rays[..., 1] / rays[..., 2]).to(torch.float32)[:, None]
        z_per_s = (torch.einsum("bhwi,bi->bhw", rays, c2w[:, :3, 2]) / rays[..., 2]).to(torch.float32)[:, None]
    chunk = plane_chunk or n_planes
    acc = trans = None  # running (rgb, depth, alpha) over the chunks
    plane_weights = [] if return_weights else None
    with torch.autocast(device_type=mpi.device.type, enabled=False):
        mpi = mpi.float()
        for start in range(0, n_planes, chunk):
            idx = slice(start, min(start + chunk, n_planes))
            with torch.set_grad_enabled(camera_grad):
                dist = (plane_depths[idx].to(torch.float64)[None, :] - oz[:, None])  # B x Lc, along z
                ext = plane_extents[idx].to(torch.float64)
                sx = (2 / ext[None, :, 1]).to(torch.float32)[..., None, None]
                sy = (2 / ext[None, :, 0]).to(torch.float32)[..., None, None]
                d32 = dist.to(torch.float32)[..., None, None]
                gx = (origins[:, None, 0].to(torch.float32)[..., None, None] + d32 * slope_x) * sx
                gy = (origins[:, None, 1].to(torch.float32)[..., None, None] + d32 * slope_y) * sy
                grid = torch.stack([gx, gy], dim=-1)  # B x Lc x H x W x 2
                z_depth = (d32 * z_per_s)[:, :, None]  # B x Lc x 1 x H x W
                if validate and check_inside and idx.stop == n_planes:
                    worst = float(grid[:, -1].abs().max())
                    if worst > 1.0 + 1e-6:
                        raise InputError(
                            f"rays leave the background plane (max |u|,|v| = {worst:.4f} > 1): the camera is outside "
                            f"the range the MPI was built for. Use poses within the preset's prior, or render "
                            f"with transparent borders (`gmpi render --allow-outside`; check_inside=False).")
            lc = grid.shape[1]
            tex = mpi[:, idx].reshape(b * lc, 4, *mpi.shape[-2:])
            warped = F.grid_sample(tex, grid.reshape(b * lc, height, width, 2), mode="bilinear",
                                   padding_mode="zeros", align_corners=True).reshape(b, lc, 4, height, width)
            *part, trans = composite(warped[:, :, :3], warped[:, :, 3:], z_depth, trans, plane_weights)
            del warped  # one warped stack alive at a time
            acc = part if acc is None else [a + p for a, p in zip(acc, part)]
    out = dict(zip(("rgb", "depth", "alpha"), acc))
    if return_weights:
        out["weights"] = torch.cat(plane_weights, dim=1)
    return out


# ------------------------------------------------------------------------------------------- shading
def canonical_depth(alpha: torch.Tensor, plane_depths: torch.Tensor) -> torch.Tensor:
    """Composite plane depths in texture space (no warping). alpha: B x L x H x W -> B x 1 x H x W."""
    a = alpha[:, :, None]
    d = plane_depths.to(alpha)[None, :, None, None, None].expand_as(a)
    _, depth, _, _ = composite(torch.zeros_like(a).expand(-1, -1, 3, -1, -1), a, d)
    return depth


def gaussian_blur_default_sigma(ksize: int) -> float:
    """OpenCV's / torchvision's sigma for a kernel size: 0.3 * ((k - 1) / 2 - 1) + 0.8."""
    return 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8


def mpi_point_cloud(alpha: torch.Tensor, plane_depths: torch.Tensor, plane_extents: torch.Tensor,
                    blur_ksize: int = 9) -> torch.Tensor:
    """World points of the MPI's visible surface, B x H x W x 3: the background plane's texel centres
    pulled along rays from the origin to the (blurred) canonical composited depth."""
    res = alpha.shape[-1]
    depth = canonical_depth(alpha, plane_depths)
    if blur_ksize > 1:
        sigma = gaussian_blur_default_sigma(blur_ksize)
        depth = TF.gaussian_blur(depth, [blur_ksize, blur_ksize], [sigma, sigma])
    far = texel_xyz(plane_depths[-1], plane_extents[-1], res).to(alpha)  # H x W x 3
    return far[None] * (depth[:, 0, :, :, None] / (far[None, :, :, 2:] + 1e-8))


def point_cloud_normals(points: torch.Tensor) -> torch.Tensor:
    """Unit normals of a B x H x W x 3 point grid from 4-neighbour cross products (flat -> (0, 0, -1))."""
    c = points[:, 1:-1, 1:-1]
    up, down = points[:, :-2, 1:-1] - c, points[:, 2:, 1:-1] - c
    left, right = points[:, 1:-1, :-2] - c, points[:, 1:-1, 2:] - c
    cross = torch.linalg.cross
    n = cross(up, left) + cross(left, down) + cross(down, right) + cross(right, up)
    n = F.pad(n.permute(0, 3, 1, 2), [1, 1, 1, 1], mode="replicate").permute(0, 2, 3, 1)
    return n / (n.norm(dim=-1, keepdim=True) + 1e-8)


def light_direction(yaw, pitch, sphere_center_z: float, sphere_r: float) -> torch.Tensor:
    """Unit direction from a light on the camera sphere at (yaw, pitch) towards the sphere centre, B x 3."""
    d = -sphere_c2w(yaw, pitch, sphere_center_z, sphere_r)[:, :3, 3]
    d[:, 2] += sphere_center_z
    return d / d.norm(dim=-1, keepdim=True)


def sample_light(n: int, yaw_mean=0.0, yaw_std=0.2, pitch_mean=0.2, pitch_std=0.05, n_stds=2.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Light (yaw, pitch) per MPI: in front of the face and slightly above (docs/METHOD.md §4.3)."""
    return (truncated_normal(n, yaw_mean, yaw_std, n_stds, generator),
            truncated_normal(n, pitch_mean, pitch_std, n_stds, generator))


def shade_mpi(mpi: torch.Tensor, plane_depths: torch.Tensor, plane_extents: torch.Tensor,
              light_dir: torch.Tensor, ka: float, kd: float, blur_ksize: int = 9) -> torch.Tensor:
    """Lambertian shading of every plane's RGB by the MPI's own canonical surface: rgb * (ka + kd * max(0, -n.l)),
    clipped to [0, 1]; alpha unchanged. light_dir: 3 or B x 3."""
    normals = point_cloud_normals(mpi_point_cloud(mpi[:, :, 3], plane_depths, plane_extents, blur_ksize))
    light_dir = torch.as_tensor(light_dir, dtype=mpi.dtype, device=mpi.device).reshape(-1, 1, 1, 3)
    diffuse = (-(normals * light_dir).sum(-1)).clamp(min=0)  # B x H x W
    factor = (ka + kd * diffuse)[:, None, None]
    return torch.cat([(mpi[:, :, :3] * factor).clamp(0, 1), mpi[:, :, 3:]], dim=2)


SHADING_SCHEDULES = ("as_coded", "ramp")


def shading_coefficients(n_calls: int, max_ka: float = 0.9, max_kd: float = 0.1, grow_iters: int = 1000,
                         schedule: str = "as_coded") -> tuple[float, float]:
    """(ka, kd) after ``n_calls`` shading calls (this one included). ``as_coded`` (official): both ramp up from 0, so
    the shaded image starts black and brightens to ka + kd*s in [0.9, 1]; ``ramp``: from unshaded (ka = 1, kd = 0)
    monotonically to (max_ka, max_kd)."""
    ratio = min(1.0, max(0, n_calls) / grow_iters)
    if schedule == "as_coded":
        return ratio * max_ka, ratio * max_kd
    if schedule == "ramp":
        return 1.0 - ratio * (1.0 - max_ka), ratio * max_kd
    raise InputError(f"unknown shading schedule {schedule!r}; expected one of {SHADING_SCHEDULES}")

