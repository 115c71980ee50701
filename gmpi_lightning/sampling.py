"""Seeds to pictures: the one service behind ``gmpi render``, the browser page, the media callbacks and the
evaluation fakes.

    sampler = Sampler(G, preset, planes=96, device="cuda", noise_mode="const")
    mpi = sampler.mpi(seed)                            # 1 x L x 4 x R x R in [0, 1]
    rgb, depth = sampler.view(mpi, yaw=0.3, pitch=0)   # H x W x 3 uint8 each (depth colour-mapped near..far)
    frames = sampler.sweep(mpi, "yaw", 48)             # RGB | depth side by side, one array per frame
    verts, faces, colors = sampler.mesh(seed)          # marching cubes over the alpha volume

Seed ``s`` is ``z = RandomState(s).randn(z_dim)`` (NVlabs' ``gen_images.py``). Noise: ``const`` (the generator's
constant maps), ``none``, or ``random`` drawn per seed from a generator seeded ``s + 1_000_003``, so a seed's MPI
does not depend on the batch it is generated in, the process or the world size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from . import export
from .errors import InputError
from .presets import Preset
from .scene import Scene, seed_latents

NOISE_SEED_OFFSET = 1_000_003


class Sampler:
    """A generator with everything needed to turn seeds into MPIs and pictures.

    Args:
        G: an MPI generator (``GMPIGenerator``, ``FlatMPIGenerator``) or, for :meth:`image_2d` only, a 2D StyleGAN2.
        preset: camera model and plane range; planes: a plane count or a :class:`~gmpi_lightning.scene.Scene`.
        resolution: rendered size (default: the preset's); truncation_psi, noise_mode: generation settings.
        plane_chunk: planes per chunk in generation and compositing (memory).
        check_inside: stop on a camera outside the planes' volume (False: those rays render transparent).
    """

    def __init__(self, G, preset: Preset, planes: int | Scene | None = 32, device=None, resolution: int | None = None,
                 truncation_psi: float = 1.0, noise_mode: str = "const", plane_chunk: int | None = None,
                 check_inside: bool = True):
        if noise_mode not in ("const", "random", "none"):
            raise InputError(f"noise_mode must be const, random or none, got {noise_mode!r}")
        tensors = list(G.parameters()) + list(G.buffers())
        self.device = torch.device(device) if device is not None else (
            tensors[0].device if tensors else torch.device("cpu"))
        if resolution is not None and resolution < 1:
            raise InputError(f"resolution must be a positive number of pixels, got {resolution}")
        self.G, self.preset, self.resolution = G, preset, resolution or preset.resolution
        self.truncation_psi, self.noise_mode = truncation_psi, noise_mode
        self.plane_chunk, self.check_inside = plane_chunk, check_inside
        self.scene = planes.to(self.device) if isinstance(planes, Scene) else (
            None if planes is None else Scene.for_generator(G, preset, planes, self.device))

    def latents(self, seeds) -> torch.Tensor:
        return seed_latents(seeds, self.G.z_dim, self.device)

    def mpis(self, seeds) -> torch.Tensor:
        """B x L x 4 x R x R in [0, 1] for these seeds."""
        kw = dict(truncation_psi=self.truncation_psi, plane_chunk=self.plane_chunk)
        z = self.latents(seeds)
        if self.noise_mode != "random":
            return self.scene.generate(self.G, z, noise_mode=self.noise_mode, **kw)
        noise, out = torch.Generator(self.device), []
        for i, s in enumerate(seeds):
            noise.manual_seed(int(s) + NOISE_SEED_OFFSET)
            out.append(self.scene.generate(self.G, z[i:i + 1], noise_mode="random", noise_generator=noise, **kw))
        return torch.cat(out)

    def mpi(self, seed: int) -> torch.Tensor:
        return self.mpis([seed])

    def render(self, mpi: torch.Tensor, c2w: torch.Tensor, return_weights: bool = False) -> dict:
        """``rgb``, ``depth``, ``alpha`` (B x C x H x W) of ``mpi`` from cameras ``c2w``."""
        return self.scene.render(mpi, c2w, self.resolution, plane_chunk=self.plane_chunk,
                                 check_inside=self.check_inside, return_weights=return_weights)

    def view(self, mpi: torch.Tensor, yaw: float, pitch: float) -> tuple[np.ndarray, np.ndarray]:
        """(RGB, depth colour-mapped over the preset's near..far and weighted by coverage) of the first MPI."""
        return export.view_images(self.render(mpi[:1], self.scene.camera(yaw, pitch)), self.preset)

    def sweep(self, mpi: torch.Tensor, trajectory: str = "yaw", frames: int = 48) -> list[np.ndarray]:
        """A camera sweep about the preset's mean pose: RGB | depth side by side per frame."""
        p = self.preset
        return [np.concatenate(self.view(mpi, yaw, pitch), axis=1)
                for yaw, pitch in export.sweep_poses(trajectory, frames, p.yaw_mean, p.pitch_mean)]

    def mesh(self, seed: int, grid: int | None = None, level: float = 0.5):
        """(vertices, faces, colours) of the alpha volume's iso-surface at ``level`` (see ``export.extract_mesh``)."""
        noise = "const" if self.noise_mode == "random" else self.noise_mode
        return export.extract_mesh(self.G, self.latents([seed]), self.preset,
                                   export.mesh_extent(self.scene.planes.extents), grid=grid, level=level,
                                   truncation_psi=self.truncation_psi, noise_mode=noise)

    def image_2d(self, seed: int) -> np.ndarray:
        """A 2D StyleGAN2's image, H x W x 3 uint8."""
        img = self.G(self.latents([seed]), None, truncation_psi=self.truncation_psi, noise_mode="const")
        return export.to_uint8((img[0] + 1) / 2)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[Sampler]:
        """No grad, eval mode (restored after), forked RNG streams: sampling leaves a training run untouched."""
        was_training = self.G.training
        cuda = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            self.G.eval()
            try:
                yield self
            finally:
                self.G.train(was_training)
