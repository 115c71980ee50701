"""Pictures, videos and meshes from MPIs (colour-mapped depth, RGBA plane strips, camera sweeps, PLY), shared by
``gmpi render`` and the logging callbacks. Images are uint8 H x W x C numpy arrays."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .nn.alpha import fixed_planes
from .planes import make_plane_depths, normalize_depths


def progress(iterable=None, **kwargs):
    """tqdm that redraws often on a terminal and rarely (every 30 s) into logs and CI output."""
    from tqdm import tqdm

    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 30.0)
    return tqdm(iterable, **kwargs)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """C x H x W in [0, 1] -> H x W x C uint8."""
    return (img.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


DEPTH_COLORMAP = "turbo"  # matplotlib's name; the browser page draws depth with the same map's table


def depth_to_color(depth: torch.Tensor, near: float, far: float, coverage: torch.Tensor | None = None) -> np.ndarray:
    """1 x H x W z-depth -> H x W x 3 uint8 (near and far at the colour map's ends; uncovered pixels black)."""
    import matplotlib

    d = ((depth.detach().float()[0] - near) / (far - near)).clamp(0, 1).cpu().numpy()
    rgb = matplotlib.colormaps[DEPTH_COLORMAP](d)[..., :3]
    if coverage is not None:
        rgb = rgb * coverage.detach().float()[0].clamp(0, 1).cpu().numpy()[..., None]
    return (rgb * 255 + 0.5).astype(np.uint8)


def view_images(render: dict, preset, i: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, depth colour-mapped over the preset's near..far and weighted by coverage) of view ``i`` of a render."""
    return to_uint8(render["rgb"][i]), depth_to_color(render["depth"][i], preset.near, preset.far, render["alpha"][i])


def plane_tiles(mpi: torch.Tensor, max_planes: int = 8) -> tuple[list[int], list[np.ndarray]]:
    """One MPI (L x 4 x H x W) -> (indices, RGBA images) of up to ``max_planes`` evenly chosen planes, near to far."""
    n = mpi.shape[0]
    idx = np.unique(np.linspace(0, n - 1, min(n, max_planes)).round().astype(int))
    return idx.tolist(), [to_uint8(mpi[i]) for i in idx]


def plane_strip(mpi: torch.Tensor, max_planes: int = 8) -> np.ndarray:
    """The :func:`plane_tiles` side by side, at their own resolution."""
    return np.concatenate(plane_tiles(mpi, max_planes)[1], axis=1)


@dataclass(frozen=True)
class GridLayout:
    """Where the tiles of a :func:`labeled_grid` are: tile (row, col) starts at (top + row * size, left + col * size)
    and is its source tile repeated ``scale`` times along both axes."""

    top: int
    left: int
    size: int
    scale: int

    def tile(self, image: np.ndarray, row: int, col: int) -> np.ndarray:
        """The source tile back from the image (every ``scale``-th pixel)."""
        y, x = self.top + row * self.size, self.left + col * self.size
        return image[y:y + self.size:self.scale, x:x + self.size:self.scale]


def labeled_grid(tiles: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str],
                 min_tile: int = 128) -> tuple[np.ndarray, GridLayout]:
    """Rows x cols of equal H x W x C uint8 tiles as one picture a person can read: small tiles repeated (nearest,
    by an integer factor) to at least ``min_tile`` pixels, column labels above, row labels on the left (white
    background; RGBA tiles get an opaque one). Returns the image and where the tiles are."""
    from PIL import Image, ImageDraw

    h, w, c = tiles[0][0].shape
    scale = max(1, -(-min_tile // h))
    size = h * scale
    font_h, char_w = 12, 6  # PIL's built-in bitmap font: no font file needed
    left = 8 + char_w * max(len(t) for t in row_labels) if any(row_labels) else 0
    top = font_h + 6 if col_labels else 0
    body = np.concatenate([np.concatenate(row, axis=1) for row in tiles]).repeat(scale, axis=0).repeat(scale, axis=1)
    canvas = np.full((top + body.shape[0], left + body.shape[1], c), 255, np.uint8)
    canvas[top:, left:] = body
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    ink = (0, 0, 0, 255)[:c]  # black (opaque for RGBA)
    for k, text in enumerate(col_labels):
        draw.text((left + k * w * scale + 2, 2), text, fill=ink)
    for r, text in enumerate(row_labels):
        draw.text((4, top + r * size + size // 2 - font_h // 2), text, fill=ink)
    return np.asarray(image), GridLayout(top, left, size, scale)


def save_png(path: str | Path, img: np.ndarray) -> Path:
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, img)
    return path


def write_video(path: str | Path, frames: list[np.ndarray], fps: int = 8) -> Path:
    """H.264 mp4 through imageio-ffmpeg's bundled binary (no system ffmpeg needed)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(path, frames, fps=fps, codec="libx264", quality=8, macro_block_size=1)
    return path


def sweep_poses(kind: str, n_frames: int, yaw_mean: float = 0.0, pitch_mean: float = 0.0,
                yaw_range: float = 0.5, pitch_range: float = 0.3) -> list[tuple[float, float]]:
    """Camera trajectories of the official videos: 'yaw' (left-right at the mean pitch), 'pitch'
    (up-down at the mean yaw), or 'circle' (an ellipse through both extremes)."""
    t = np.linspace(0, 1, n_frames)
    if kind == "yaw":
        return [(yaw_mean + yaw_range - 2 * yaw_range * s, pitch_mean) for s in t]
    if kind == "pitch":
        return [(yaw_mean, pitch_mean + pitch_range - 2 * pitch_range * s) for s in t]
    if kind == "circle":
        return [(yaw_mean + yaw_range * np.sin(2 * np.pi * s), pitch_mean + pitch_range * np.cos(2 * np.pi * s))
                for s in t]
    raise InputError(f"unknown trajectory {kind!r}; expected yaw, pitch or circle")


def mesh_plane_depths(preset, grid: int) -> torch.Tensor:
    """Uniformly spaced depths for mesh extraction: the spacing of a grid^3 cube of side equal to the
    foreground plane width, over [near, far] (docs/METHOD.md §8.4)."""
    side = 2.0 * preset.far * np.tan(np.radians(preset.fov_deg) / 2)
    n = max(2, int(np.floor(min(1.0, (preset.far - preset.near) / side) * grid)))
    return make_plane_depths(preset.near, preset.far, n, "uniform")


def mesh_extent(extents: torch.Tensor) -> torch.Tensor:
    """The (height, width) of the mesh volume: the largest non-background plane, as the official cube
    (docs/METHOD.md §8.4); equal to every plane's when the volume is confined."""
    return extents[:-1].amax(0) if len(extents) > 1 else extents[0]


@torch.no_grad()
def extract_mesh(G, z: torch.Tensor, preset, extents_hw, grid: int | None = None, level: float = 0.5,
                 plane_chunk: int = 32, **gen_kwargs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Marching cubes over the alpha volume of one latent, Gaussian-smoothed (sigma 1 texel). Returns (vertices V x 3
    world xyz, faces F x 3, vertex colours V x 3 uint8). The background plane's forced opacity is switched off."""
    from scipy.ndimage import gaussian_filter
    from skimage.measure import marching_cubes

    if fixed_planes(G):
        raise InputError("the vanilla alpha branch makes only its training planes, not the dense volume a mesh "
                         "needs; mesh a depth-conditioned model (alpha.mode normalize_add_z, add_z, ...)")
    grid = grid or G.img_resolution
    depths = mesh_plane_depths(preset, grid)
    codes = normalize_depths(depths, preset.near, preset.far)
    mpi = G(z[:1], None, codes.to(z.device), plane_chunk=plane_chunk, opaque_background=False, **gen_kwargs)[0]
    alpha = gaussian_filter(mpi[:, 3].float().cpu().numpy(), 1.0)  # L x H x W, plane 0 nearest
    if not alpha.min() < level < alpha.max():
        raise InputError(f"the alpha volume never crosses the iso-level {level} (range {alpha.min():.3f}..."
                         f"{alpha.max():.3f}): nothing to mesh")
    h, w, res = float(extents_hw[0]), float(extents_hw[1]), alpha.shape[-1]
    dz = float(depths[1] - depths[0])
    verts, faces, _, _ = marching_cubes(alpha, level=level, spacing=(dz, h / (res - 1), w / (res - 1)))
    xyz = np.stack([verts[:, 2] - w / 2, verts[:, 1] - h / 2, verts[:, 0] + float(depths[0])], axis=1)
    rgb = to_uint8(mpi[0, :3])  # the shared foreground colour, sampled at the vertex's texel
    rows, cols = (np.clip(np.round(verts[:, k] / (s / (res - 1))).astype(int), 0, res - 1) for k, s in ((1, h), (2, w)))
    return xyz.astype(np.float32), faces.astype(np.int32), rgb[rows, cols]


_PLY_VERTEX = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
_PLY_RGB = [("r", "u1"), ("g", "u1"), ("b", "u1")]
_PLY_FACE = [("n", "u1"), ("i", "<i4", (3,))]


def write_ply(path: str | Path, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None) -> Path:
    """Binary little-endian PLY with optional per-vertex RGB."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = colors is not None
    props = ["float x", "float y", "float z"] + ["uchar red", "uchar green", "uchar blue"] * rgb
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(verts)}",
              *(f"property {p}" for p in props), f"element face {len(faces)}",
              "property list uchar int vertex_indices", "end_header"]
    v = np.empty(len(verts), dtype=_PLY_VERTEX + _PLY_RGB * rgb)
    for k, (name, _) in enumerate(v.dtype.descr):
        v[name] = (verts if k < 3 else colors)[:, k % 3]
    f = np.empty(len(faces), dtype=_PLY_FACE)
    f["n"], f["i"] = 3, faces
    path.write_bytes(("\n".join(header) + "\n").encode("ascii") + v.tobytes() + f.tobytes())
    return path


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and faces of a PLY written by :func:`write_ply` (for tests and quick checks)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    nv = int(next(h for h in header if h.startswith("element vertex")).split()[-1])
    nf = int(next(h for h in header if h.startswith("element face")).split()[-1])
    v = np.frombuffer(data, dtype=_PLY_VERTEX + _PLY_RGB * any("red" in h for h in header), count=nv, offset=end)
    f = np.frombuffer(data, dtype=_PLY_FACE, count=nf, offset=end + v.nbytes)
    return np.stack([v["x"], v["y"], v["z"]], 1), f["i"]
