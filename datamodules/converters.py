"""Converters from the real dataset formats to posed-image shards (``gmpi data ...``).

* FFHQ / MetFaces: StyleGAN2 dataset-tool zip (or a folder) + one Deep3DFaceRecon ``.mat`` per image
  (``angle``, ``trans``) -> w2c as docs/METHOD.md §1.5 (camera distance 10, axis flips, camera put back on
  the sphere). ``--xflip`` adds mirrored copies with mirrored poses (MetFaces).
* EG3D (AFHQv2-Cat): a folder or zip with ``dataset.json`` (``labels``: [file, 25 numbers], the first 16
  a cam2world in EG3D's y-up world, OpenCV camera).
* Any folder: ``poses.json`` / ``poses.csv`` with yaw/pitch (radians, our sphere convention) or a 4x4
  c2w in the GMPI world frame per file.

Every input is checked (decodable, square, expected resolution, pose present, finite and rigid, keys
unique). By default the first bad input stops the conversion with an error naming the file;
``skip_bad`` records it in ``rejected.jsonl`` and counts it in ``dataset.json``. Workers decode and
encode in parallel on bounded blocks, so memory stays constant whatever the dataset size.

Inputs are untrusted (:mod:`datamodules.sources`): bounded zip reads, and a member name with ``..`` or an absolute
path never selects a pose file outside the pose folder.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class Job:
    """One image to convert: worker-side work is read + check + pose + encode."""

    name: str
    key: str
    pose: Callable[[], dict]  # -> {'w2c', 'yaw', 'pitch', 'extra'}; may raise BadSample


def _process(args) -> tuple[str, list[tuple] | None, str | None]:
    source, job, resolution, xflip = args
    try:
        img = decode_image(source.read(job.name), job.name, resolution)
        pose = job.pose()
        out = [(job.key, encode_png(img), pose["w2c"], pose["yaw"], pose["pitch"], pose.get("extra"))]
        if xflip:
            out.append((job.key + "_xflip", encode_png(np.ascontiguousarray(img[:, ::-1])), mirror_w2c(pose["w2c"]),
                        -pose["yaw"], pose["pitch"], dict(pose.get("extra") or {}, xflip=True)))
        return job.name, out, None
    except BadSample as e:
        return job.name, None, str(e)


def run_conversion(source: ImageSource, jobs: list[Job], out: str | Path, preset_name: str, source_tag: str,
                   resolution: int | None = None, xflip: bool = False, skip_bad: bool = False,
                   overwrite: bool = False, workers: int = 2, samples_per_shard: int = 1000,
                   extra_card: dict | None = None) -> Path:
    preset = get_preset(preset_name)
    if not jobs:
        raise BadSample(f"no images found in {source.path}")
    if resolution is None:  # the most common square size decides, then every image must match
        resolution = common_size(source, [job.name for job in jobs])
    seen: dict[str, str] = {}
    with ShardSetWriter(out, preset.name, resolution, source_tag, samples_per_shard, overwrite, skip_bad,
                        extra=extra_card) as writer:
        unique = []
        for job in jobs:  # duplicate keys are an input error (two files would become one sample)
            if job.key in seen:
                writer.reject(job.name, BadSample(f"{job.name}: same sample key '{job.key}' as {seen[job.key]}"))
                continue
            seen[job.key] = job.name
            unique.append(job)
        ctx = get_context("fork") if workers > 0 else None
        pool = ctx.Pool(workers) if ctx else None
        bar = progress(total=len(unique), unit="img", desc=f"gmpi data {source_tag}")
        try:
            block = 64 * max(1, workers)
            for i in range(0, len(unique), block):
                args = [(source, job, resolution, xflip) for job in unique[i:i + block]]
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
class _Deep3DPose:
    def __init__(self, mat: Path, c: float, r: float):
        self.mat, self.c, self.r = mat, c, r

    def __call__(self) -> dict:
        angle, trans = read_deep3dface_mat(self.mat)
        w2c = cameras.w2c_from_deep3dface(angle, trans, self.c, self.r)
        yaw, pitch = cameras.yaw_pitch_from_w2c(w2c, self.c)
        return {"w2c": w2c[0].numpy(), "yaw": float(yaw[0]), "pitch": float(pitch[0]),
                "extra": {"angle": angle.tolist(), "trans": trans.tolist()}}


def _find_mat(poses: Path, name: str) -> Path:
    """The pose file of image ``name`` (a name already checked by :func:`is_inside_name`): same relative path, or
    the same stem at the top of the pose folder."""
    nested = poses / Path(name).with_suffix(".mat")
    return nested if nested.is_file() else poses / (Path(name).stem + ".mat")


class _bad_pose:  # noqa: N801 (a picklable callable that rejects the image with a reason)
    def __init__(self, message: str):
        self.message = message

    def __call__(self):
        raise BadSample(self.message)


def read_fail_list(path: str | Path | None) -> set[str]:
    if path is None:
        return set()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"fail list not found: {p}")
    return {Path(line.strip()).stem for line in p.read_text().splitlines() if line.strip()}


def convert_ffhq(images: str | Path, poses: str | Path, out: str | Path, preset: str = "FFHQ256",
                 fail_list: str | Path | None = None, **kw) -> Path:
    """FFHQ/MetFaces: dataset-tool zip or folder + Deep3DFaceRecon .mat per image (same relative path)."""
    source, poses = ImageSource(images), Path(poses)
    if not poses.is_dir():
        raise FileNotFoundError(f"pose folder not found: {poses} (one Deep3DFaceRecon .mat per image)")
    p = get_preset(preset)
    failed = read_fail_list(fail_list)
    names = source.names()
    kept = [n for n in names if Path(n).stem not in failed]
    jobs = [Job(n, make_key(n), _Deep3DPose(_find_mat(poses, n), p.sphere_center_z, p.sphere_r)
                if is_inside_name(n) else
                _bad_pose(f"{n}: member name leaves the archive root ('..' or an absolute path); its pose is not "
                          f"looked up")) for n in kept]
    extra = {"excluded_by_fail_list": len(names) - len(kept), "fail_list": str(fail_list) if fail_list else None}
    return run_conversion(source, jobs, out, p.name, "deep3dface", extra_card=extra, **kw)


class _EG3DPose:
    def __init__(self, label, c: float, r: float, name: str):
        self.label, self.c, self.r, self.name = label, c, r, name

    def __call__(self) -> dict:
        lab = np.asarray(self.label, dtype=np.float64).reshape(-1)
        if lab.size not in (16, 25):
            raise BadSample(f"{self.name}: EG3D label has {lab.size} numbers, expected 25 (16 cam2world + 9)")
        if not np.isfinite(lab).all():
            raise BadSample(f"{self.name}: EG3D label contains NaN or Inf")
        w2c = cameras.w2c_from_eg3d_label(lab[None], self.c, self.r)
        yaw, pitch = cameras.yaw_pitch_from_w2c(w2c, self.c)
        return {"w2c": w2c[0].numpy(), "yaw": float(yaw[0]), "pitch": float(pitch[0])}


def convert_eg3d(root: str | Path, out: str | Path, preset: str = "AFHQCat", **kw) -> Path:
    """EG3D-processed folder/zip with dataset.json labels (AFHQv2-Cat)."""
    source = ImageSource(root)
    try:
        labels = json.loads(source.read_text("dataset.json"))["labels"]
    except (KeyError, FileNotFoundError, json.JSONDecodeError) as e:
        raise BadSample(f"{root}: needs a dataset.json with 'labels': [[file, [25 numbers]], ...] ({e})") from None
    p = get_preset(preset)
    by_name = {str(name): lab for name, lab in labels}
    jobs = []
    for n in source.names():
        lab = by_name.pop(n, None)
        pose = _EG3DPose(lab, p.sphere_center_z, p.sphere_r, n) if lab is not None else _missing_pose(n)
        jobs.append(Job(n, make_key(n), pose))
    return run_conversion(source, jobs, out, p.name, "eg3d", extra_card={"labels_without_image": len(by_name)},
                          **kw)


class _missing_pose:  # noqa: N801 (a picklable callable that reports the missing pose)
    def __init__(self, name: str):
        self.name = name

    def __call__(self):
        raise BadSample(f"{self.name}: no pose for this image")


class _FolderPose:
    def __init__(self, record: dict, c: float, r: float, name: str):
        self.record, self.c, self.r, self.name = record, c, r, name

    def __call__(self) -> dict:
        rec = self.record
        try:
            if "c2w" in rec:
                c2w = np.asarray(rec["c2w"], dtype=np.float64).reshape(4, 4)
                if not np.isfinite(c2w).all():
                    raise BadSample(f"{self.name}: c2w contains NaN or Inf")
                w2c = cameras.invert_rigid(torch.from_numpy(c2w))
                yaw, pitch = cameras.yaw_pitch_from_w2c(w2c, self.c)
                return {"w2c": w2c[0].float().numpy(), "yaw": float(yaw[0]), "pitch": float(pitch[0])}
            yaw, pitch = float(rec["yaw"]), float(rec["pitch"])
        except (KeyError, ValueError, TypeError) as e:
            raise BadSample(f"{self.name}: malformed pose record {rec} ({e}); need yaw+pitch or c2w") from None
        if not (np.isfinite(yaw) and np.isfinite(pitch)):
            raise BadSample(f"{self.name}: yaw/pitch not finite ({yaw}, {pitch})")
        if abs(yaw) > math.pi or abs(pitch) > math.pi / 2:
            raise BadSample(f"{self.name}: yaw {yaw}, pitch {pitch} are not radians (|yaw| <= pi, |pitch| <= pi/2); "
                            f"degrees? write math.radians of them")
        w2c = cameras.invert_rigid(cameras.sphere_c2w(yaw, pitch, self.c, self.r, dtype=torch.float64))
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
    source, records = ImageSource(images), read_folder_poses(poses)
    p = get_preset(preset)
    jobs = []
    for n in source.names():
        rec = records.pop(n, None)
        if rec is None:
            rec = records.pop(Path(n).name, None)
        pose = _FolderPose(rec, p.sphere_center_z, p.sphere_r, n) if rec is not None else _missing_pose(n)
        jobs.append(Job(n, make_key(n), pose))
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
