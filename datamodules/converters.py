"""Converters from the real dataset formats to posed-image shards (``gmpi data ...``; docs/DATA.md): FFHQ/MetFaces
(a StyleGAN2 dataset-tool zip or folder + one Deep3DFaceRecon ``.mat`` per image, w2c as docs/METHOD.md §1.5),
EG3D (AFHQv2-Cat: ``dataset.json`` labels [file, 25 numbers], the first 16 a cam2world in EG3D's y-up world, OpenCV
camera) and any folder with ``poses.json`` / ``poses.csv`` (yaw/pitch in radians, or a 4x4 c2w in the GMPI world).

Every input is checked; the first bad one stops the conversion naming the file, or (``skip_bad``) is recorded in
``rejected.jsonl``. Workers decode and encode bounded blocks, so memory stays constant. Inputs are untrusted
(:mod:`datamodules.sources`): a member name with ``..`` or an absolute path never selects a pose file outside the
pose folder.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from gmpi_lightning import cameras
from gmpi_lightning.data import IMAGE_EXTS
from gmpi_lightning.errors import InputError, warner
from gmpi_lightning.export import progress
from gmpi_lightning.presets import PRESETS, get_preset

from .posed_images import mirror_w2c
from .shards import BadSample, ShardSetWriter, decode_image, encode_png, make_key
from .sources import ImageSource, common_size, is_inside_name

_warn = warner("gmpi data")


# ------------------------------------------------------------------------------------- pose records
def read_deep3dface_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(angle[3], trans[3]) from a Deep3DFaceRecon coefficient file."""
    from scipy.io import loadmat

    if not path.is_file():
        raise BadSample(f"{path}: pose file missing (expected one Deep3DFaceRecon .mat per image)")
    try:
        mat = loadmat(str(path))
    except Exception as e:
        raise BadSample(f"{path}: unreadable .mat file ({type(e).__name__}: {e})") from None
    out = []
    for field in ("angle", "trans"):
        if field not in mat:
            raise BadSample(f"{path}: field '{field}' missing (has {sorted(k for k in mat if not k.startswith('_'))})")
        v = np.asarray(mat[field], dtype=np.float64).reshape(-1)
        if v.size != 3:
            raise BadSample(f"{path}: field '{field}' must hold 3 numbers, got {v.size}")
        if not np.isfinite(v).all():
            raise BadSample(f"{path}: field '{field}' contains NaN or Inf")
        out.append(v)
    return out[0], out[1]


def _reject(message: str):
    """A pose that rejects its image (bound with functools.partial: picklable for the workers)."""
    raise BadSample(message)


def _process(args) -> tuple[str, list[tuple] | None, str | None]:
    """One image in a worker: read, check, pose (may raise BadSample), encode; and its mirror with ``xflip``."""
    source, name, pose_fn, resolution, xflip = args
    try:
        img = decode_image(source.read(name), name, resolution)
        pose = pose_fn()
        key, extra = make_key(name), pose.get("extra")
        out = [(key, encode_png(img), pose["w2c"], pose["yaw"], pose["pitch"], extra)]
        if xflip:
            out.append((key + "_xflip", encode_png(np.ascontiguousarray(img[:, ::-1])), mirror_w2c(pose["w2c"]),
                        -pose["yaw"], pose["pitch"], dict(extra or {}, xflip=True)))
        return name, out, None
    except BadSample as e:
        return name, None, str(e)


def run_conversion(source: ImageSource, jobs: list[tuple[str, Callable[[], dict]]], out: str | Path, preset_name: str,
                   source_tag: str, resolution: int | None = None, xflip: bool = False, skip_bad: bool = False,
                   overwrite: bool = False, workers: int = 2, samples_per_shard: int = 1000,
                   extra_card: dict | None = None) -> Path:
    """Shards of the images ``jobs`` names, (name, pose callable) pairs in the source's order, a name that the source
    lists twice included (rejected as a repeated key). The callables (-> {'w2c', 'yaw', 'pitch', 'extra'?}; may raise
    BadSample) are picklable, as workers run them."""
    preset = get_preset(preset_name)
    if not jobs:
        raise BadSample(f"no images found in {source.path}")
    if resolution is None:  # the most common square size decides, then every image must match
        resolution = common_size(source, [name for name, _ in jobs])
    seen: dict[str, str] = {}
    with ShardSetWriter(out, preset.name, resolution, source_tag, samples_per_shard, overwrite, skip_bad,
                        extra=extra_card) as writer:
        unique = []
        for name, pose in jobs:  # duplicate keys are an input error (two files would become one sample)
            key = make_key(name)
            if key in seen:
                writer.reject(name, BadSample(f"{name}: same sample key '{key}' as {seen[key]}"))
                continue
            seen[key] = name
            unique.append((source, name, pose, resolution, xflip))
        pool = get_context("fork").Pool(workers) if workers > 0 else None
        bar = progress(total=len(unique), unit="img", desc=f"gmpi data {source_tag}")
        try:
            block = 64 * max(1, workers)
            for i in range(0, len(unique), block):
                args = unique[i:i + block]
                results = pool.imap(_process, args, chunksize=8) if pool else map(_process, args)
                for name, samples, error in results:
                    if error is not None:
                        writer.reject(name, BadSample(error))
                    else:
                        for key, png, w2c, yaw, pitch, extra in samples:
                            writer.write(key, png, w2c, yaw, pitch, preset.fov_deg, name, extra_pose=extra)
                    bar.update()
        finally:
            bar.close()
            if pool:
                pool.terminate()
    print(f"wrote {writer.count} samples ({writer.n_rejected} rejected) to {out}")
    return Path(out)


# ----------------------------------------------------------------------------------------- datasets
def _pose_of_w2c(w2c: torch.Tensor, c: float, **extra) -> dict:
    yaw, pitch = cameras.yaw_pitch_from_w2c(w2c, c)
    return {"w2c": w2c[0].float().numpy(), "yaw": float(yaw[0]), "pitch": float(pitch[0]), **extra}


def _deep3d_pose(poses: Path, name: str, c: float, r: float) -> dict:
    """The pose of image ``name`` (already checked by :func:`is_inside_name`) from its .mat in ``poses``: same
    relative path, or the same stem at the top of the pose folder."""
    nested = poses / Path(name).with_suffix(".mat")
    angle, trans = read_deep3dface_mat(nested if nested.is_file() else poses / (Path(name).stem + ".mat"))
    return _pose_of_w2c(cameras.w2c_from_deep3dface(angle, trans, c, r), c,
                        extra={"angle": angle.tolist(), "trans": trans.tolist()})


def convert_ffhq(images: str | Path, poses: str | Path, out: str | Path, preset: str = "FFHQ256",
                 fail_list: str | Path | None = None, **kw) -> Path:
    """FFHQ/MetFaces: dataset-tool zip or folder + Deep3DFaceRecon .mat per image (same relative path)."""
    source, poses = ImageSource(images), Path(poses)
    if not poses.is_dir():
        raise FileNotFoundError(f"pose folder not found: {poses} (one Deep3DFaceRecon .mat per image)")
    p = get_preset(preset)
    failed = set()  # the image stems fail_list.txt names
    if fail_list is not None:
        if not Path(fail_list).is_file():
            raise FileNotFoundError(f"fail list not found: {Path(fail_list)}")
        failed = {Path(line.strip()).stem for line in Path(fail_list).read_text().splitlines() if line.strip()}
    names = source.names()
    jobs = [(n, partial(_deep3d_pose, poses, n, p.sphere_center_z, p.sphere_r) if is_inside_name(n) else
             partial(_reject, f"{n}: member name leaves the archive root ('..' or an absolute path); its pose is not "
                              f"looked up")) for n in names if Path(n).stem not in failed]
    extra = {"excluded_by_fail_list": len(names) - len(jobs), "fail_list": str(fail_list) if fail_list else None}
    return run_conversion(source, jobs, out, p.name, "deep3dface", extra_card=extra, **kw)


def _eg3d_pose(label, c: float, r: float, name: str) -> dict:
    lab = np.asarray(label, dtype=np.float64).reshape(-1)
    if lab.size not in (16, 25):
        raise BadSample(f"{name}: EG3D label has {lab.size} numbers, expected 25 (16 cam2world + 9)")
    if not np.isfinite(lab).all():
        raise BadSample(f"{name}: EG3D label contains NaN or Inf")
    return _pose_of_w2c(cameras.w2c_from_eg3d_label(lab[None], c, r), c)


def _posed_jobs(source: ImageSource, records: dict, pose_fn, p, by_file_name: bool = False) -> list:
    """(image, pose callable) of ``source``'s images, each taking the record its name (or, ``by_file_name``, its
    file name) pops from ``records``; an image without one is rejected."""
    jobs = []
    for n in source.names():
        rec = records.pop(n, None)
        if rec is None and by_file_name:
            rec = records.pop(Path(n).name, None)
        jobs.append((n, partial(pose_fn, rec, p.sphere_center_z, p.sphere_r, n) if rec is not None else
                     partial(_reject, f"{n}: no pose for this image")))
    return jobs


def convert_eg3d(root: str | Path, out: str | Path, preset: str = "AFHQCat", **kw) -> Path:
    """EG3D-processed folder/zip with dataset.json labels (AFHQv2-Cat)."""
    source = ImageSource(root)
    try:
        labels = json.loads(source.read_text("dataset.json"))["labels"]
    except (KeyError, FileNotFoundError, json.JSONDecodeError) as e:
        raise BadSample(f"{root}: needs a dataset.json with 'labels': [[file, [25 numbers]], ...] ({e})") from None
    p = get_preset(preset)
    by_name = {str(name): lab for name, lab in labels}
    jobs = _posed_jobs(source, by_name, _eg3d_pose, p)
    return run_conversion(source, jobs, out, p.name, "eg3d", extra_card={"labels_without_image": len(by_name)},
                          **kw)


def _folder_pose(rec: dict, c: float, r: float, name: str) -> dict:
    try:
        if "c2w" in rec:
            c2w = np.asarray(rec["c2w"], dtype=np.float64).reshape(4, 4)
            if not np.isfinite(c2w).all():
                raise BadSample(f"{name}: c2w contains NaN or Inf")
            return _pose_of_w2c(cameras.invert_rigid(torch.from_numpy(c2w)), c)
        yaw, pitch = float(rec["yaw"]), float(rec["pitch"])
    except (KeyError, ValueError, TypeError) as e:
        raise BadSample(f"{name}: malformed pose record {rec} ({e}); need yaw+pitch or c2w") from None
    if not (np.isfinite(yaw) and np.isfinite(pitch)):
        raise BadSample(f"{name}: yaw/pitch not finite ({yaw}, {pitch})")
    if abs(yaw) > math.pi or abs(pitch) > math.pi / 2:
        raise BadSample(f"{name}: yaw {yaw}, pitch {pitch} are not radians (|yaw| <= pi, |pitch| <= pi/2); "
                        f"degrees? write math.radians of them")
    w2c = cameras.invert_rigid(cameras.sphere_c2w(yaw, pitch, c, r, dtype=torch.float64))
    return {"w2c": w2c[0].float().numpy(), "yaw": yaw, "pitch": pitch}


def read_folder_poses(path: str | Path) -> dict[str, dict]:
    """poses.json ({file: {yaw, pitch} | {c2w}} or a list of records with 'file') or poses.csv
    (columns file,yaw,pitch or file,c2w_00..c2w_33). A file that is neither says what it should hold."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pose file not found: {path}")
    expect = ('{"img.png": {"yaw": 0.1, "pitch": 0.0}, ...} (radians) or {"img.png": {"c2w": [16 numbers]}}, or a '
              'list of such records with a "file" key; or a CSV with columns file,yaw,pitch or file,c2w_00..c2w_33')
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not valid JSON ({e}); expected {expect}") from None
        if isinstance(data, list) and all(isinstance(r, dict) and "file" in r for r in data):
            return {str(r["file"]): r for r in data}
        if isinstance(data, dict):  # each record is checked with its image (a bad one is that image's error)
            return {str(k): v for k, v in data.items()}
        raise InputError(f"{path}: holds {type(data).__name__} records this reader cannot match to files; expected "
                         f"{expect}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    c2w = [f"c2w_{i}{j}" for i in range(4) for j in range(4)]
    if "file" not in columns or not ({"yaw", "pitch"} <= columns or set(c2w) <= columns):
        raise InputError(f"{path}: CSV columns {sorted(c for c in columns if c)} (comma-separated, with a header "
                         f"row); expected {expect}")
    return {row["file"]: {"c2w": [row[c] for c in c2w]} if set(c2w) <= columns else
            {"yaw": row["yaw"], "pitch": row["pitch"]} for row in rows}


def convert_folder(images: str | Path, poses: str | Path, out: str | Path, preset: str = "FFHQ256", **kw) -> Path:
    """Any image folder + poses.json/csv (:func:`read_folder_poses`), matched by relative path or file name."""
    source, records = ImageSource(images), read_folder_poses(poses)
    p = get_preset(preset)
    jobs = _posed_jobs(source, records, _folder_pose, p, by_file_name=True)
    if records:
        other = sorted({Path(n).suffix.lower() for n in records} - set(IMAGE_EXTS))
        _warn(f"{poses}: {len(records)} pose(s) name no image in {images} (e.g. {', '.join(sorted(records)[:3])})"
              + (f"; {', '.join(other)} files are not read: convert them to PNG" if other else "")
              + "; they are counted as poses_without_image in the card")
    return run_conversion(source, jobs, out, p.name, "folder", extra_card={"poses_without_image": len(records)},
                          **kw)


# ---------------------------------------------------------------------------------------- synthetic
def convert_synthetic(out: str | Path, num: int = 10000, resolution: int = 64, seed: int = 0,
                      supersample: int = 2, overwrite: bool = False, samples_per_shard: int | None = None,
                      batch_size: int = 64) -> Path:
    """Procedural heads with ground-truth depth and mask (datamodules/synthetic.py) -> shards."""
    from .synthetic import SyntheticConfig, iter_synthetic

    preset = f"synthetic{resolution}" if f"synthetic{resolution}" in PRESETS else "synthetic64"
    cfg = SyntheticConfig(resolution=resolution, supersample=supersample, seed=seed, preset=preset)
    per_shard = samples_per_shard or max(16, min(1000, -(-num // 16)))  # >= 16 shards for ranks x workers
    fov = get_preset(preset).fov_deg
    extra = {"generator": {"kind": "procedural-heads", "seed": seed, "supersample": supersample}}
    with ShardSetWriter(out, preset, resolution, "synthetic", per_shard, overwrite, extra=extra) as writer:
        for s in progress(iter_synthetic(num, cfg, batch_size=batch_size), total=num, unit="img",
                      desc="gmpi data synthetic"):
            writer.write(f"{int(s['index']):08d}", s["image"].numpy(), s["w2c"].numpy(), float(s["yaw"]),
                         float(s["pitch"]), fov, f"synthetic:{int(s['index'])}", depth=s["depth"].numpy(),
                         mask=s["mask"].numpy())
    print(f"wrote {writer.count} samples to {out}")
    return Path(out)
