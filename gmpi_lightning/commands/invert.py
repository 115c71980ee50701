"""``gmpi invert`` (one image -> a latent, a tuned generator, novel views, depth, video, mesh) and ``gmpi poses`` (a
folder of images -> the cameras ``gmpi data folder`` reads), both by analysis-by-synthesis (docs/INVERSION.md)."""

from __future__ import annotations

import shlex
import sys
from typing import Literal

import torch

from ..inversion import InvertSettings
from ..invert_cli import invert_image, parse_grid, parse_pose, parse_views
from ..mesh_io import parse_mesh_formats
from ..pose_search import SearchSettings
from ..poses import estimate_folder, report_path
from . import Floats, default_device

_DI, _DS = InvertSettings(), SearchSettings()
GRID = f"{_DS.yaws}x{_DS.pitches}"


def invert(ckpt: str, image: str, out: str, pose: Floats | None = None,
           pose_init: Literal["search", "cnn", "reader", "mean"] | None = None, pose_lr: float = _DI.pose_lr,
           search_grid: str = GRID, search_steps: int = _DS.steps, estimators: str | None = None,
           views: str | None = None, video: bool = False, frames: int = 60, fps: int = 12, mesh: bool = False,
           mesh_level: float = 0.5, mesh_format: str | None = None, steps: int = _DI.steps,
           pti_steps: int = _DI.pti_steps, no_w_plus: bool = False, planes: int | None = None,
           plane_chunk: int | None = None, seed: int = _DI.seed, no_crop: bool = False, mirror: bool = False,
           device: str | None = None, threads: int | None = None) -> int:
    """Invert one image into a GMPI scene (latent + pivotal tuning) and render novel views, depth, a video and a mesh.

    Args:
        ckpt: GMPI generator checkpoint (ours or an official generator.pth).
        image: the image (PNG/JPEG; centre-cropped and resized as needed).
        out: output folder.
        pose: camera of the image, YAW,PITCH radians (default: estimated, see --pose-init).
        pose_init: without --pose, the camera's start before it is refined with the latent: search (the generator
            scores a grid over the pose prior; default), cnn (the pose estimator; default with --estimators), reader
            (the search over the half of the prior's yaw range around the reading of a pose CNN trained on the
            checkpoint's own renders, cached next to it: minutes the first time), mean (the preset's mean pose).
        pose_lr: stage 1 step of the estimated camera's yaw and pitch (0: keep the starting camera).
        search_grid: camera search: YAWSxPITCHES candidates over the prior.
        search_steps: latent steps per candidate.
        estimators: pose estimator file for --pose-init cnn (default: runs/estimators/<training data>.pt if there).
        views: novel views "Y1,P1;Y2,P2" (default: yaw -0.3,0,0.3).
        video: yaw sweep over the prior's range: yaw.mp4 (RGB | depth).
        frames: frames of the video.
        fps: frames per second of the video.
        mesh: marching cubes over the alpha volume.
        mesh_level: iso-level on the smoothed alpha volume.
        mesh_format: ply, glb (glTF binary, vertex colours) or both: ply,glb (default ply; implies --mesh).
        steps: stage 1 steps (latent: W, then W+).
        pti_steps: stage 2 steps (pivotal tuning; 0: off).
        no_w_plus: stage 1 in W only.
        planes: MPI planes (default: the preset's training count).
        plane_chunk: planes per chunk (memory at high resolution).
        seed: seed of the optimisation's noise.
        no_crop: refuse a non-square image instead of centre-cropping it.
        mirror: search the camera on the image and on its left-right mirror and invert at their mean, fixed (with
            --pose-init search or reader): a lower camera error, three fits' time (docs/INVERSION.md).
        device: cuda or cpu (default: cuda when available).
        threads: CPU threads (1 is fastest at 32-64 px on a machine shared with other jobs).
    """
    if threads:
        torch.set_num_threads(threads)
    s = InvertSettings(steps=steps, pti_steps=pti_steps, w_plus_from=1.0 if no_w_plus else _DI.w_plus_from,
                       planes=planes, plane_chunk=plane_chunk, seed=seed, pose_lr=pose_lr)
    search = SearchSettings(*parse_grid(search_grid), steps=search_steps, plane_chunk=plane_chunk)
    formats = parse_mesh_formats("ply" if mesh_format is None else mesh_format)
    pose = None if pose is None else parse_pose(",".join(map(str, pose)))  # YAW,PITCH: two numbers
    try:
        m = invert_image(ckpt, image, out, pose, parse_views(views) if views is not None else None, video,
                         mesh or mesh_format is not None, s, estimators, not no_crop, device or default_device(),
                         frames=frames, fps=fps, mesh_level=mesh_level, pose_init=pose_init, search=search,
                         mesh_formats=formats, mirror=mirror)
    except KeyboardInterrupt:  # before there was a camera to write a result at (--mirror's fits)
        print(f"interrupted (Ctrl-C) before the inversion: nothing written to {out}", file=sys.stderr)
        return 130
    cam = m["camera"]
    confidence = "" if cam.get("confidence") is None else f", search confidence {cam['confidence']:.3f}"
    print(f"camera ({cam['source']}{', refined' if cam['refined'] else ''}): yaw {cam['yaw']:.3f}, pitch "
          f"{cam['pitch']:.3f}{confidence}")
    print(f"reconstruction at the input camera: PSNR {m['recon_psnr']:.2f} dB, SSIM {m['recon_ssim']:.3f} "
          f"({m['seconds_inversion']:.1f} s) -> {out}")
    return 130 if m["interrupted"] else 0


def poses(ckpt: str, images: str, out: str, min_confidence: float | None = None, skip_bad: bool = False,
          overwrite: bool = False, steps: int = _DI.steps, pose_lr: float = _DI.pose_lr, search_grid: str = GRID,
          search_steps: int = _DS.steps, planes: int | None = None, plane_chunk: int | None = None,
          seed: int = _DI.seed, device: str | None = None, threads: int | None = None,
          pose_init: Literal["search", "reader"] = "search", mirror: bool = False) -> int:
    """Estimate the camera of every image in a folder with a GMPI checkpoint (analysis-by-synthesis) and write the
    poses.json `gmpi data folder` reads, with a per-image confidence and a report.

    Args:
        ckpt: GMPI generator checkpoint (ours or an official generator.pth).
        images: folder of square images (searched recursively).
        out: poses file to write (JSON); the report goes next to it.
        min_confidence: leave images whose search confidence is below this out of --out (they stay in the report).
        skip_bad: list unreadable or non-square images in the report instead of stopping.
        overwrite: start again instead of resuming an earlier run.
        steps: stage 1 steps (latent and camera).
        pose_lr: stage 1 step of yaw and pitch (0: the search's).
        search_grid: YAWSxPITCHES candidates over the prior.
        search_steps: latent steps per candidate.
        planes: MPI planes (default: the preset's training count).
        plane_chunk: planes per chunk (memory at high resolution).
        seed: seed of the optimisation's noise.
        device: cuda or cpu (default: cuda when available).
        threads: CPU threads (1 is fastest at 32-64 px next to other jobs).
        pose_init: search (the prior) or reader (the half of the prior's yaw range around the reading of a pose CNN
            trained on the checkpoint's own renders: minutes the first time, then cached next to the checkpoint).
        mirror: keep the mean of each camera's fits on the image and on its left-right mirror: twice the time, a
            lower error (docs/INVERSION.md, "Mirror averaging").
    """
    if threads:
        torch.set_num_threads(threads)
    s = InvertSettings(steps=steps, pti_steps=0, pose_lr=pose_lr, planes=planes, plane_chunk=plane_chunk, seed=seed)
    search = SearchSettings(*parse_grid(search_grid), steps=search_steps, plane_chunk=plane_chunk)
    report = estimate_folder(ckpt, images, out, s, search, min_confidence, skip_bad, overwrite,
                             device or default_device(), pose_init=pose_init, mirror=mirror)
    print(f"wrote {report['count']} camera(s) to {out} ({len(report['low_confidence'])} unsure, "
          f"{len(report['left_out'])} left out, {len(report['skipped'])} skipped; report {report_path(out)})")
    if report["interrupted"]:
        print("interrupted (Ctrl-C): run the same command again to continue", file=sys.stderr)
        return 130
    if report["count"]:
        skip = " --skip-bad" if report["left_out"] or report["skipped"] else ""  # those images have no camera
        print(f"next: gmpi data folder --images {shlex.quote(str(images))} --poses {shlex.quote(str(out))} --preset "
              f"{report['preset']} --out DATA{skip}")
    else:
        print(f"no image has a camera in {out}: see the report for why", file=sys.stderr)
    return 0
