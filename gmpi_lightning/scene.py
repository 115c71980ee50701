"""One path from a latent to pictures: preset + planes -> MPIs -> rendered views.

Every caller that turns latents into images (the training module, the media callbacks, the evaluation fakes and
``gmpi render``) goes through :class:`Scene`, so none of them has to remember that the generator takes the
*normalised* plane depths and the renderer the *metric* depths plus the extents::

    scene = Scene(preset, 32, device="cuda")           # or Scene.for_generator(G, preset, 96)
    z = scene.seed_latents([0, 1], G.z_dim)             # NVlabs' seed convention
    mpi = scene.generate(G, z)                          # B x L x 4 x R x R
    out = scene.render_pose(mpi, yaw=0.3, pitch=0.0)    # {'rgb', 'depth', 'alpha'}
    c2w = scene.sample_cameras(8, generator=g)          # the preset's training prior, on g's device
"""

from __future__ import annotations

import numpy as np
import torch

from .cameras import sample_preset_pose, sphere_c2w
from .nn.alpha import fixed_planes
from .planes import Planes, preset_planes
from .presets import Preset
from .render import render_mpi


def generated_planes(G, requested: int) -> int:
    """The vanilla alpha branch can only make its training plane count (docs/METHOD.md §3.3)."""
    return G.n_train_planes if fixed_planes(G) else requested


def seed_latents(seeds, z_dim: int, device="cpu") -> torch.Tensor:
    """NVlabs' convention (gen_images.py): latent of seed s = RandomState(s).randn(z_dim); B x z_dim."""
    z = np.stack([np.random.RandomState(int(s)).randn(z_dim) for s in seeds]).astype(np.float32)
    return torch.from_numpy(z).to(device)


class Scene:
    """A preset (cameras, fov, architecture constants) and the planes of its MPIs, on one device.

    Args:
        preset: the camera model and plane range (:mod:`gmpi_lightning.presets`).
        planes: a plane count (spaced by the preset) or a :class:`~gmpi_lightning.planes.Planes`.
        device: where MPIs are generated and rendered (the planes are copied there once).
    """

    def __init__(self, preset: Preset, planes: int | Planes, device: str | torch.device = "cpu"):
        self.preset = preset
        self.planes = (planes if isinstance(planes, Planes) else preset_planes(preset, planes)).to(device)

    @classmethod
    def for_generator(cls, G, preset: Preset, planes: int, device: str | torch.device = "cpu") -> Scene:
        """The planes ``G`` can generate: ``planes``, or its training count for the vanilla alpha branch."""
        return cls(preset, generated_planes(G, planes), device)

    @property
    def device(self) -> torch.device:
        return self.planes.device

    def to(self, device: str | torch.device) -> Scene:
        return self if torch.device(device) == self.device else Scene(self.preset, self.planes, device)

    # ------------------------------------------------------------------------------------------------ cameras
    def seed_latents(self, seeds, z_dim: int) -> torch.Tensor:
        return seed_latents(seeds, z_dim, self.device)

    def camera(self, yaw, pitch) -> torch.Tensor:
        """c2w (B x 4 x 4) of cameras on the preset's sphere, on this scene's device."""
        return sphere_c2w(torch.as_tensor(yaw, dtype=torch.float64, device=self.device), pitch,
                          self.preset.sphere_center_z, self.preset.sphere_r)

    def sample_cameras(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n cameras (c2w) from the preset's training prior, drawn from ``generator`` on its device (default: the
        global CPU stream), returned on this scene's device."""
        return self.camera(*sample_preset_pose(n, self.preset, generator=generator))

    # ------------------------------------------------------------------------------------------------ MPIs
    def generate(self, G, z: torch.Tensor, truncation_psi: float = 1.0, noise_mode: str = "const",
                 noise_generator: torch.Generator | None = None, plane_chunk: int | None = None) -> torch.Tensor:
        """MPIs of latents ``z``: B x L x 4 x R x R in [0, 1]. The planes were checked when they were made."""
        return G(z, None, self.planes.normalized, truncation_psi=truncation_psi, noise_mode=noise_mode,
                 plane_chunk=plane_chunk, noise_generator=noise_generator, check_planes=False)

    def render(self, mpi: torch.Tensor, c2w: torch.Tensor, resolution: int | None = None,
               plane_chunk: int | None = None, check_inside: bool = True, validate: bool = True,
               return_weights: bool = False) -> dict[str, torch.Tensor]:
        """Views of ``mpi`` from cameras ``c2w`` (see :func:`~gmpi_lightning.render.render_mpi`); ``resolution``
        defaults to the preset's."""
        r = resolution or self.preset.resolution
        return render_mpi(mpi, self.planes.depths, self.planes.extents, c2w.to(mpi.device), self.preset.fov_deg, r, r,
                          check_inside=check_inside, plane_chunk=plane_chunk, return_weights=return_weights,
                          validate=validate)

    def render_pose(self, mpi: torch.Tensor, yaw, pitch, **kw) -> dict[str, torch.Tensor]:
        return self.render(mpi, self.camera(yaw, pitch), **kw)
