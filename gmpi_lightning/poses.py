"""``gmpi poses``: a folder of your own images -> the camera of each, in the file ``gmpi data folder`` reads
(docs/DATA.md, "Your own images without poses").

    gmpi poses --ckpt runs/synthetic/gmpi.pt --images my_faces/ --out my_faces_poses.json [--min-confidence 0.05]

Each camera is estimated as ``gmpi invert`` does without ``--pose`` (:mod:`gmpi_lightning.pose_search`; no pivotal
tuning). ``--out`` gets ``{"file.png": {"yaw", "pitch", "confidence"}}`` (radians, keyed by the path relative to
``--images``); ``<out>.report.json`` holds every estimate, the unsure and skipped images, the checkpoint and the
settings. Both are rewritten after every image, so Ctrl-C keeps the finished ones and the same command resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from .camera_fit import estimate_camera, mirror_fit
from .data import IMAGE_EXTS, file_sha256, image_files, read_picture, write_atomic
from .errors import InputError, warner
from .inversion import InvertSettings
from .pose_reader import reader_for
from .pose_search import SearchSettings

REPORT_FORMAT = "gmpi-lightning/poses-report/v1"
FLAG_BELOW = 0.05  # confidence under which an image is listed as unsure when no --min-confidence is given
OPTIONAL = {"mirror": False}  # settings a report may lack: what a report without them was made with
_warn = warner("gmpi poses")


def report_path(out: str | Path) -> Path:
    """Where the report of poses file ``out`` goes: ``<stem>.report.json`` beside it."""
    return Path(out).with_name(f"{Path(out).stem}.report.json")


def list_images(folder: str | Path) -> list[str]:
    """Image files under ``folder`` as sorted paths relative to it (the keys ``gmpi data folder`` matches)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    names = image_files(folder, note=_warn)
    if not names:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) in it or below it")
    return names


def check_images(folder: Path, names: list[str]) -> dict[str, str]:
    """{name: why it cannot be posed} for unreadable, multi-frame or non-square files (read once, up front)."""
    bad = {}
    for name in names:
        try:
            h, w = read_picture(folder / name, name)[0].shape[:2]  # decoded whole: a truncated file fails here
        except InputError as e:
            bad[name] = str(e).removeprefix(f"{name}: ")
            continue
        if w != h:
            bad[name] = (f"{w} x {h} is not square: crop it to the face (gmpi data folder reads square images and "
                         f"the camera of a crop is not the file's)")
    return bad


def estimate_folder(ckpt, images, out, settings: InvertSettings | None = None, search: SearchSettings | None = None,
                    min_confidence: float | None = None, skip_bad: bool = False, overwrite: bool = False,
                    device: str = "cpu", warn=_warn, pose_init: str = "search", mirror: bool = False) -> dict:
    """``gmpi poses`` as a function: writes ``out`` and its report (module docstring) and returns the report.
    ``pose_init="reader"`` searches around the checkpoint's pose reader's reading, as ``gmpi invert --pose-init
    reader``; ``mirror`` keeps the mean of the image's and its mirror's cameras (``camera_fit.mirror_average``)."""
    from . import export
    from .inference import load_gmpi, load_image

    settings = settings or InvertSettings(pti_steps=0)
    if settings.pti_steps:
        raise InputError("gmpi poses estimates cameras only: pass settings with pti_steps=0")
    search = search or SearchSettings()
    if pose_init not in ("search", "reader"):
        raise InputError(f"--pose-init {pose_init!r}: gmpi poses searches (search) or searches around the "
                         f"checkpoint's pose reader (reader)")
    folder, out = Path(images), Path(out)
    if out.suffix.lower() != ".json" or out.is_dir():
        raise InputError(f"--out {out}: the poses file to write, a .json file (not a folder or an image); its report "
                         f"goes next to it")
    names = list_images(folder)
    bad = check_images(folder, names)
    if bad and not skip_bad:
        listed = "; ".join(f"{n}: {why}" for n, why in list(bad.items())[:5])
        raise InputError(f"{len(bad)} of {len(names)} images in {folder} cannot be posed ({listed}"
                         f"{' ...' if len(bad) > 5 else ''}); fix them, or pass --skip-bad to list them in the report "
                         f"and pose the rest. Nothing was written")
    loaded = load_gmpi(ckpt, device)
    G, preset = loaded.G, loaded.preset
    meta = {"format": REPORT_FORMAT, "checkpoint": str(ckpt), "checkpoint_sha256": file_sha256(ckpt),
            "preset": preset.name, "images": str(folder), "settings": asdict(settings), "search": asdict(search),
            "pose_init": pose_init, "mirror": mirror}
    done, digest = _resume(out, meta, overwrite), {n: file_sha256(folder / n) for n in names if n not in bad}
    stale = sorted(n for n in done if done[n].get("sha256") != digest.get(n))  # replaced, edited or removed since
    done = {n: r for n, r in done.items() if n not in stale}  # so estimated again, or dropped
    if done or stale:
        print(f"resuming: {len(done)} of {len(names)} images already posed in {report_path(out)}"
              + (f"; {len(stale)} changed or gone since (e.g. {stale[0]}): posed again or dropped" if stale else ""))
    reader = reader_for(ckpt, G, preset, device=device) if pose_init == "reader" else None
    todo = [n for n in names if n not in bad and n not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    flag = FLAG_BELOW if min_confidence is None else min_confidence
    interrupted, t0 = False, time.perf_counter()
    bar = export.progress(total=len(names) - len(bad), initial=len(done), unit="img", desc="gmpi poses")
    try:
        for name in todo:
            notes = []  # resized, grey, alpha dropped: kept in the report, counted once at the end
            target = load_image(folder / name, G.img_resolution, crop=False, warn=notes.append).to(device)
            found = (mirror_fit if mirror else estimate_camera)(G, preset, target, settings, search, reader)
            if found is None:  # Ctrl-C inside the estimation: this image is not done
                interrupted = True
                break
            done[name] = {"sha256": digest[name], **found,
                          **({"notes": [n.removeprefix(f"{folder / name}: ") for n in notes]} if notes else {})}
            _write(out, meta, done, bad, min_confidence, flag, interrupted=False)
            bar.update()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    report = _write(out, meta, done, bad, min_confidence, flag, interrupted, time.perf_counter() - t0)
    for name in report["low_confidence"]:
        c, left_out = done[name]["confidence"], name in report["left_out"]
        warn(f"{name}: camera unsure (confidence {'none' if c is None else f'{c:.3f}'} < {flag}): "
             + (f"left out of {out}" if left_out else f"kept; --min-confidence {flag} would leave it out"))
    for name, why in bad.items():
        warn(f"{name}: skipped ({why})")
    changed = [n for n in done if done[n].get("notes")]
    if changed:
        warn(f"{len(changed)} image(s) were changed on reading (resized to {G.img_resolution} px, grey made RGB or "
             f"an alpha channel dropped), e.g. {changed[0]}: {'; '.join(done[changed[0]]['notes'])}; every note is "
             f"under `estimates` in {report_path(out)}")
    return report


def _resume(out: Path, meta: dict, overwrite: bool) -> dict:
    """Estimates of an earlier run of the same command (same checkpoint, folder and settings), else {}."""
    rep = report_path(out)
    if overwrite or not (out.exists() or rep.exists()):
        return {}
    try:
        old = json.loads(rep.read_text())
    except (OSError, ValueError):
        old = None
    if not (isinstance(old, dict) and all(old.get(k, OPTIONAL.get(k)) == v for k, v in meta.items())):
        raise FileExistsError(f"{out} exists from another checkpoint, folder or settings (see {rep}): pass "
                              f"--overwrite to replace it, or choose another --out")
    return dict(old.get("estimates") or {})


def _write(out: Path, meta: dict, done: dict, bad: dict, min_confidence, flag: float, interrupted: bool,
           seconds: float | None = None) -> dict:
    low = [n for n, r in done.items() if r["confidence"] is None or r["confidence"] < flag]
    left_out = low if min_confidence is not None else []
    poses = {n: {"yaw": r["yaw"], "pitch": r["pitch"], "confidence": r["confidence"]}
             for n, r in done.items() if n not in left_out}
    report = {**meta, "poses": str(out), "min_confidence": min_confidence, "flag_below": flag, "count": len(poses),
              "low_confidence": low, "left_out": left_out, "skipped": bad, "interrupted": interrupted,
              "estimates": done, **({"seconds": seconds} if seconds is not None else {})}
    for path, data in ((out, poses), (report_path(out), report)):  # atomically: Ctrl-C never leaves half a file
        write_atomic(path, lambda tmp, data=data: tmp.write_text(json.dumps(data, indent=1)))
    return report
