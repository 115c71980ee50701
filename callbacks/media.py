"""Media during training (docs/TRAINING.md "Media during training"): a fixed-seed sample grid, a camera-sweep video,
a mesh and the WebGL viewer page, from the EMA generator. Add them under ``trainer.callbacks``::

    - class_path: callbacks.media.SampleGrid      # also SweepVideo, MeshExport, WebViewer
      init_args: {every_n_iters: 200, seeds: [0, 1, 2, 3], yaws: [-0.3, 0.0, 0.3]}

They run every ``every_n_iters`` of the module's ``iteration`` (not ``global_step``: 2 per iteration) and at the end
(``at_end``) unless that iteration was just rendered, on global rank 0 only (no collectives: DDP cannot hang here).
Seed ``s`` is ``z = RandomState(s).randn(1, z_dim)``, noise constant, cameras fixed and the global RNG untouched
(``fork_rng``): the callbacks do not change the run. Files go to ``<run>/media/`` (:func:`run_dir`) or ``out_dir`` as
``<kind>_it<iteration:06d>[_seed<seed:04d>].<ext>``; a ``WandbLogger`` gets them under ``media/samples``, ``/planes``,
``/sweep``, ``/mesh`` and ``/web`` at ``trainer/global_step``, captions carrying the iteration.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.schedule import check_every, due
from gmpi_lightning import export
from gmpi_lightning.errors import InputError
from gmpi_lightning.nn.alpha import fixed_planes
from gmpi_lightning.sampling import Sampler

WANDB_MAX_POINTS = 50_000  # mesh vertices sent to wandb as a point cloud (the PLY on disk keeps all of them)


# ------------------------------------------------------------------------------------------ shared helpers
def run_dir(trainer) -> Path:
    """``trainer.log_dir`` (the first logger's folder, e.g. ``runs/synthetic/csv/version_0``; ``default_root_dir``
    without a logger) without its broadcast: that property is a collective and would hang DDP when only rank 0 asks."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    first = next(iter(getattr(trainer, "loggers", None) or []), None)
    path = first.log_dir if isinstance(first, (CSVLogger, TensorBoardLogger)) else getattr(first, "save_dir", None)
    return Path(path or trainer.default_root_dir)


def wandb_loggers(trainer) -> list:
    from lightning.pytorch.loggers import WandbLogger  # does not import wandb itself

    return [lg for lg in (getattr(trainer, "loggers", None) or []) if isinstance(lg, WandbLogger)]


def is_2d(pl_module) -> bool:
    """Whether a training module is a plain 2D StyleGAN2 (images, no planes)."""
    return getattr(pl_module, "mode", "gmpi") == "stylegan2"


def module_sampler(pl_module, planes: int | None = None, resolution: int | None = None, truncation_psi: float = 1.0,
                   plane_chunk: int | None = None) -> Sampler:
    """The EMA generator of a training module as a :class:`~gmpi_lightning.sampling.Sampler`: its preset, its training
    planes unless ``planes`` says otherwise, constant noise, and rays outside the planes' volume rendered transparent (a
    preview never stops training). A 2D (``stylegan2``) module's sampler has no planes (:meth:`image_2d` only)."""
    # the Sampler moves the scene to G's device
    scene = None if is_2d(pl_module) else (pl_module.scene if planes is None else planes)
    return Sampler(pl_module.G_ema, pl_module.preset, scene, None, resolution, truncation_psi, "const", plane_chunk,
                   check_inside=False)


class MediaCallback(Callback):
    """Schedule, rank-0 gating and output for the media callbacks; subclasses implement :meth:`make`. ``skip_2d``: why
    a subclass makes nothing for a 2D (stylegan2) generator (None: it does)."""

    skip_2d: str | None = None

    def __init__(self, every_n_iters: int | None = None, at_end: bool = True, planes: int | None = None,
                 resolution: int | None = None, truncation_psi: float = 1.0, plane_chunk: int | None = None,
                 out_dir: str | None = None):
        if resolution is not None and resolution < 1:  # checked here, not at the first render mid-run
            raise InputError(f"resolution must be a positive number of pixels or None (the preset's), got {resolution}")
        self.every_n_iters, self.at_end, self.out_dir = check_every(every_n_iters), at_end, out_dir
        self.renderer_kwargs = dict(planes=planes, resolution=resolution, truncation_psi=truncation_psi,
                                    plane_chunk=plane_chunk)
        self.last_iteration: int | None = None  # the iteration rendered last (no duplicate at the end)
        self.written: list[Path] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if due(self.every_n_iters, int(pl_module.iteration)):
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self.run(trainer, pl_module)

    def run(self, trainer, pl_module) -> list[Path]:
        """Render and save now (rank 0, once per iteration); returns the files written."""
        it = int(pl_module.iteration)
        if not trainer.is_global_zero or it == self.last_iteration:
            return []
        self.last_iteration = it
        sampler = module_sampler(pl_module, **self.renderer_kwargs)
        if sampler.scene is None and self.skip_2d:
            rank_zero_info(f"{type(self).__name__}: {self.skip_2d}")
            return []
        out = Path(self.out_dir) if self.out_dir else run_dir(trainer) / "media"
        with sampler.sampling():
            files = self.make(sampler, out, it, trainer)
        self.written += files
        return files

    def make(self, sampler: Sampler, out: Path, iteration: int, trainer) -> list[Path]:
        raise NotImplementedError


def _seeds(seeds: Sequence[int] | None, default: int) -> list[int]:
    seeds = list(range(default)) if seeds is None else [int(s) for s in seeds]
    if not seeds:
        raise InputError("seeds must not be empty")
    return seeds


# ------------------------------------------------------------------------------------------------- callbacks
class SampleGrid(MediaCallback):
    """A fixed grid: one row per seed ("seed N" on the left); columns are the RGB views at every (yaw, pitch), then
    the colour-mapped depth at the same poses ("RGB yaw +0.30", "depth yaw +0.30" above; poses ordered pitch-major
    as ``gmpi render``). Views smaller than ``min_tile`` pixels are repeated (nearest) by an integer factor so that
    the grid reads at a glance; ``layout`` (an ``export.GridLayout``) says where each tile is. Also a labelled
    RGBA strip of up to 8 of the first seed's planes, near to far. In ``stylegan2`` mode: one row of the 2D images.

    Args:
        every_n_iters: render every this many iterations (the module's counter); None: only at the end.
        seeds: latent seeds (rows); default 0-3.
        yaws, pitches: absolute camera angles in radians (the defaults of ``gmpi render``).
        planes: plane count of the rendered MPI; None: the module's training planes.
        resolution: rendered views' size; None: the preset's resolution.
        out_dir: write here instead of ``<trainer.log_dir>/media``.
        min_tile: smallest tile size in the PNG (views are repeated by an integer factor up to it; 1: as rendered).
    """

    def __init__(self, every_n_iters: int | None = 200, seeds: list[int] | None = None,
                 yaws: Sequence[float] = (-0.3, 0.0, 0.3), pitches: Sequence[float] = (0.0,), planes: int | None = None,
                 resolution: int | None = None, truncation_psi: float = 1.0, at_end: bool = True,
                 plane_chunk: int | None = None, out_dir: str | None = None, min_tile: int = 128):
        super().__init__(every_n_iters, at_end, planes, resolution, truncation_psi, plane_chunk, out_dir)
        self.seeds, self.min_tile, self.layout = _seeds(seeds, 4), min_tile, None
        self.poses = [(float(y), float(p)) for p in pitches for y in yaws]
        if not self.poses:
            raise InputError("need at least one yaw and one pitch")

    def make(self, sampler, out, iteration, trainer):
        grid_path = out / f"samples_it{iteration:06d}.png"
        if sampler.scene is None:
            grid, self.layout = export.labeled_grid([[sampler.image_2d(s) for s in self.seeds]], [""],
                                                    [f"seed {s}" for s in self.seeds], self.min_tile)
            export.save_png(grid_path, grid)
            _log_images(trainer, "media/samples", [grid_path], [f"iteration {iteration}, seeds {self.seeds}"])
            return [grid_path]
        rows, planes = [], None
        for seed in self.seeds:
            mpi = sampler.mpi(seed)
            planes = planes or export.plane_tiles(mpi[0])
            rgbs, depths = zip(*(sampler.view(mpi, yaw, pitch) for yaw, pitch in self.poses))
            rows.append([*rgbs, *depths])
        cams = [f"{y:+.2f},{p:+.2f}" if len(set(p for _, p in self.poses)) > 1 else f"yaw {y:+.2f}"
                for y, p in self.poses]
        grid, self.layout = export.labeled_grid(rows, [f"seed {s}" for s in self.seeds],
                                                [f"RGB {c}" for c in cams] + [f"depth {c}" for c in cams],
                                                self.min_tile)
        strip, _ = export.labeled_grid([planes[1]], [""], [f"plane {i}" for i in planes[0]], self.min_tile)
        export.save_png(grid_path, grid)
        strip_path = export.save_png(out / f"planes_it{iteration:06d}_seed{self.seeds[0]:04d}.png", strip)
        poses = ", ".join(f"({y:+.2f}, {p:+.2f})" for y, p in self.poses)
        _log_images(trainer, "media/samples", [grid_path],
                    [f"iteration {iteration}: seeds {self.seeds} (rows); RGB then depth at (yaw, pitch) {poses}"])
        _log_images(trainer, "media/planes", [strip_path],
                    [f"iteration {iteration}: planes of seed {self.seeds[0]}, near to far"])
        return [grid_path, strip_path]


class SweepVideo(MediaCallback):
    """Camera-sweep mp4 per seed, RGB | depth side by side (``2 * res`` wide), at the end of training (and every
    ``every_n_iters`` when set). Trajectories as ``gmpi render --video``: ``yaw``, ``pitch`` or ``circle``, about
    the preset's mean pose. Nothing in ``stylegan2`` mode (no 3D)."""

    skip_2d = "nothing to sweep for a 2D (stylegan2) generator"

    def __init__(self, frames: int = 48, fps: int = 12, trajectory: str = "yaw", seeds: list[int] | None = None,
                 at_end: bool = True, every_n_iters: int | None = None, planes: int | None = None,
                 resolution: int | None = None, truncation_psi: float = 1.0, plane_chunk: int | None = None,
                 out_dir: str | None = None):
        super().__init__(every_n_iters, at_end, planes, resolution, truncation_psi, plane_chunk, out_dir)
        export.sweep_poses(trajectory, 2)  # fail at configuration time on an unknown trajectory
        if frames < 2:
            raise InputError(f"a sweep needs at least 2 frames, got {frames}")
        self.frames, self.fps, self.trajectory, self.seeds = frames, fps, trajectory, _seeds(seeds, 1)

    def make(self, sampler, out, iteration, trainer):
        paths = [export.write_video(out / f"sweep_{self.trajectory}_it{iteration:06d}_seed{seed:04d}.mp4",
                                    sampler.sweep(sampler.mpi(seed), self.trajectory, self.frames), fps=self.fps)
                 for seed in self.seeds]
        for lg in wandb_loggers(trainer):
            lg.log_video(key="media/sweep", videos=[str(p) for p in paths], step=trainer.global_step,
                         caption=[f"iteration {iteration}, seed {s}, {self.trajectory} sweep: RGB | depth"
                                  for s in self.seeds])
        return paths


class MeshExport(MediaCallback):
    """Mesh per seed (marching cubes over the alpha volume at ``level``, ``grid`` = texture resolution by default) at
    the end of training, as ``formats`` (``ply``, ``glb``: glTF binary with the MPI's vertex colours,
    :mod:`gmpi_lightning.mesh_io`; default both). With a ``WandbLogger`` the glb is logged as ``wandb.Object3D``
    (a point cloud of the vertices when only PLY is written). An alpha volume that never crosses the level gives a
    warning, not a crash. Nothing in ``stylegan2`` mode."""

    skip_2d = "no alpha volume in a 2D (stylegan2) generator"

    def __init__(self, seeds: list[int] | None = None, grid: int | None = None, level: float = 0.5,
                 at_end: bool = True, every_n_iters: int | None = None, truncation_psi: float = 1.0,
                 out_dir: str | None = None, formats: list[str] | None = None):
        from gmpi_lightning.mesh_io import parse_mesh_formats

        super().__init__(every_n_iters, at_end, truncation_psi=truncation_psi, out_dir=out_dir)
        self.seeds, self.grid, self.level = _seeds(seeds, 1), grid, level
        self.formats = parse_mesh_formats(formats or ["ply", "glb"])

    def make(self, sampler, out, iteration, trainer):
        from gmpi_lightning.mesh_io import write_mesh

        if fixed_planes(sampler.G):
            rank_zero_warn("MeshExport: the vanilla alpha branch only makes its training planes, not the dense "
                           "uniform volume a mesh needs; skipped")
            return []
        paths = []
        for seed in self.seeds:
            try:
                verts, faces, colors = sampler.mesh(seed, self.grid, self.level)
            except ValueError as e:
                if "iso-level" not in str(e):
                    raise
                rank_zero_warn(f"MeshExport: no mesh for seed {seed} at iteration {iteration}: {e}")
                continue
            written = write_mesh(out / f"mesh_it{iteration:06d}_seed{seed:04d}", verts, faces, colors, self.formats)
            paths += written
            caption = f"iteration {iteration}, seed {seed}: {len(verts)} vertices, {len(faces)} faces"
            glb = [str(p) for p in written if p.suffix == ".glb"]
            if glb:  # wandb's Object3D reads glTF binary (the coloured mesh), not PLY: else the vertices as points
                _log_object3d(trainer, glb[0], caption)
            else:
                keep = np.linspace(0, len(verts) - 1, min(len(verts), WANDB_MAX_POINTS)).astype(int)
                _log_object3d(trainer, np.concatenate([verts[keep], colors[keep].astype(np.float32)], axis=1), caption)
        return paths


class WebViewer(MediaCallback):
    """The interactive WebGL page of the seeds' MPIs (:mod:`gmpi_lightning.web`, as ``gmpi export-web``) at the end
    of training (and every ``every_n_iters`` when set): ``<run>/media/web_it<iteration>/index.html``, which opens from
    disk; with a ``WandbLogger`` also logged as ``wandb.Html`` under ``media/web``. Nothing in ``stylegan2`` mode."""

    skip_2d = "no MPI to show for a 2D (stylegan2) generator"

    def __init__(self, seeds: list[int] | None = None, at_end: bool = True, every_n_iters: int | None = None,
                 planes: int | None = None, resolution: int | None = None, truncation_psi: float = 1.0,
                 plane_chunk: int | None = None, out_dir: str | None = None, force: bool = False):
        super().__init__(every_n_iters, at_end, planes, resolution, truncation_psi, plane_chunk, out_dir)
        self.seeds, self.force = _seeds(seeds, 4), force

    def make(self, sampler, out, iteration, trainer):
        from gmpi_lightning.web import ViewerWriter, wandb_html

        info = {"iteration": iteration, "truncation_psi": sampler.truncation_psi, "noise_mode": "const"}
        with ViewerWriter(out / f"web_it{iteration:06d}", sampler.preset, sampler.scene.planes, sampler.resolution,
                          sampler.G.img_resolution, self.seeds, info, self.force, verbose=False) as page:
            for seed in self.seeds:
                page.add(seed, sampler.mpi(seed)[0])
        for lg in wandb_loggers(trainer):
            lg.log_metrics({"media/web": wandb_html(page.out)}, step=trainer.global_step)
        return [page.out / "index.html"]


# --------------------------------------------------------------------------------------------------- wandb
def _log_images(trainer, key: str, paths: list[Path], captions: list[str]) -> None:
    for lg in wandb_loggers(trainer):
        lg.log_image(key=key, images=[str(p) for p in paths], step=trainer.global_step, caption=captions)


def _log_object3d(trainer, data, caption: str) -> None:
    """``wandb.Object3D`` of a glb file or of N x 6 (xyz rgb) points under ``media/mesh``."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    import wandb

    for lg in loggers:
        lg.log_metrics({"media/mesh": wandb.Object3D(data, caption=caption)}, step=trainer.global_step)
