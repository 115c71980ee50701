"""``gmpi export-web``: a self-contained WebGL page that orbits generated MPIs in any browser (docs/VIEWER.md).

    gmpi export-web --ckpt runs/synthetic/gmpi.pt --seeds 0-3 --planes 32 --resolution 256 --out runs/synthetic/web

writes ``OUT/index.html`` (opens from ``file://``: no server, no network), ``viewer.js`` (``static/viewer.js``, which
draws what :func:`~gmpi_lightning.render.render_mpi` draws), ``manifest.js`` (camera model, planes, seeds, colour map)
and one ``seedNNNN.js`` per seed (zlib + base64 planes: browsers refuse ``file://`` images as WebGL textures but load
local scripts). With MPIs already in hand (``gmpi render --web``, the ``WebViewer`` media callback)::

    with ViewerWriter(out, preset, scene.planes, resolution=256, texture_resolution=32, seeds=[0]) as page:
        page.add(0, mpi[0])                                                      # L x 4 x T x T in [0, 1]
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cameras import pose_range
from ..errors import InputError
from ..export import DEPTH_COLORMAP
from ..planes import Planes
from ..presets import Preset

STATIC = Path(__file__).parent / "static"
FORMAT = "gmpi-lightning/web-viewer/1"
MAX_TEXELS = 1 << 24  # planes x texture pixels per seed without --force: 64 planes at 512 px, 96 at 256 px (not 512)
COLOR_LAYERS_ESTIMATE = 2  # GMPI: one shared foreground image + the background plane's


def check_budget(n_seeds: int, n_planes: int, texture_resolution: int, force: bool = False) -> str:
    """The size estimate line (printed before anything is written); a ValueError for more than MAX_TEXELS per seed
    (96 planes at 512 px) unless ``force``."""
    t, k = texture_resolution, COLOR_LAYERS_ESTIMATE
    disk = 4 * math.ceil((2 * n_planes + 3 * k) * t * t / 3)  # base64 of the stored bytes (zlib only shrinks them)
    gpu = (2 * n_planes + 8 * k) * (t + 2) ** 2  # R16F alpha + RGBA16F colour layers, one-texel border
    line = (f"web viewer: {n_seeds} seed(s) x {n_planes} planes at {texture_resolution} px: at most "
            f"{n_seeds * disk / 2**20:.1f} MB on disk ({disk / 2**20:.1f} MB per seed before "
            f"compression), {gpu / 2**20:.1f} MB of GPU textures in the browser")
    texels = n_planes * texture_resolution ** 2
    if texels > MAX_TEXELS and not force:
        raise InputError(f"{line}. That is too heavy for a web page ({n_planes} planes x {texture_resolution}^2 = "
                         f"{texels / 1e6:.1f} M texels per seed, limit {MAX_TEXELS / 1e6:.1f} M): use --planes "
                         f"{MAX_TEXELS // texture_resolution ** 2} or fewer, or --resolution "
                         f"{math.isqrt(MAX_TEXELS // n_planes)} or less (textures are resampled), or pass --force to "
                         f"write it anyway")
    return line


def pack_mpi(mpi: torch.Tensor) -> dict:
    """One MPI (L x 4 x T x T in [0, 1]) -> the seed file's entry: ``rgb_index`` (plane -> colour layer),
    ``rgb_layers`` and ``data`` (base64 of zlib(alpha uint16 LE L x T x T, then colour uint8 K x 3 x T x T))."""
    if mpi.ndim != 4 or mpi.shape[1] != 4 or mpi.shape[2] != mpi.shape[3]:
        raise InputError(f"an MPI to export is L x 4 x T x T (square RGBA planes), got {tuple(mpi.shape)}")
    mpi = mpi.detach().float().cpu().clamp(0, 1)
    layers, index = [], []
    for plane in mpi[:, :3]:  # consecutive planes with the same colour share one layer
        if not layers or not torch.equal(layers[-1], plane):
            layers.append(plane)
        index.append(len(layers) - 1)
    alpha = (mpi[:, 3].double() * 65535).round().to(torch.int32).numpy().astype("<u2")
    rgb = (torch.stack(layers) * 255 + 0.5).to(torch.uint8).numpy()  # export.to_uint8's rounding
    data = zlib.compress(alpha.tobytes() + rgb.tobytes(), 6)
    return {"rgb_index": index, "rgb_layers": len(layers), "data": base64.b64encode(data).decode("ascii")}


def resample_planes(mpi: torch.Tensor, texture_resolution: int) -> torch.Tensor:
    """L x 4 x T x T -> L x 4 x T' x T' (antialiased bilinear, corner texels kept at the plane corners)."""
    if mpi.shape[-1] == texture_resolution:
        return mpi
    return F.interpolate(mpi.float(), size=(texture_resolution, texture_resolution), mode="bilinear",
                         align_corners=True, antialias=texture_resolution < mpi.shape[-1]).clamp(0, 1)


def depth_colormap() -> list[list[float]]:
    """The bins of the colour map behind :func:`~gmpi_lightning.export.depth_to_color` (matplotlib's lookup table)."""
    import matplotlib

    cm = matplotlib.colormaps[DEPTH_COLORMAP]
    return [[round(float(v), 7) for v in rgb] for rgb in cm(np.arange(cm.N))[:, :3]]


def _js_assign(target: str, value) -> str:
    return f"{target} = {json.dumps(value, separators=(',', ':'))};\n"


class ViewerWriter:
    """Writes a viewer folder seed by seed (only one MPI in memory at a time). Prints the size estimate and checks
    the budget on construction, before anything is generated or written.

    Args:
        out: the folder (created; an existing viewer folder is replaced, any other non-empty folder refused).
        preset: camera model and plane range; planes: the MPI's :class:`~gmpi_lightning.planes.Planes`.
        resolution: the page's render size (canvas pixels; ``?size=`` in the URL overrides it).
        texture_resolution: stored plane size; MPIs of another size are resampled to it.
        seeds: the seeds that will be added (for the estimate and the seed picker).
        info: extra fields for the manifest (checkpoint, truncation, noise mode ...).
    """

    def __init__(self, out, preset: Preset, planes: Planes, resolution: int, texture_resolution: int,
                 seeds: list[int], info: dict | None = None, force: bool = False, verbose: bool = True):
        if not seeds:
            raise InputError("no seeds to export")
        line = check_budget(len(seeds), len(planes), texture_resolution, force)
        if verbose:
            print(line)
        self.out = Path(out)
        if self.out.exists() and any(self.out.iterdir()) and not (self.out / "manifest.js").is_file():
            raise FileExistsError(f"{self.out} is not empty and holds no viewer (manifest.js): choose a new --out")
        for old in self.out.glob("seed*.js"):  # nothing when the folder does not exist
            old.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        self.seeds, self.files = [int(s) for s in seeds], {}
        p, (yaw_range, pitch_range) = preset, pose_range(preset)
        self.manifest = {
            "format": FORMAT, "preset": p.name, "fov_deg": p.fov_deg, "sphere_center_z": p.sphere_center_z,
            "sphere_r": p.sphere_r, "near": p.near, "far": p.far, "yaw_mean": p.yaw_mean, "pitch_mean": p.pitch_mean,
            "yaw_range": list(yaw_range), "pitch_range": list(pitch_range),
            "plane_depths": [float(d) for d in planes.depths.cpu()],
            "plane_extents": [[float(h), float(w)] for h, w in planes.extents.cpu()],
            "resolution": int(resolution), "texture_resolution": int(texture_resolution), "seeds": self.seeds,
            "colormap": depth_colormap(), **(info or {}),
        }

    def add(self, seed: int, mpi: torch.Tensor) -> Path:
        """Write ``seedNNNN.js`` for one MPI (L x 4 x T x T in [0, 1])."""
        if mpi.shape[0] != len(self.manifest["plane_depths"]):
            raise InputError(f"seed {seed}: {mpi.shape[0]} planes, the page has {len(self.manifest['plane_depths'])}")
        entry = pack_mpi(resample_planes(mpi, self.manifest["texture_resolution"]))
        name = f"seed{int(seed):04d}.js"
        (self.out / name).write_text("window.GMPI_SEEDS = window.GMPI_SEEDS || {};\n" +
                                     _js_assign(f"window.GMPI_SEEDS[{int(seed)}]", entry))
        self.files[int(seed)] = name
        return self.out / name

    def close(self) -> Path:
        """Write the manifest, the page and the viewer script; returns ``index.html``."""
        if missing := sorted(set(self.seeds) - set(self.files)):
            raise InputError(f"seeds {missing} were announced but not added")
        manifest = dict(self.manifest, files={str(s): f for s, f in self.files.items()})
        (self.out / "manifest.js").write_text(_js_assign("window.GMPI_MANIFEST", manifest))
        shutil.copyfile(STATIC / "viewer.js", self.out / "viewer.js")
        shutil.copyfile(STATIC / "index.html", self.out / "index.html")
        return self.out / "index.html"

    def __enter__(self) -> ViewerWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()


def single_file_html(folder) -> str:
    """The viewer folder as one HTML string, every script inline (for ``wandb.Html``, which uploads one file)."""
    folder = Path(folder)
    page = (folder / "index.html").read_text()
    seeds = "".join(f"<script>\n{p.read_text()}</script>\n" for p in sorted(folder.glob("seed*.js")))
    page = page.replace("<!--GMPI-DATA-->", seeds)
    for name in ("manifest.js", "viewer.js"):
        script = (folder / name).read_text()
        if "</script" in script:
            raise InputError(f"{folder / name} cannot be inlined: it contains '</script'")
        page = page.replace(f'<script src="{name}"></script>', f"<script>\n{script}</script>")
    return page


def wandb_html(folder):
    """``wandb.Html`` of the page (one self-contained file, no W&B stylesheet injected)."""
    import wandb

    return wandb.Html(single_file_html(folder), inject=False, data_is_not_path=True)


def log_to_wandb(folder, key: str = "media/web", project: str | None = None) -> None:
    """Log the page to the active W&B run, else to a new run in ``project`` (``WANDB_MODE=offline`` keeps it
    local for ``wandb sync``)."""
    import wandb

    run = wandb.run or wandb.init(project=project, job_type="export-web")
    run.log({key: wandb_html(folder)})
