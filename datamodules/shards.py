"""The shard schema and the writer every converter uses (docs/DATA.md).

One sample: ``<key>.png`` (uint8 RGB, square), ``<key>.pose.json`` (yaw, pitch in radians, fov_deg, source),
``<key>.w2c.npy`` (float32 4 x 4, GMPI world frame, OpenCV camera), and where ground truth exists ``<key>.depth.npy``
(float32 z-depth) and ``<key>.mask.png``. Keys contain no dots (WebDataset groups files at the first dot). The
``dataset.json`` card beside the shards records preset, resolution, count, shards with sizes and sha256, pose
statistics, rejected inputs and the command that wrote it.

The writer streams into ``<out>.partial`` and renames it at the end (a stopped one removes it), and replaces
(``overwrite``) only an empty folder or one holding a card it wrote (``"format": CARD_FORMAT``): ``make data
DATA=~/photos`` cannot delete photos.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from gmpi_lightning.data import CARD, CARD_FORMAT, PARTIAL_MARKER, file_sha256, is_shard_output, read_picture
from gmpi_lightning.data import read_card as read_card  # re-exported: the reading side of the schema lives there
from gmpi_lightning.errors import InputError

REJECTED = "rejected.jsonl"
SHARD_PATTERN = "shard-%06d.tar"
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-/]+$")


class BadSample(InputError):
    """An input that cannot become a sample; the message names the file and the problem."""


def make_key(name: str) -> str:
    """A dot-free, slash-free sample key from a relative file name ('00000/img00000001.png' -> '00000_img00000001')."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", re.sub(r"\.[^./]+$", "", name))  # the extension dropped first


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="png", compress_level=3)
    return buf.getvalue()


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def decode_image(data: bytes, name: str, resolution: int | None = None) -> np.ndarray:
    """Bytes -> H x W x 3 uint8, checking decodability, squareness and resolution."""
    try:
        img, transparent, _ = read_picture(data, name)
    except InputError as e:
        raise BadSample(str(e)) from None
    if transparent:
        raise BadSample(f"{name}: has transparent pixels, whose colour is undefined; flatten it onto a background "
                        f"first")
    h, w = img.shape[:2]
    if h != w:
        raise BadSample(f"{name}: image is {w}x{h}, GMPI needs square images (crop/align them first)")
    if resolution is not None and h != resolution:
        raise BadSample(f"{name}: image is {h}px, expected {resolution}px (pass --resolution {h} or resize)")
    return img


def check_pose(w2c: np.ndarray, name: str) -> np.ndarray:
    w2c = np.asarray(w2c, dtype=np.float32)
    if w2c.shape != (4, 4):
        raise BadSample(f"{name}: pose must be a 4x4 matrix, got shape {w2c.shape}")
    if not np.isfinite(w2c).all():
        raise BadSample(f"{name}: pose contains NaN or Inf")
    rot = w2c[:3, :3].astype(np.float64)
    if np.abs(rot @ rot.T - np.eye(3)).max() > 1e-3 or np.abs(w2c[3] - [0, 0, 0, 1]).max() > 1e-6:
        raise BadSample(f"{name}: pose is not a rigid world-to-camera transform")
    return w2c


class ShardSetWriter:
    """Writes samples into tar shards + dataset.json; use as a context manager. ``skip_bad``: record rejected inputs
    in rejected.jsonl instead of stopping at the first one."""

    def __init__(self, out_dir: str | Path, preset: str, resolution: int, source: str, samples_per_shard: int = 1000,
                 overwrite: bool = False, skip_bad: bool = False, extra: dict | None = None):
        self.out, self.overwrite, self.skip_bad = Path(out_dir), overwrite, skip_bad
        check_replaceable(self.out, overwrite)
        self.tmp = self.out.with_name(self.out.name + ".partial")
        if self.tmp.exists():
            if not (self.tmp / PARTIAL_MARKER).is_file():
                raise FileExistsError(f"{self.tmp} exists and was not left by an interrupted `gmpi data` run (no "
                                      f"{PARTIAL_MARKER} in it); move it away, nothing was changed")
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        (self.tmp / PARTIAL_MARKER).touch()
        self.preset, self.resolution, self.source, self.extra = preset, resolution, source, extra or {}
        self._keys: set[str] = set()
        self._rejected = open(self.tmp / REJECTED, "w")
        self.n_rejected = self.count = 0  # count: samples written
        self._sums = {"yaw": [0.0, 0.0], "pitch": [0.0, 0.0]}  # sum and sum of squares: the card's pose_stats
        self._sink = wds.ShardWriter(str(self.tmp / SHARD_PATTERN), maxcount=samples_per_shard, verbose=0)
        self._t0 = time.time()

    def __enter__(self):
        return self

    def reject(self, name: str, error: Exception | str) -> None:
        """Handle a bad input: stop (default) or log it to rejected.jsonl (--skip-bad)."""
        if not self.skip_bad:
            self.close(success=False)
            raise error if isinstance(error, Exception) else BadSample(error)
        self.n_rejected += 1
        self._rejected.write(json.dumps({"file": name, "error": str(error)}) + "\n")

    def write(self, key: str, image: np.ndarray | bytes, w2c: np.ndarray, yaw: float, pitch: float, fov_deg: float,
              source_file: str, depth: np.ndarray | None = None, mask: np.ndarray | None = None,
              extra_pose: dict | None = None) -> None:
        """Add one sample; ``image`` is uint8 R x R x 3 or PNG bytes already checked by the caller."""
        if not _KEY_OK.match(key) or "." in key:
            raise BadSample(f"{source_file}: sample key {key!r} must be dot-free letters, digits, _ or -")
        if key in self._keys:
            return self.reject(source_file, BadSample(f"{source_file}: duplicate sample key {key!r}"))
        if not isinstance(image, bytes) and (image.shape != (self.resolution, self.resolution, 3)
                                             or image.dtype != np.uint8):
            return self.reject(source_file, BadSample(f"{source_file}: image must be uint8 {self.resolution}x"
                                                      f"{self.resolution}x3, got {image.dtype} {image.shape}"))
        try:
            w2c = check_pose(w2c, source_file)
            if not (math.isfinite(yaw) and math.isfinite(pitch)):
                raise BadSample(f"{source_file}: yaw/pitch not finite")
        except BadSample as e:
            return self.reject(source_file, e)
        self._keys.add(key)
        pose = {"yaw": float(yaw), "pitch": float(pitch), "fov_deg": float(fov_deg), "source": self.source,
                "file": source_file, **(extra_pose or {})}
        png = image if isinstance(image, bytes) else encode_png(image)
        sample = {"__key__": key, "png": png, "pose.json": json.dumps(pose).encode(), "w2c.npy": encode_npy(w2c)}
        if depth is not None:
            sample["depth.npy"] = encode_npy(depth.astype(np.float32))
        if mask is not None:
            sample["mask.png"] = encode_png(mask.astype(np.uint8) * 255)
        self._sink.write(sample)
        self.count += 1
        for k, v in (("yaw", yaw), ("pitch", pitch)):
            self._sums[k][0] += v
            self._sums[k][1] += v * v

    def close(self, success: bool = True) -> Path | None:
        if self._sink is None:
            return None
        self._sink.close()
        self._sink = None
        self._rejected.close()
        if not success:  # stopped by a bad input, an error or Ctrl-C: nothing half-written stays behind
            shutil.rmtree(self.tmp, ignore_errors=True)
            return None
        if self.count == 0:
            raise BadSample(f"no valid sample was written ({self.n_rejected} rejected; see {self.tmp / REJECTED})")
        shards = [{"name": p.name, "bytes": p.stat().st_size, "sha256": file_sha256(p)}
                  for p in sorted(self.tmp.glob("shard-*.tar"))]
        stats = {}
        for k, (s, ss) in self._sums.items():
            mean = s / self.count
            stats[k] = {"mean": mean, "std": math.sqrt(max(ss / self.count - mean * mean, 0.0))}
        card = {"format": CARD_FORMAT, "preset": self.preset, "resolution": self.resolution, "source": self.source,
                "count": self.count, "rejected": self.n_rejected, "shards": shards, "pose_stats": stats,
                "schema": ["png", "pose.json", "w2c.npy", "depth.npy?", "mask.png?"],
                "conventions": "world +X right, +Y down, +Z forward; OpenCV cameras; w2c maps world to camera",
                "command": " ".join(sys.argv), "seconds": round(time.time() - self._t0, 2), **self.extra}
        (self.tmp / CARD).write_text(json.dumps(card, indent=1))
        (self.tmp / PARTIAL_MARKER).unlink()
        if self.out.exists():
            check_replaceable(self.out, self.overwrite)  # again: the folder may have changed during the run
            shutil.rmtree(self.out)
        self.tmp.rename(self.out)
        return self.out

    def __exit__(self, exc_type, exc, tb):
        self.close(success=exc_type is None)
        return False


def check_replaceable(out: Path, overwrite: bool) -> None:
    """An output folder may be written if it is absent or empty, and replaced (``overwrite``) only if it holds a
    dataset this writer made. Anything else is refused before any file is touched."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another output path")
    if not any(out.iterdir()):
        return
    if not is_shard_output(out):
        raise FileExistsError(f"{out} exists and is not a dataset written by `gmpi data` (no {CARD} with "
                              f"\"format\": \"{CARD_FORMAT}\"); refusing to replace it, even with --overwrite. "
                              f"Choose another output folder; nothing was changed")
    if not overwrite:
        raise FileExistsError(f"{out} already holds a dataset; pass --overwrite to replace it")
