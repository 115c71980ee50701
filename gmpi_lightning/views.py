"""How a GAN's fakes are made and judged (docs/TRAINING.md, docs/METHOD.md §4-§6): :class:`Images2D` (a StyleGAN2's
images, no condition) and :class:`PosedViews` (GMPI's posed MPI views). Both answer the same four questions::

    cond = fakes.sample(n, generator)                 # what n fakes are made for (cameras, or None)
    x = fakes.images(G, z, cond, generator, it)       # the images D sees, in [-1, 1] (it: shade from then on)
    fakes.condition(cond), fakes.real_condition(batch)  # D's condition for fakes and reals
    cond = fakes.g_step_condition(G, D, z, generator) # what the G step renders (GMPI: the worst view)
"""

from __future__ import annotations

import torch

from . import cameras
from .hparams import Shading, Views
from .presets import SHADING
from .render import light_direction, sample_light, shade_mpi, shading_coefficients
from .scene import Scene


class Images2D:
    """A 2D generator's images: no camera, no condition."""

    def to(self, device) -> Images2D:
        return self

    def sample(self, n: int, generator: torch.Generator):
        return None

    def images(self, G, z: torch.Tensor, cond, generator: torch.Generator | None = None, shade_at: int | None = None,
               noise_mode: str = "random") -> torch.Tensor:
        return G(z, None, noise_mode=noise_mode, noise_generator=generator)

    def condition(self, cond) -> torch.Tensor | None:
        return None

    def real_condition(self, batch: dict) -> torch.Tensor | None:
        return None

    def g_step_condition(self, G, D, z: torch.Tensor, generator: torch.Generator):
        return None

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def logs(self) -> dict:
        return {}


class PosedViews(Images2D):
    """GMPI's fakes: an MPI per latent rendered at a camera from the preset's prior, the flattened world-to-camera
    matrix as D's condition, the G step's worst of ``views.per_z`` cameras as scored by the current D, and the shading
    augmentation after ``shading.start`` iterations.

    Args:
        scene: the preset and the training planes.
        pose_conditioning: D sees the camera (GMPI); False is the ablation.
        views: the G step's candidates per latent and how one is kept (``worst`` or ``random``).
        shading: the shading augmentation (schedule ``as_coded``: official).
    """

    def __init__(self, scene: Scene, pose_conditioning: bool = True, views: Views = Views(),
                 shading: Shading = Shading()):
        self.scene, self.pose_conditioning, self.views, self.shading = scene, pose_conditioning, views, shading
        self.shading_calls, self.last_shading = 0, 1.0  # calls counted as the official code counts them

    def to(self, device) -> PosedViews:
        self.scene = self.scene.to(device)
        return self

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n cameras (c2w) from the preset's prior."""
        return self.scene.sample_cameras(n, generator)

    def render(self, mpi: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
        """RGB in [-1, 1] at the training resolution. No value checks: the loop's own MPIs and prior cameras."""
        return self.scene.render(mpi, c2w, validate=False)["rgb"] * 2 - 1

    def shade(self, mpi: torch.Tensor, generator: torch.Generator, iteration: int | None) -> torch.Tensor:
        """The shading augmentation from iteration ``shading.start`` on (None: never)."""
        s = self.shading
        if not s.enabled or iteration is None or iteration < s.start:  # official: 1-based step > start
            return mpi
        self.shading_calls += 1
        ka, kd = shading_coefficients(self.shading_calls, SHADING["max_ka"], SHADING["max_kd"], s.grow, s.schedule)
        yaw, pitch = sample_light(mpi.shape[0], SHADING["light_yaw_mean"], SHADING["light_yaw_std"],
                                  SHADING["light_pitch_mean"], SHADING["light_pitch_std"],
                                  SHADING["light_n_truncated_stds"], generator=generator)
        light = light_direction(yaw, pitch, self.scene.preset.sphere_center_z, self.scene.preset.sphere_r).to(mpi)
        self.last_shading, planes = ka + kd, self.scene.planes
        return shade_mpi(mpi, planes.depths, planes.extents, light, ka, kd, SHADING["blur_ksize"])

    def images(self, G, z, cond, generator=None, shade_at=None, noise_mode="random") -> torch.Tensor:
        mpi = self.scene.generate(G, z, noise_mode=noise_mode, noise_generator=generator)
        return self.render(self.shade(mpi, generator, shade_at), cond)

    def condition(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        return cameras.flatten_w2c(cond) if cond is not None and self.pose_conditioning else None

    def real_condition(self, batch: dict) -> torch.Tensor | None:
        return batch["w2c"] if self.pose_conditioning else None

    @torch.no_grad()
    def g_step_condition(self, G, D, z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Per z, the camera (of ``views.per_z`` prior cameras) with the lowest D logit, unshaded: c2w B x 4 x 4. Scored
        view by view: on a CPU 4 D calls of B images take 25 % less time than one of 4B (measured: 32 px, B = 8)."""
        n, b = self.views.per_z, z.shape[0]
        c2w = self.sample(b * n, generator).reshape(b, n, 4, 4)
        if self.views.selection == "random" or n == 1:
            return c2w[:, 0]
        mpi = self.scene.generate(G, z, noise_mode="random", noise_generator=generator)
        logits = torch.stack([D(self.render(mpi, c2w[:, k]), self.condition(c2w[:, k]))[:, 0] for k in range(n)],
                             dim=1)  # B x n
        return c2w[torch.arange(b, device=c2w.device), logits.argmin(dim=1)]

    def state(self) -> dict:
        return {"shading_calls": self.shading_calls}

    def load_state(self, state: dict) -> None:
        self.shading_calls = int(state.get("shading_calls", 0))

    def logs(self) -> dict:
        return {"shading": float(self.last_shading)}
