"""A pose reader taught by the generator itself: a :class:`~gmpi_lightning.estimators.PoseCNN` trained on the
checkpoint's own renders, whose cameras are known because they were drawn from the preset's prior. It needs no
labelled data, so every checkpoint has one (docs/INVERSION.md describes and measures it).

    reader = reader_for(ckpt, G, preset)                       # trained once, then cached next to the checkpoint
    yaw, pitch = reader(image * 2 - 1)[0]                       # image: B x 3 x H x W in [0, 1]
    SearchSettings(yaw_range=yaw_window(yaw, preset))           # the camera search, on the reader's side
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .cameras import pose_range, sample_preset_pose
from .data import file_sha256, write_atomic
from .errors import InputError
from .estimators import PoseCNN
from .scene import Scene

FORMAT = "gmpi-pose-reader"


@dataclass
class ReaderSettings:
    samples: int = 8192     # renders drawn once (latent, camera from the prior, random noise), 8-bit like files
    steps: int = 2000       # Adam steps, batches drawn with replacement from the renders
    batch: int = 64
    lr: float = 2e-3        # cosine-decayed
    width: int = 16         # PoseCNN channels
    seed: int = 0

    def __post_init__(self):
        if min(self.samples, self.steps, self.batch, self.width) < 1:
            raise InputError(f"pose reader settings must be >= 1, got {asdict(self)}")


@torch.no_grad()
def posed_renders(G, preset, n: int, generator: torch.Generator, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """n renders of the checkpoint in [-1, 1] (rounded to 8 bits, as a file would hold them) and their n x 2 (yaw,
    pitch), at the preset's training planes and resolution."""
    scene = Scene.for_generator(G, preset, preset.train_planes, generator.device)
    images, poses = [], []
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        z = torch.randn(m, G.z_dim, generator=generator, device=generator.device)
        yaw, pitch = sample_preset_pose(m, preset, generator=generator)
        mpi = scene.generate(G, z, noise_mode="random", noise_generator=generator)
        rgb = scene.render(mpi, scene.camera(yaw, pitch))["rgb"]
        images.append(((rgb * 255 + 0.5).floor() / 255 * 2 - 1).cpu())
        poses.append(torch.stack([yaw, pitch], 1).float().cpu())
    return torch.cat(images), torch.cat(poses)


def train_reader(G, preset, settings: ReaderSettings | None = None, device: str = "cpu",
                 progress_bar: bool = True, augment=None) -> tuple[PoseCNN, dict]:
    """(reader, info): a PoseCNN trained on ``settings.samples`` renders of ``G``; ``info`` holds the settings, the
    seconds and the mean |yaw| / |pitch| error on 256 further renders (the reader on the generator's own pictures).
    ``augment(images, generator)``, if given, transforms every training batch (benchmarks/pose_reader_gap.py)."""
    from .export import progress

    s, t0 = settings or ReaderSettings(), time.perf_counter()
    gen = torch.Generator(device).manual_seed(s.seed)
    images, poses = posed_renders(G, preset, s.samples + 256, gen)
    (images, held_images), (poses, held_poses) = images.split([s.samples, 256]), poses.split([s.samples, 256])
    t_render = time.perf_counter() - t0
    reader = PoseCNN(min(G.img_resolution, 64), s.width)
    mean, std = poses.mean(0), poses.std(0).clamp_min(1e-3)
    reader.pose_mean.copy_(mean)
    reader.pose_std.copy_(std)
    opt = torch.optim.Adam(reader.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k / s.steps, 1.0))))
    draws = torch.Generator().manual_seed(s.seed)
    reader.train()
    for _ in progress(range(s.steps), desc="gmpi pose reader", unit="step", disable=not progress_bar):
        idx = torch.randint(0, s.samples, (s.batch,), generator=draws)
        x = images[idx] if augment is None else augment(images[idx], draws)
        loss = F.mse_loss(reader.forward_normalized(x), (poses[idx] - mean) / std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    reader.eval()
    with torch.no_grad():
        err = (reader(held_images) - held_poses).abs().mean(0)
    info = {"settings": asdict(s), "seconds": {"render": round(t_render, 1),
                                               "total": round(time.perf_counter() - t0, 1)},
            "own_renders_error": {"yaw": float(err[0]), "pitch": float(err[1]), "n": len(held_poses)}}
    return reader, info


def reader_path(ckpt: str | Path) -> Path:
    """Where the reader of a checkpoint is cached: next to it, ``<name>.pose_reader.pt``."""
    return Path(ckpt).with_name(f"{Path(ckpt).stem}.pose_reader.pt")


def reader_for(ckpt: str | Path, G, preset, settings: ReaderSettings | None = None, device: str = "cpu",
               progress_bar: bool = True, log=print) -> PoseCNN:
    """The checkpoint's pose reader: the cached one when it was trained on this very file (sha256) with these
    settings, else trained now (minutes at 32 px on a CPU) and cached."""
    settings = settings or ReaderSettings()
    path, digest = reader_path(ckpt), file_sha256(ckpt)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("format") == FORMAT and saved.get("checkpoint_sha256") == digest and \
                saved.get("info", {}).get("settings") == asdict(settings):
            reader = PoseCNN(**saved["kwargs"])
            reader.load_state_dict(saved["state_dict"])
            return reader.eval().to(device)
    log(f"training a pose reader on {settings.samples} renders of {ckpt} ({settings.steps} steps); cached as {path}")
    reader, info = train_reader(G, preset, settings, device=device, progress_bar=progress_bar)
    log(f"pose reader: {info['seconds']['total']:.0f} s; on the checkpoint's own renders mean |yaw error| "
        f"{info['own_renders_error']['yaw']:.3f}, |pitch error| {info['own_renders_error']['pitch']:.3f} rad")
    write_atomic(path, lambda tmp: torch.save({"format": FORMAT, "checkpoint_sha256": digest, "kwargs": reader.kwargs(),
                                               "state_dict": reader.state_dict(), "info": info}, tmp))
    return reader.to(device)


def yaw_window(yaw: float, preset, fraction: float = 0.5) -> tuple[float, float]:
    """The yaw range that ``--pose-init reader`` searches: ``fraction`` of the prior's yaw range centred at the
    reader's ``yaw``, moved to lie inside the prior where the reading is near its edge."""
    (y0, y1), _ = pose_range(preset)
    half = fraction * (y1 - y0) / 2
    centre = min(max(float(yaw), y0 + half), y1 - half)
    return centre - half, centre + half
