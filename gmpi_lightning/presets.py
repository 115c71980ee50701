"""Per-dataset constants in one table (docs/METHOD.md §1-§3, §6). No magic numbers elsewhere.

Lengths are in GMPI world units (the canonical camera sits at the origin, the camera sphere is
centred on the z-axis); angles in radians unless the name says ``_deg``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from .errors import InputError


@dataclass(frozen=True)
class Preset:
    name: str
    resolution: int
    fov_deg: float                 # horizontal field of view of every camera (real and fake)
    near: float                    # depth of plane 0 (nearest)
    far: float                     # depth of plane L-1 (background)
    sphere_center_z: float         # camera sphere centre (0, 0, c)
    sphere_r: float                # camera sphere radius
    yaw_mean: float                # training pose prior (truncated Gaussian by default)
    yaw_std: float
    pitch_mean: float
    pitch_std: float
    n_truncated_stds: float
    pose_sample_method: str = "truncated_gaussian"
    depth_sample_method: str = "inverse"     # plane spacing: uniform in disparity
    spatial_enlarge_factor: float = 1.001    # background plane only
    confined_volume: bool = True
    channel_base: int = 32768
    channel_max: int = 512
    num_fp16_res: int = 4
    conv_clamp: float | None = 256
    batch_per_gpu: int = 4
    batch_split: int = 1
    r1_gamma: float = 10.0
    lr: float = 0.002
    train_planes: int = 32
    eval_planes: int = 96
    pretrained_pickle: str = ""             # the NVlabs pickle the official runs start from (user supplies it)

    def plane_depths(self, n_planes: int, method: str | None = None) -> torch.Tensor:
        from .planes import make_plane_depths

        return make_plane_depths(self.near, self.far, n_planes, method or self.depth_sample_method)

    def normalized_plane_depths(self, n_planes: int, method: str | None = None) -> torch.Tensor:
        """What the alpha branch is conditioned on: (d - near) / (far - near), index 0 nearest."""
        from .planes import normalize_depths

        return normalize_depths(self.plane_depths(n_planes, method), self.near, self.far)

    def to_dict(self) -> dict:
        return asdict(self)


_FFHQ = dict(fov_deg=12.6, near=0.95, far=1.12, sphere_center_z=1.0, sphere_r=1.0, yaw_mean=0.0, yaw_std=0.289,
             pitch_mean=0.0, pitch_std=0.127, n_truncated_stds=2)

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("FFHQ256", resolution=256, channel_base=16384, batch_per_gpu=8,
           pretrained_pickle="ffhq-res256-mirror-paper256-noaug.pkl", **_FFHQ),
    Preset("FFHQ512", resolution=512, pretrained_pickle="ffhq-res512-mirror-stylegan2-noaug.pkl", **_FFHQ),
    Preset("FFHQ1024", resolution=1024, batch_split=2, pretrained_pickle="ffhq-res1024-mirror-stylegan2-noaug.pkl",
           **_FFHQ),
    Preset("AFHQCat", resolution=512, fov_deg=13.39, near=2.55, far=2.80, sphere_center_z=2.7, sphere_r=2.7,
           yaw_mean=0.0, yaw_std=0.19, pitch_mean=0.0, pitch_std=0.15, n_truncated_stds=3,
           pretrained_pickle="afhqcat.pkl"),
    Preset("MetFaces", resolution=1024, batch_split=2, pretrained_pickle="metfaces.pkl",
           **dict(_FFHQ, yaw_std=0.339, pitch_std=0.133)),
    # Procedural heads (datamodules/synthetic.py): FFHQ geometry and pose prior, small networks for CPU runs.
    *(Preset(f"synthetic{res}", resolution=res, channel_base=4096, channel_max=128, num_fp16_res=0, conv_clamp=None,
             batch_per_gpu=8, **_FFHQ) for res in (32, 64, 128)),
]}

# Shading augmentation (docs/METHOD.md §4.3): light on the camera sphere, Lambertian with ambient ka and diffuse kd.
SHADING = dict(start_iter=1000, grow_iters=1000, max_ka=0.9, max_kd=0.1, light_yaw_mean=0.0, light_yaw_std=0.2,
               light_pitch_mean=0.2, light_pitch_std=0.05, light_n_truncated_stds=2, blur_ksize=9)


def get_preset(name: str, **overrides) -> Preset:
    """A preset by name (case-insensitive), optionally with fields replaced (e.g. ``resolution=64``)."""
    for key, preset in PRESETS.items():
        if key.lower() == name.lower():
            return replace(preset, **overrides) if overrides else preset
    raise InputError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
