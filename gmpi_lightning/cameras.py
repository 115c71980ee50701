"""Cameras in GMPI's conventions (docs/METHOD.md §1). Pure functions of tensors.

World frame +X right, +Y down, +Z forward; OpenCV cameras, ``c2w`` columns = camera axes and centre. Poses sit on a
sphere (centre (0, 0, c), radius r) looking at its centre without roll; yaw = pitch = 0 is the canonical camera at the
origin (c = r) with identity rotation; +yaw moves it to +X, +pitch up (-Y). D's condition: w2c flattened row-major.
"""

from __future__ import annotations

import math

import torch

from .errors import InputError

# Flip of the y and z axes: OpenGL-style (y up, z towards the viewer) <-> OpenCV-style frames.
_FLIP_YZ = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


def focal_from_fov(fov_deg: float, width: int) -> float:
    return width / (2.0 * math.tan(math.radians(fov_deg) / 2.0))


def intrinsics(fov_deg: float, height: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """3 x 3 K: focal from the horizontal fov, principal point (W/2, H/2) (pixel centres are at +0.5)."""
    f = focal_from_fov(fov_deg, width)
    return torch.tensor([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]], dtype=dtype)


def pixel_rays(c2w: torch.Tensor, fov_deg: float, height: int, width: int,
               pixel_centres: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit ray directions in world coordinates, B x H x W x 3, and ray origins B x 3. Pixel (u, v) goes through
    (u + 0.5, v + 0.5) when ``pixel_centres`` (the renderer), else through the corner grid point (u, v)."""
    c2w = _as_batch(c2w)
    dtype, device = c2w.dtype, c2w.device
    f = focal_from_fov(fov_deg, width)
    off = 0.5 if pixel_centres else 0.0
    v, u = torch.meshgrid(torch.arange(height, dtype=dtype, device=device) + off,
                          torch.arange(width, dtype=dtype, device=device) + off, indexing="ij")
    dirs = torch.stack([(u - width / 2.0) / f, (v - height / 2.0) / f, torch.ones_like(u)], dim=-1)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    world = torch.einsum("bij,hwj->bhwi", c2w[:, :3, :3], dirs)
    return world, c2w[:, :3, 3]


def _as_batch(m: torch.Tensor) -> torch.Tensor:
    if m.ndim == 2:
        m = m[None]
    if m.shape[-2:] != (4, 4):
        raise InputError(f"expected 4 x 4 camera matrices, got shape {tuple(m.shape)}")
    return m


def _axis(i: int, value: float, device) -> torch.Tensor:
    """value * e_i (float64, 3-vector) on ``device``, filled there rather than copied from the host."""
    v = torch.zeros(3, dtype=torch.float64, device=device)
    v[i] = value
    return v


def sphere_c2w(yaw, pitch, sphere_center_z: float, sphere_r: float, dtype=torch.float32) -> torch.Tensor:
    """Camera-to-world matrices (B x 4 x 4) for cameras on the sphere looking at its centre. Computed in float64 and
    cast, like the official code (numpy/scipy float64, then float32)."""
    yaw = torch.as_tensor(yaw, dtype=torch.float64).reshape(-1)
    device = yaw.device  # computed where the angles live (no host round trip for device-sampled poses)
    pitch = torch.as_tensor(pitch, dtype=torch.float64, device=device).reshape(-1)
    if yaw.shape != pitch.shape:
        raise InputError(f"yaw and pitch must have the same length, got {yaw.numel()} and {pitch.numel()}")
    centre = _axis(2, sphere_center_z, device)  # (0, 0, c), made on the device (no host-to-device copy)
    cp = pitch.cos().abs()
    offset = torch.stack([cp * yaw.sin(), -pitch.sin(), -cp * yaw.cos()], dim=-1) * sphere_r
    eye = centre + offset
    forward = -offset / offset.norm(dim=-1, keepdim=True)
    down_world = _axis(1, 1.0, device).expand_as(forward)
    right = torch.linalg.cross(down_world, forward)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(forward, right)
    down = down / down.norm(dim=-1, keepdim=True)
    c2w = torch.eye(4, dtype=torch.float64, device=device).repeat(yaw.numel(), 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, down, forward, eye
    return c2w.to(dtype)


def truncated_normal(n: int, mean: float, std: float, n_stds: float, generator: torch.Generator | None = None,
                     dtype=torch.float32) -> torch.Tensor:
    """The official sampler: 4 normal draws per value, the first strictly inside (mean +- n_stds*std),
    else draw 0 clamped to the bounds. Drawn on the generator's device."""
    draws = torch.randn(n, 4, generator=generator, dtype=torch.float64, device=_device_of(generator))
    inside = (draws > -n_stds) & (draws < n_stds)
    first = torch.where(inside.any(dim=1), inside.to(torch.int8).argmax(dim=1),
                        torch.zeros(n, dtype=torch.long, device=draws.device))
    picked = draws.gather(1, first[:, None])[:, 0].clamp(-n_stds, n_stds)
    return (mean + std * picked).to(dtype)


def _device_of(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


POSE_SAMPLE_METHODS = ("truncated_gaussian", "uniform", "gaussian")


def sample_sphere_pose(n: int, yaw_mean: float, yaw_std: float, pitch_mean: float, pitch_std: float,
                       n_truncated_stds: float = 2.0, method: str = "truncated_gaussian",
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(yaw, pitch), each of length n, from the training pose prior."""
    if method == "truncated_gaussian":
        yaw = truncated_normal(n, yaw_mean, yaw_std, n_truncated_stds, generator)
        pitch = truncated_normal(n, pitch_mean, pitch_std, n_truncated_stds, generator)
    elif method == "uniform":
        u = torch.rand(2, n, generator=generator, device=_device_of(generator)) * 2 - 1
        yaw = yaw_mean + u[0] * n_truncated_stds * yaw_std
        pitch = pitch_mean + u[1] * n_truncated_stds * pitch_std
    elif method == "gaussian":
        g = torch.randn(2, n, generator=generator, device=_device_of(generator))
        yaw, pitch = yaw_mean + g[0] * yaw_std, pitch_mean + g[1] * pitch_std
    else:
        raise InputError(f"unknown pose sample method {method!r}; expected one of {POSE_SAMPLE_METHODS}")
    return yaw, pitch


def sample_preset_pose(n: int, preset, generator: torch.Generator | None = None):
    """(yaw, pitch) from a :class:`~gmpi_lightning.presets.Preset`'s prior."""
    return sample_sphere_pose(n, preset.yaw_mean, preset.yaw_std, preset.pitch_mean, preset.pitch_std,
                              preset.n_truncated_stds, preset.pose_sample_method, generator)


def pose_range(preset) -> tuple[tuple[float, float], tuple[float, float]]:
    """(yaw, pitch) intervals of a preset's training prior: mean +- n_truncated_stds * std."""
    n = preset.n_truncated_stds
    return ((preset.yaw_mean - n * preset.yaw_std, preset.yaw_mean + n * preset.yaw_std),
            (preset.pitch_mean - n * preset.pitch_std, preset.pitch_mean + n * preset.pitch_std))


def clamp_to_prior(yaw: float, pitch: float, preset) -> tuple[float, float]:
    """(yaw, pitch) moved into the preset's prior range (:func:`pose_range`), unchanged when inside it."""
    (y0, y1), (p0, p1) = pose_range(preset)
    return min(max(float(yaw), y0), y1), min(max(float(pitch), p0), p1)


def invert_rigid(m: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid 4 x 4 transforms (R, t) -> (R^T, -R^T t)."""
    m = _as_batch(m)
    out = torch.zeros_like(m)
    rt = m[:, :3, :3].transpose(1, 2)
    out[:, :3, :3] = rt
    out[:, :3, 3] = -(rt @ m[:, :3, 3:4])[..., 0]
    out[:, 3, 3] = 1
    return out


def flatten_w2c(c2w: torch.Tensor) -> torch.Tensor:
    """The discriminator's pose condition: inverse(c2w) flattened row-major, B x 16. Camera matrices are rigid: the
    closed-form inverse (in float64) needs no solver, whose singularity check would wait on the device."""
    c2w = _as_batch(c2w)
    return invert_rigid(c2w.to(torch.float64)).to(c2w.dtype).reshape(c2w.shape[0], 16)


def _translation(z: float) -> torch.Tensor:
    t = torch.eye(4, dtype=torch.float64)
    t[2, 3] = z
    return t


def _place_on_sphere(w2c: torch.Tensor, sphere_center_z: float, sphere_r: float) -> torch.Tensor:
    """Keep the rotation, move the camera centre along the ray from the sphere centre onto the sphere."""
    rot, t = w2c[:, :3, :3], w2c[:, :3, 3:4]
    centre_cam = -(rot.transpose(1, 2) @ t)[..., 0]
    c = torch.tensor([0.0, 0.0, sphere_center_z], dtype=w2c.dtype)
    d = centre_cam - c
    norm = d.norm(dim=-1, keepdim=True)
    if bool((norm < 1e-12).any()):
        raise InputError("camera centre coincides with the sphere centre; cannot place it on the sphere")
    new_centre = c + d / norm * sphere_r
    out = w2c.clone()
    out[:, :3, 3] = -(rot @ new_centre[..., None])[..., 0]
    return out


def _rot_x(a):
    c, s, o, z = a.cos(), a.sin(), torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([o, z, z, z, c, -s, z, s, c], -1).reshape(-1, 3, 3)


def _rot_y(a):
    c, s, o, z = a.cos(), a.sin(), torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(-1, 3, 3)


def _rot_z(a):
    c, s, o, z = a.cos(), a.sin(), torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(-1, 3, 3)


DEEP3DFACE_CAMERA_DISTANCE = 10.0


def w2c_from_deep3dface(angle, trans, sphere_center_z: float, sphere_r: float,
                        normalize_trans: bool = True) -> torch.Tensor:
    """Deep3DFaceRecon coefficients (angle = (x, y, z) radians, trans 3-vector) -> GMPI w2c, B x 4 x 4:
    ``w2c = F . T(0,0,-10) . [R|t] . F . T(0,0,-c)``, ``R = Rz Ry Rx``, ``F = diag(1,-1,-1,1)``; then on the sphere."""
    angle = torch.as_tensor(angle, dtype=torch.float64).reshape(-1, 3)
    trans = torch.as_tensor(trans, dtype=torch.float64).reshape(-1, 3)
    if angle.shape[0] != trans.shape[0]:
        raise InputError(f"angle and trans batch sizes differ: {angle.shape[0]} vs {trans.shape[0]}")
    pose = torch.eye(4, dtype=torch.float64).repeat(angle.shape[0], 1, 1)
    pose[:, :3, :3] = _rot_z(angle[:, 2]) @ _rot_y(angle[:, 1]) @ _rot_x(angle[:, 0])
    pose[:, :3, 3] = trans
    w2c = _FLIP_YZ @ _translation(-DEEP3DFACE_CAMERA_DISTANCE) @ pose @ _FLIP_YZ @ _translation(-sphere_center_z)
    if normalize_trans:
        w2c = _place_on_sphere(w2c, sphere_center_z, sphere_r)
    return w2c.to(torch.float32)


def w2c_from_eg3d_label(label, sphere_center_z: float, sphere_r: float, normalize_trans: bool = True) -> torch.Tensor:
    """EG3D labels (B x 25 or B x 16: cam2world, OpenCV camera, y-up world) -> GMPI w2c, B x 4 x 4."""
    label = torch.as_tensor(label, dtype=torch.float32).reshape(-1, torch.as_tensor(label).shape[-1])
    if label.shape[1] not in (16, 25):
        raise InputError(f"an EG3D label has 25 numbers (16 cam2world + 9 intrinsics), got {label.shape[1]}")
    c2w = label[:, :16].reshape(-1, 4, 4).to(torch.float64)
    w2c = torch.linalg.inv(c2w) @ _FLIP_YZ @ _translation(-sphere_center_z)
    if normalize_trans:
        w2c = _place_on_sphere(w2c, sphere_center_z, sphere_r)
    return w2c.to(torch.float32)


def yaw_pitch_from_w2c(w2c: torch.Tensor, sphere_center_z: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles of the camera centre seen from the sphere centre (inverse of :func:`sphere_c2w`'s placement)."""
    w2c = _as_batch(torch.as_tensor(w2c)).to(torch.float64)
    centre = -(w2c[:, :3, :3].transpose(1, 2) @ w2c[:, :3, 3:4])[..., 0]
    d = centre - torch.tensor([0.0, 0.0, sphere_center_z], dtype=torch.float64)
    yaw = torch.atan2(d[:, 0], -d[:, 2])
    pitch = torch.atan2(-d[:, 1], torch.sqrt(d[:, 0] ** 2 + d[:, 2] ** 2))
    return yaw.to(torch.float32), pitch.to(torch.float32)


def deep3dface_dataset_angles(angle) -> tuple[torch.Tensor, torch.Tensor]:
    """The bookkeeping (yaw, pitch) FFHQ/MetFaces datasets report: (-angle_y, angle_x)."""
    angle = torch.as_tensor(angle, dtype=torch.float32).reshape(-1, 3)
    return -angle[:, 1], angle[:, 0]
