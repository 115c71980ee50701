"""``gmpi data synthetic|ffhq|eg3d|folder``: posed-image shards + dataset.json + preview.png, one typed function per
kind (``gmpi_lightning.cli`` builds the flags from the signatures)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from . import converters as cv
from .posed_images import write_preview


@dataclass(frozen=True)
class ConvertOptions:
    """What every conversion of real images shares.

    Args:
        resolution: expected image size (default: the first image's).
        skip_bad: skip bad inputs, listing them in rejected.jsonl (default: stop at the first, naming it).
        overwrite: replace an existing output folder.
        workers: parallel decode/encode processes (0: inline).
        samples_per_shard: samples per shard file.
    """

    resolution: int | None = None
    skip_bad: bool = False
    overwrite: bool = False
    workers: int = 2
    samples_per_shard: int = 1000


DEFAULTS = ConvertOptions()


def _done(out: Path) -> Path:
    print(f"preview: {write_preview(out)}")
    return out


def ffhq(images: str, poses: str, out: str, fail_list: str | None = None, xflip: bool = False,
         preset: str = "FFHQ256", options: ConvertOptions = DEFAULTS) -> Path:
    """FFHQ/MetFaces: a StyleGAN2 dataset-tool zip or image folder + one Deep3DFaceRecon .mat per image.

    Args:
        images: ffhqRxR.zip (StyleGAN2 dataset_tool) or an image folder.
        poses: folder of Deep3DFaceRecon coefficient .mat files (same relative paths as the images).
        out: output folder (refused if it exists, unless --overwrite).
        fail_list: fail_list.txt: images without a pose estimate (excluded, counted).
        xflip: also write mirrored copies with mirrored poses.
        preset: camera/plane preset of the data.
    """
    return _done(cv.convert_ffhq(images, poses, out, preset=preset, fail_list=fail_list, xflip=xflip,
                                 **asdict(options)))


def eg3d(root: str, out: str, preset: str = "AFHQCat", options: ConvertOptions = DEFAULTS) -> Path:
    """An EG3D-processed folder or zip with its dataset.json labels (AFHQv2-Cat).

    Args:
        root: the folder or zip.
        out: output folder (refused if it exists, unless --overwrite).
        preset: camera/plane preset of the data.
    """
    return _done(cv.convert_eg3d(root, out, preset=preset, **asdict(options)))


def folder(images: str, poses: str, out: str, preset: str = "FFHQ256",
           options: ConvertOptions = DEFAULTS) -> Path:
    """Any image folder + poses.json/csv (yaw/pitch or c2w per file).

    Args:
        images: the image folder.
        poses: poses.json ({"file.png": {"yaw": .., "pitch": ..}} or {"c2w": 4x4}) or poses.csv.
        out: output folder (refused if it exists, unless --overwrite).
        preset: camera/plane preset of the data.
    """
    return _done(cv.convert_folder(images, poses, out, preset=preset, **asdict(options)))


def synthetic(out: str, num: int = 10000, resolution: int = 64, seed: int = 0, supersample: int = 2,
              overwrite: bool = False) -> Path:
    """Procedural heads with ground-truth depth and mask.

    Args:
        out: output folder (refused if it exists, unless --overwrite).
        num: number of heads.
        resolution: image size (32, 64 or 128 have presets; others use synthetic64's geometry).
        seed: seed of the heads (sample i of seed s is the same whatever the batch).
        supersample: RGB rays per pixel side (anti-aliasing).
        overwrite: replace an existing output folder.
    """
    return _done(cv.convert_synthetic(out, num, resolution, seed, supersample, overwrite))
