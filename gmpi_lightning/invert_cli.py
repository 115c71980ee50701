"""``gmpi invert``: one image in; latent, tuned generator, novel views, depth, video and mesh out.

    gmpi invert --ckpt runs/synthetic/gmpi.pt --image head.png --out runs/invert/head \\
        [--pose YAW,PITCH] [--views "-0.3,0;0.3,0"] [--video] [--mesh] [--steps 300] [--pti-steps 150]

Without ``--pose`` the camera is found by the generator itself (:mod:`gmpi_lightning.pose_search`) and reported in
metrics.json's ``camera`` with the search's runner-up and confidence. From Python: :func:`invert_image` (files) or
:func:`gmpi_lightning.inversion.invert` (tensors). The files in ``--out`` (:data:`OWN_FILES`): docs/INVERSION.md.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from . import export
from .camera_fit import mirror_fit
from .cameras import clamp_to_prior, pose_range
from .errors import InputError, warner
from .estimators import load_estimators
from .evaluation.evaluate import default_inputs
from .inference import load_gmpi, load_image
from .inversion import Inversion, InvertSettings, PinnedLatent, invert
from .io import save_gmpi_checkpoint
from .mesh_io import write_mesh
from .pose_reader import reader_for, yaw_window
from .pose_search import SearchSettings
from .presets import Preset
from .scene import Scene

LATENT_FORMAT = "gmpi-lightning/latent/v1"
_warn = warner("gmpi invert")


def parse_pose(text: str) -> tuple[float, float]:
    try:
        yaw, pitch = (float(v) for v in str(text).split(","))
    except ValueError:
        raise InputError(f"cannot parse pose {text!r}: use YAW,PITCH in radians, e.g. 0.2,-0.05") from None
    return yaw, pitch


def parse_grid(text: str) -> tuple[int, int]:
    """'7x3' -> (7 yaws, 3 pitches)."""
    try:
        yaws, pitches = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise InputError(f"cannot parse the search grid {text!r}: use YAWSxPITCHES, e.g. 7x3") from None
    return yaws, pitches


def parse_views(text: str) -> list[tuple[float, float]]:
    """'Y1,P1;Y2,P2' -> [(Y1, P1), (Y2, P2)] (radians)."""
    parts = [p for p in str(text).split(";") if p.strip()]
    if not parts:
        raise InputError(f"no views in {text!r}: use e.g. \"-0.3,0;0.3,0\"")
    return [parse_pose(p) for p in parts]


def _range_text(preset: Preset) -> str:
    (y0, y1), (p0, p1) = pose_range(preset)
    return f"yaw {y0:.3f}..{y1:.3f}, pitch {p0:.3f}..{p1:.3f} rad"


def check_pose(yaw: float, pitch: float, preset: Preset) -> None:
    (y0, y1), (p0, p1) = pose_range(preset)
    if not (y0 - 1e-6 <= yaw <= y1 + 1e-6 and p0 - 1e-6 <= pitch <= p1 + 1e-6):
        raise InputError(f"--pose {yaw},{pitch} is outside the {preset.name} preset's camera range "
                         f"({_range_text(preset)}: the training prior); the generator never saw such a view. "
                         f"Pass a pose inside it, or leave --pose out to estimate it")


POSE_INIT = ("search", "cnn", "reader", "mean")


def resolve_pose(pose, target: torch.Tensor, preset: Preset, estimators, training_data, warn=_warn,
                 pose_init: str | None = None, reader=None) -> tuple[float | None, float | None, str]:
    """(yaw, pitch, source) of the camera inversion starts from: ``pose`` as given (checked); else by ``pose_init``
    (default ``cnn`` with ``estimators``, else ``search``): ``search`` -> (None, None, 'search'), for
    :func:`~gmpi_lightning.inversion.invert` to search; ``cnn`` the pose estimator's reading (``estimators`` or
    ``runs/estimators/<data>.pt``), ``reader`` the checkpoint's own pose reader's (``reader()`` returns it;
    :func:`invert_image` then searches around it), both clamped into the prior; ``mean`` the preset's mean pose."""
    if pose is not None:
        yaw, pitch = pose
        check_pose(yaw, pitch, preset)
        return float(yaw), float(pitch), "given"
    method = pose_init or ("cnn" if estimators is not None else "search")
    if method not in POSE_INIT:
        raise InputError(f"--pose-init {method!r}: expected one of {', '.join(POSE_INIT)}")
    if method == "search":
        return None, None, "search"
    if method == "mean":
        return float(preset.yaw_mean), float(preset.pitch_mean), "preset mean"
    if method == "reader":
        if reader is None:
            raise InputError("--pose-init reader needs the checkpoint's pose reader (gmpi invert makes it)")
        model, name, source = reader().to(target.device), "the checkpoint's pose reader", "reader"
    else:  # cnn
        if estimators is None and training_data:  # as `gmpi evaluate`: runs/estimators/<data>.pt when it is there
            estimators = default_inputs(["pose"], None, None, training_data)[1]
        if estimators is None:
            raise FileNotFoundError("--pose-init cnn needs a pose estimator and this checkpoint's data has none: pass "
                                    "--estimators FILE (`make estimators` writes runs/estimators/<data>.pt), or leave "
                                    "--pose-init out to search the camera with the generator itself")
        model, name = load_estimators(estimators, map_location=target.device)[0], estimators
        source = f"estimated ({estimators})"
    with torch.no_grad():  # the CNN's reading, clamped into the prior's range (with a warning)
        yaw, pitch = (float(v) for v in model(target * 2 - 1)[0])
    cy, cp = clamp_to_prior(yaw, pitch, preset)
    if (cy, cp) != (yaw, pitch):
        warn(f"estimated pose {yaw:.3f},{pitch:.3f} clamped into the preset's range ({_range_text(preset)})")
    print(f"pose estimated by {name}: yaw {cy:.3f}, pitch {cp:.3f}")
    return cy, cp, source


def check_views(scene: Scene, views: list[tuple[float, float]]) -> None:
    """Every requested view must see only the MPI (rays inside the background plane): checked before optimising."""
    mpi = torch.zeros(1, len(scene.planes), 4, 4, 4, device=scene.device)
    mpi[:, -1, 3] = 1
    for i, (yaw, pitch) in enumerate(views):
        try:
            scene.render_pose(mpi, yaw, pitch, resolution=8)
        except ValueError:
            raise InputError(f"view {i} (yaw {yaw}, pitch {pitch}) looks past the edge of the MPI; the "
                             f"{scene.preset.name} preset covers the training prior ({_range_text(scene.preset)}): "
                             f"choose views nearer to it") from None


# ============================================================================================= outputs
OWN_FILES = ("input.png", "recon.png", "latent.pt", "generator.pt", "view_[0-9][0-9].png", "view_[0-9][0-9]_depth.png",
             "views.json", "yaw.mp4", "mesh.ply", "mesh.glb", "metrics.json")  # what gmpi invert writes in --out


def write_outputs(inv: Inversion, out: Path, views, video: bool = False, mesh: bool = False, frames: int = 60,
                  fps: int = 12, mesh_level: float = 0.5, extra: dict | None = None,
                  mesh_formats=("ply",)) -> dict:
    """The files of ``gmpi invert`` (docs/INVERSION.md); returns the metrics written to metrics.json (a mesh that
    cannot be made is a warning there and on stderr)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in (p for pattern in OWN_FILES for p in out.glob(pattern)):  # an earlier inversion's files go first,
        old.unlink()  # so no generator.pt, view or mesh of another image is left beside this one's latent
    extra, preset = extra or {}, inv.scene.preset
    chunk = extra.get("settings", {}).get("plane_chunk")
    pictures = lambda yaw, pitch: export.view_images(inv.render(yaw, pitch, plane_chunk=chunk), preset)  # RGB, depth
    export.save_png(out / "input.png", export.to_uint8(inv.target[0]))
    export.save_png(out / "recon.png", export.to_uint8(inv.reconstruction()["rgb"][0]))
    torch.save({"format": LATENT_FORMAT, "ws": inv.ws.detach().cpu(), "yaw": inv.yaw, "pitch": inv.pitch,
                "planes": len(inv.scene.planes), "preset": preset.name,
                "generator": "generator.pt" if inv.tuned else str(extra.get("checkpoint"))}, out / "latent.pt")
    if inv.tuned:
        save_gmpi_checkpoint(out / "generator.pt", inv.G, preset.to_dict(), extra={
            "data": extra.get("training_data"), "latent": "latent.pt", "inverted_image": str(out / "input.png")})
    listed = []
    for i, (yaw, pitch) in enumerate(views):
        files = (f"view_{i:02d}.png", f"view_{i:02d}_depth.png")
        for file, image in zip(files, pictures(yaw, pitch)):
            export.save_png(out / file, image)
        listed.append({"index": i, "yaw": yaw, "pitch": pitch, "image": files[0], "depth": files[1]})
    (out / "views.json").write_text(json.dumps({"input": {"yaw": inv.yaw, "pitch": inv.pitch,
                                                          "image": "input.png", "recon": "recon.png"},
                                                "views": listed}, indent=1))
    if video:
        (y0, y1), _ = pose_range(preset)
        sweep = export.sweep_poses("yaw", frames, (y0 + y1) / 2, inv.pitch, yaw_range=(y1 - y0) / 2)
        export.write_video(out / "yaw.mp4", [np.concatenate(pictures(*pose), axis=1) for pose in sweep], fps=fps)
    metrics = {**inv.metrics(), "tuned": inv.tuned, "interrupted": inv.interrupted, "stages": inv.history, **extra}
    if mesh:
        try:
            verts, faces, colors = export.extract_mesh(PinnedLatent(inv.G, inv.ws), inv.ws.new_zeros(1, 1), preset,
                                                       export.mesh_extent(inv.scene.planes.extents), level=mesh_level)
            files = write_mesh(out / "mesh", verts, faces, colors, mesh_formats)
            metrics["mesh"] = {"file": files[0].name, "files": [f.name for f in files], "vertices": len(verts),
                               "faces": len(faces)}
        except ValueError as e:
            _warn(f"no mesh: {e}")
            metrics["warnings"] = [*metrics.get("warnings", []), f"no mesh: {e}"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    return metrics


# ============================================================================================ the flow
LOW_CONFIDENCE = 0.05  # search confidence under which the camera is reported as unsure (docs/INVERSION.md)


def _check_mirror(pose, pose_init: str | None, estimators) -> None:
    """``--mirror`` repeats the generator's camera search on the mirror image: refused, before any work, where the
    camera is not searched."""
    averages = "--mirror averages the camera the generator searches for"
    if pose is not None:
        raise InputError(f"{averages}; --pose gives it: drop one of them")
    if pose_init not in (None, "search", "reader"):
        raise InputError(f"{averages}; --pose-init {pose_init} does not search: use --pose-init search or reader")
    if pose_init is None and estimators is not None:
        raise InputError(f"{averages}, and --estimators makes the pose CNN's reading the start (--pose-init cnn): add "
                         f"--pose-init search or reader")


def camera_report(inv: Inversion, source: str, yaw0: float | None, pitch0: float | None) -> dict:
    """metrics.json's ``camera``: the camera used, where it started, whether it was refined, and for a search
    the runner-up, the loss gap and the confidence (:mod:`gmpi_lightning.pose_search`)."""
    found = inv.history.get("pose_search")
    start = [found["best"]["yaw"], found["best"]["pitch"]] if found else [yaw0, pitch0]
    out = {"yaw": inv.yaw, "pitch": inv.pitch, "source": source, "start": start,
           "refined": bool(inv.history.get("latent", {}).get("pose_refined"))}
    if found:
        out.update(runner_up=found["runner_up"], loss_gap=found["loss_gap"], confidence=found["confidence"])
    return out


def invert_image(ckpt, image, out, pose: tuple[float, float] | None = None,
                 views: list[tuple[float, float]] | None = None, video: bool = False, mesh: bool = False,
                 settings: InvertSettings | None = None, estimators=None, crop: bool = True, device: str = "cpu",
                 frames: int = 60, fps: int = 12, mesh_level: float = 0.5, pose_init: str | None = None,
                 search: SearchSettings | None = None, mesh_formats=("ply",), mirror: bool = False) -> dict:
    """``gmpi invert`` as a function: every file of the command written to ``out``; returns metrics.json's dict.
    ``views`` default to yaw -0.3, 0, 0.3 around the preset's mean pose. Without ``pose`` the camera is estimated
    (``pose_init``: :func:`resolve_pose`) and refined with the latent (``settings.pose_lr``; 0 keeps it). ``mirror``:
    inverted at the mean camera of fits on the image and its mirror (:func:`~gmpi_lightning.camera_fit.mirror_fit`),
    kept fixed; Ctrl-C in those fits raises ``KeyboardInterrupt`` (no camera to write a result at yet)."""
    t0, notes = time.perf_counter(), []
    warn = lambda msg: notes.append(msg) or _warn(msg)  # on stderr and in metrics.json
    s, search = settings or InvertSettings(), search or SearchSettings()
    if mirror:
        _check_mirror(pose, pose_init, estimators)
    loaded = load_gmpi(ckpt, device)
    preset, G = loaded.preset, loaded.G
    views = views if views is not None else [(preset.yaw_mean + d, preset.pitch_mean) for d in (-0.3, 0.0, 0.3)]
    check_views(Scene.for_generator(G, preset, s.planes or preset.train_planes, device), views)
    target = load_image(image, G.img_resolution, crop=crop, warn=warn).to(device)
    reader = functools.cache(lambda: reader_for(ckpt, G, preset, device=device))
    reading, averaged, fits_seconds = None, None, 0.0
    if mirror:  # both searches and stage 1 fits, then the image inverted at their mean camera, kept fixed
        source = pose_init or "search"
        print(f"--mirror: the camera search and {s.steps} steps of stage 1 on the image, then on its mirror")
        averaged = mirror_fit(G, preset, target, s, search, reader() if source == "reader" else None, progress=True)
        if averaged is None:
            raise KeyboardInterrupt  # Ctrl-C in a fit: no camera yet, nothing written
        yaw, pitch, source = averaged["yaw"], averaged["pitch"], f"{source}, mirror-averaged"
        fits_seconds = averaged["image"]["seconds"] + averaged["mirrored"]["seconds"]
    else:
        yaw, pitch, source = resolve_pose(pose, target, preset, estimators, loaded.training_data, warn=warn,
                                          pose_init=pose_init, reader=reader)
        if source == "reader":  # the camera search, on the reader's side of the prior
            reading, yaw, pitch = [yaw, pitch], None, None
            search = replace(search, yaw_range=yaw_window(reading[0], preset))
    inv = invert(G, preset, target, yaw, pitch, s, progress=True,  # a given or averaged camera stays
                 refine_pose=source != "given" and averaged is None and s.pose_lr > 0, search=search)
    if inv.interrupted:
        warn("interrupted (Ctrl-C): writing the best result so far")
    camera = camera_report(inv, source, yaw, pitch) | ({"reader": reading} if reading else {})
    if averaged:  # the search's fields: the less confident fit's (camera_fit.mirror_average)
        camera |= {k: averaged[k] for k in ("runner_up", "loss_gap", "confidence")} | {
            "start": averaged["image"]["search"], "mirror": averaged}
    if camera.get("confidence") is not None and camera["confidence"] < LOW_CONFIDENCE:
        warn(f"the camera search is unsure (confidence {camera['confidence']:.3f} < {LOW_CONFIDENCE}): the "
             f"runner-up yaw {camera['runner_up']['yaw']:.3f}, pitch {camera['runner_up']['pitch']:.3f} explains the "
             f"image almost as well; pass --pose YAW,PITCH if you know it")
    extra = {"image": str(image), "pose_source": source, "camera": camera, "checkpoint": str(ckpt),
             "training_data": loaded.training_data, "device": str(device),
             "seconds_inversion": fits_seconds + sum(h["seconds"] for h in inv.history.values()),
             "settings": asdict(s), "warnings": notes}
    metrics = write_outputs(inv, Path(out), views, video, mesh, frames, fps, mesh_level, extra,
                            mesh_formats=mesh_formats)
    metrics["seconds_total"] = time.perf_counter() - t0
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    return metrics
