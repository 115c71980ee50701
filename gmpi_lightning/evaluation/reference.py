"""Reference rows: what the representation can hold, scored by the same estimators as a generator (docs/3D.md §1).

On data whose ground truth renders at any camera, ``gmpi evaluate --reference`` scores :data:`KINDS` on the
generator's seeds, cameras and planes: the ground truth (``renders``), the ground-truth MPI (``mpi``,
:func:`mpi_from_view`; ``mpi_blur`` from a blurred image) and flat cut-outs (``billboard``, :func:`billboard_mpi`;
``card_*`` at :func:`card_depth`). Head ``k`` of a row is the data renderer's sample ``count + k`` (never in the
training shards), seen from fake ``k``'s cameras (:func:`~gmpi_lightning.evaluation.fakes.seed_poses`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cameras import invert_rigid, yaw_pitch_from_w2c
from ..errors import InputError
from ..planes import texel_xyz
from ..scene import Scene
from .fakes import fake_batch

KINDS = {  # row -> what it shows (the "setting" of its line in `gmpi ablations`' table, after "reference: ")
    "renders": "the ground truth rendered at each camera",
    "mpi": "MPI built from the ground truth (frontal RGB + depth)",
    "billboard": "the frontal image on one plane",
    "card_front": "the frontal image on the nearest plane",
    "card_center": "the frontal image on the plane of the rotation centre",
    "card_back": "the frontal image halfway from the centre to the background",
    "mpi_blur": "MPI built from the ground truth with a blurred frontal image"}
CARDS = {"card_front": 0.0, "card_center": None, "card_back": 0.5}  # where between the centre (0) and background (1)
BLUR_SIGMA_PX = 1.5  # mpi_blur at 32 px (scaled with the resolution)
TRUTH_RENDERERS: dict = {}  # card "source" -> (card, resolution) -> a ground-truth renderer; see register_truth


def parse_names(text: str | list[str] | None, choices, what: str, required: bool = False) -> list[str]:
    """Comma-separated (or listed) names out of ``choices`` (``all``: every one); none is an error if ``required``."""
    names = [k.strip() for k in (text.split(",") if isinstance(text, str) else text or []) if k.strip()]
    if names == ["all"]:
        return list(choices)
    bad = [k for k in names if k not in choices]
    if bad or (required and not names):
        raise InputError(f"unknown {what} {bad or names}; choose from {', '.join(choices)} (or all)")
    return names


def parse_kinds(text: str | list[str] | None) -> list[str]:
    return parse_names(text, KINDS, "reference row(s)")


def register_truth(source: str, factory) -> None:
    """Make ``factory(card, resolution)`` the ground-truth renderer of data whose card's ``source`` is ``source``
    (``datamodules.synthetic`` registers its heads when imported; a renderer has ``views(indices, yaw, pitch)`` ->
    ``rgb``, ``depth``, ``mask``)."""
    TRUTH_RENDERERS[source] = factory


def load_truth(data: str | Path, resolution: int | None = None):
    """The ground-truth renderer of a ``gmpi data`` folder (its card names the source), at ``resolution``."""
    from ..data import read_card

    card = read_card(data)
    source = card.get("source")
    if source not in TRUTH_RENDERERS:
        raise InputError(f"{data}: reference rows render each sample's ground truth at new cameras, which needs the "
                         f"data's renderer; this data's source is {source!r} (supported: "
                         f"{', '.join(TRUTH_RENDERERS) or 'none registered'}, e.g. `gmpi data synthetic`). Drop "
                         f"--reference.")
    return TRUTH_RENDERERS[source](card, resolution)


def _project(scene: Scene, resolution: int):
    """(the planes on the CPU, every texel of every plane in the canonical camera: normalised image coordinates
    L x R x R x 2 (-1..1 = the image's outer pixel edges, ``align_corners=False``), camera z L x R x R). The canonical
    camera (yaw 0, pitch 0) looks along the planes' z, so camera depth and plane depth are the same number: the
    quantisation of the surface to the planes relies on it."""
    planes = scene.planes.to("cpu")
    w2c = invert_rigid(scene.camera(0.0, 0.0)[0].double().cpu())[0]
    pts = torch.stack([texel_xyz(d, e, resolution) for d, e in zip(planes.depths.cpu(), planes.extents.cpu())])
    cam = pts.double() @ w2c[:3, :3].T.double() + w2c[:3, 3].double()
    t = math.tan(math.radians(scene.preset.fov_deg) / 2)
    grid = cam[..., :2] / cam[..., 2:].clamp_min(1e-9) / t
    return planes, grid.float(), cam[..., 2].float()


def _sample(img: torch.Tensor, grid: torch.Tensor, mode: str, padding: str = "zeros") -> torch.Tensor:
    """img B x C x H x W sampled at grid (L x R x R x 2) for every batch item: B x L x C x R x R."""
    b, c = img.shape[:2]
    n, r = grid.shape[0], grid.shape[1]
    g = grid.to(img.device).reshape(1, n * r, r, 2).expand(b, -1, -1, -1)
    out = F.grid_sample(img, g, mode=mode, padding_mode=padding, align_corners=False)  # B x C x (L R) x R
    return out.reshape(b, c, n, r, r).transpose(1, 2)


def harmonic_fill(rgb: torch.Tensor, known: torch.Tensor, iters: int = 400) -> torch.Tensor:
    """Fill the texels where ``known`` (B x 1 x H x W, bool) is False so that each is the average of its four
    neighbours (a discrete Laplace equation with the known texels fixed; replicate borders), starting from a
    coarse-to-fine average of the known colours. Rows without a known texel come back mid-grey."""
    known = known.to(rgb.dtype)
    # coarse-to-fine start: known-weighted averages on a pyramid, each level filling the holes of the finer one
    levels = [(rgb * known, known)]
    while min(levels[-1][0].shape[-2:]) > 1:
        levels.append(tuple(F.avg_pool2d(t, 2, ceil_mode=True) for t in levels[-1]))
    c, w = levels[-1]
    fill = torch.where(w > 0, c / w.clamp_min(1e-12), torch.full_like(c, 0.5))
    for c, w in reversed(levels[:-1]):
        up = F.interpolate(fill, size=c.shape[-2:], mode="bilinear", align_corners=False)
        fill = torch.where(w > 0, c / w.clamp_min(1e-12), up)
    x = torch.where(known > 0, rgb, fill)
    kernel = torch.tensor([[0, 0.25, 0], [0.25, 0, 0.25], [0, 0.25, 0]], dtype=rgb.dtype, device=rgb.device)
    kernel = kernel.expand(rgb.shape[1], 1, 3, 3)
    for _ in range(iters):
        avg = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=rgb.shape[1])
        x = torch.where(known > 0, rgb, avg)
    return x


def mpi_from_view(image: torch.Tensor, depth: torch.Tensor, scene: Scene, resolution: int,
                  thickness: float | None = None) -> torch.Tensor:
    """The ground-truth MPI (B x L x 4 x R x R, planes of ``scene``) of images (B x 3 x H x W in [0, 1]) and their
    z-depths (B x 1 x H x W) seen by the canonical camera (yaw 0, pitch 0). Texels outside that camera's view are
    transparent; the surface seen through a texel goes to the plane nearest its depth, and the object is solid
    behind it (that colour on every plane to the one before the background, or ``thickness`` world units deep), so a
    turned camera sees the silhouette extruded, never a hole. The background plane is opaque: what the camera sees
    of it, elsewhere a :func:`harmonic_fill` of that. At the input camera it renders the input back (up to bilinear
    resampling) with the depth quantised to the planes (tests/test_reference.py)."""
    planes, grid, z_cam = _project(scene, resolution)
    n = len(planes)
    image, depth = image.float().cpu(), depth.float().cpu()
    rgb = _sample(image, grid, "bilinear")                        # B x L x 3 x R x R
    surf = _sample(depth, grid, "nearest")[:, :, 0]               # B x L x R x R: the surface seen through the texel
    inside = (grid.abs() <= 1).all(-1)                            # L x R x R
    d = planes.depths.double()
    mids = ((d[1:] + d[:-1]) / 2).float()                         # the surface belongs to its nearest plane
    surf_plane = torch.bucketize(surf.contiguous(), mids)         # B x L x R x R, index of the surface's plane
    index = torch.arange(n).reshape(1, n, 1, 1)
    surf_z = planes.depths[surf_plane]                            # the surface's depth, quantised to the planes
    solid = (z_cam[None] >= surf_z - 1e-6) & (surf_plane < n - 1) & (index < n - 1)
    if thickness is not None:
        solid &= z_cam[None] <= surf + thickness
    alpha = (solid & inside[None]).float()
    # the background plane: visible background where the input camera sees it, a harmonic fill elsewhere
    seen = (inside[-1][None] & (surf_plane[:, -1] == n - 1))[:, None]
    bg = harmonic_fill(rgb[:, -1], seen)
    # colours stay where alpha is 0: the renderer interpolates straight RGB and alpha separately, so a zeroed colour
    # would darken every texel next to a transparent one
    rgb = torch.cat([rgb[:, :-1], bg[:, None]], 1)
    alpha[:, -1] = 1.0
    return torch.cat([rgb, alpha[:, :, None]], 2).clamp(0, 1)


def billboard_mpi(image: torch.Tensor, depth: torch.Tensor, scene: Scene, resolution: int,
                  at: float | None = None) -> torch.Tensor:
    """The flat cut-out: the whole image (edge colours beyond its view) on a single plane, over an opaque background
    plane of the same picture. The plane is the one nearest ``at`` (a depth in world units), or by default the one
    nearest the median depth of what is in front of the background."""
    planes, grid, _ = _project(scene, resolution)
    n = len(planes)
    rgb = _sample(image.float().cpu(), grid, "bilinear", padding="border")
    d = planes.depths
    front = depth.float().cpu().flatten(1)
    out = torch.zeros(rgb.shape[0], n, 4, resolution, resolution)
    for b in range(rgb.shape[0]):
        fg = front[b][front[b] < float((d[-1] + d[-2]) / 2)]
        target = (fg if fg.numel() else front[b]).median() if at is None else torch.tensor(at)
        k = min(int(torch.argmin((d - target).abs())), n - 2)
        for i in sorted({k, n - 1}):
            out[b, i, :3], out[b, i, 3] = rgb[b, i], 1.0
    return out


def card_depth(kind: str, preset) -> float:
    """World depth of a ``card_*`` reference row's plane: the near plane, the camera sphere's centre, or halfway from
    the centre to the background (:data:`CARDS`)."""
    frac, centre = CARDS[kind], float(preset.sphere_center_z)
    return centre if frac is None else preset.near if frac == 0.0 else float(centre + frac * (preset.far - centre))


def blurred(image: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Gaussian blur of B x 3 x H x W images (reflect borders), sigma in pixels."""
    radius = max(1, int(math.ceil(3 * sigma_px)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma_px) ** 2)
    c = image.shape[1]
    k = (k / k.sum()).to(image).reshape(1, 1, 1, -1).expand(c, 1, 1, -1)  # rows; k.transpose(2, 3): columns
    out = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode="reflect"), k, groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), k.transpose(2, 3), groups=c)


def iter_reference(kind: str, truth, preset, seeds: list[int], settings, device="cpu", streams=(0,),
                   return_weights: bool = False) -> Iterator[dict]:
    """Batches shaped like :func:`~gmpi_lightning.evaluation.fakes.iter_fakes`' for reference row ``kind``: the same
    cameras per seed, ``render_at(c2w)`` (views at other cameras, e.g. the real samples' for depth FD)."""
    if kind not in KINDS:
        raise InputError(f"unknown reference row {kind!r}; choose from {', '.join(KINDS)}")
    res = settings.resolution or preset.resolution
    scene = Scene(preset, settings.planes, device)
    for i in range(0, len(seeds), settings.batch_size):
        chunk = seeds[i:i + settings.batch_size]
        if kind == "renders":
            mpi = None

            def render_at(c2w, chunk=chunk, weights=False):
                yaw, pitch = yaw_pitch_from_w2c(invert_rigid(c2w.double().cpu()), preset.sphere_center_z)
                v = truth.views(chunk, yaw, pitch)
                return {"rgb": v["rgb"].to(device), "depth": v["depth"].to(device),
                        "alpha": torch.ones_like(v["depth"]).to(device)}
        else:
            front = truth.views(chunk, torch.zeros(len(chunk)), torch.zeros(len(chunk)))
            rgb, depth = front["rgb"], front["depth"]
            if kind == "mpi_blur":
                rgb = blurred(rgb.float(), BLUR_SIGMA_PX * rgb.shape[-1] / 32)
            if kind in ("mpi", "mpi_blur"):
                mpi = mpi_from_view(rgb, depth, scene, preset.resolution)
            else:
                at = card_depth(kind, preset) if kind in CARDS else None
                mpi = billboard_mpi(rgb, depth, scene, preset.resolution, at=at)
            mpi = mpi.to(device)  # built on the CPU

            def render_at(c2w, mpi=mpi, weights=False):
                return scene.render(mpi, c2w, res, plane_chunk=settings.plane_chunk, return_weights=weights)
        yield fake_batch(chunk, mpi, scene, render_at, streams, return_weights)


__all__ = ["KINDS", "billboard_mpi", "harmonic_fill", "iter_reference", "load_truth", "mpi_from_view", "parse_kinds",
           "register_truth"]
