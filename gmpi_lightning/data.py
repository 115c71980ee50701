"""Reading posed-image shards (schema: ``datamodules/shards.py``): the dataset card, the shard list, one decoded
sample, a batch, and the one finite pass over a shard set that evaluation, the estimators and the datamodule's
validation share. Writing shards (and the training stream) is ``datamodules/``, which builds on this module.

A batch is a dict: ``image`` float32 B x 3 x R x R in [-1, 1], ``w2c`` B x 16 (flattened row-major, the
discriminator's pose condition), ``yaw``/``pitch`` B, ``key`` (list), plus ``depth`` B x 1 x R x R and ``mask``
B x 1 x R x R when the shards carry ground truth.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps

from .errors import InputError

CARD = "dataset.json"
CARD_FORMAT = "gmpi-lightning/shards"  # in every card `gmpi data` writes: the folder is ours to replace
PARTIAL_MARKER = ".gmpi-partial"  # inside <out>.partial while the writer fills it: the writer may remove it


_SHARD_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_\-./]*$")  # no ':', braces, spaces or backslashes


def read_card(folder: str | Path) -> dict:
    """The dataset card of a ``gmpi data`` folder. Its shard names must stay inside the folder (a card is input:
    ``../x.tar`` or ``/etc/x.tar`` is refused, as are WebDataset's ``pipe:`` and brace patterns)."""
    path = Path(folder) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point at a folder written by `gmpi data ...`")
    try:
        card = json.loads(path.read_text())
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(card, dict) or not isinstance(card.get("shards", []), list):
        raise InputError(f"{path}: expected a JSON object whose field 'shards' is a list")
    for i, entry in enumerate(card.get("shards", [])):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _SHARD_NAME.match(name) or ".." in name.split("/"):
            raise InputError(f"{path}: field 'shards[{i}].name' = {name!r} must be a relative file name inside the "
                             f"dataset folder (letters, digits, '_', '-', '.', '/'; no '..', no absolute path)")
    return card


def resolve_shards(data: str | Path | Sequence[str]) -> tuple[list[str], dict | None]:
    """(shard URLs, card or None) of a folder written by ``gmpi data`` (its dataset.json lists the shards), a brace
    pattern, or a list."""
    if isinstance(data, (list, tuple)):
        return [str(u) for u in data], None
    path = Path(str(data))
    if path.is_dir():
        card = read_card(path)
        return [str(path / s["name"]) for s in card["shards"]], card
    urls = list(wds.shardlists.expand_urls(str(data)))
    missing = [u for u in urls if "://" not in u and not Path(u).exists()]
    if missing:
        raise FileNotFoundError(f"shards not found: {missing[:3]}; run `gmpi data ...` first (e.g. `make data`)")
    return urls, None


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")  # the image files gmpi poses and gmpi data read from a folder


def image_files(folder: Path, note=None) -> list[str]:
    """The image files under ``folder`` (recursively) as sorted POSIX paths relative to it (what poses files are keyed
    by). Symlinked folders are followed, each real folder once, under its real path where that is inside ``folder``
    (real folders first, then links: the same names on every machine). A ``gmpi data`` output below (card or
    ``.partial``) is passed over with a ``note``; ``folder`` being one is an error. Broken links stay listed."""
    if is_shard_output(folder):
        raise InputError(f"{folder} is a dataset written by `gmpi data` (shards, card, preview), not a folder of "
                         f"images; pass the folder of the images it was made from")
    names, seen, links = [], set(), [folder]
    while links:
        for root, dirs, files in os.walk(links.pop(0)):  # does not enter links: they are queued below
            here, real = Path(root), os.path.realpath(root)
            dirs.sort()
            if real in seen:  # a second way into a folder already read
                dirs[:] = []
                continue
            seen.add(real)
            if here != folder and (is_shard_output(here) or (here / PARTIAL_MARKER).is_file()):
                if note:
                    note(f"{here}: a `gmpi data` output, not input: its images are not read")
                dirs[:] = []
                continue
            links += [here / d for d in dirs if (here / d).is_symlink()]
            names += [(here / f).relative_to(folder).as_posix() for f in files if Path(f).suffix.lower() in IMAGE_EXTS]
    return sorted(names)


def is_shard_output(folder: Path) -> bool:
    """Whether ``folder`` holds a dataset written by ``gmpi data`` (its card says so)."""
    try:
        return json.loads((folder / CARD).read_text()).get("format") == CARD_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def rgb8(im: Image.Image) -> tuple[np.ndarray, bool]:
    """A decoded picture as H x W x 3 uint8 whatever its mode (16-bit grey scaled, not clipped to white as Pillow's
    ``convert("RGB")`` does; CMYK and palette as their colours; EXIF orientation applied), and whether it has
    transparent pixels (the alpha is dropped)."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I"):  # 16-bit grey PNG (I;16, or I holding 0..65535): scale, do not clip
        grey = np.clip(np.asarray(im, dtype=np.float64) / 257.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1), False
    has_alpha = "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info)
    transparent = has_alpha and int(np.asarray(im.convert("RGBA").getchannel("A")).min()) < 255
    return np.asarray(im.convert("RGB")), transparent


def read_picture(source: str | Path | bytes, name: str | Path) -> tuple[np.ndarray, bool, bool]:
    """One picture from a file or its bytes, decoded whole (a truncated file fails here, not later): H x W x 3 uint8
    (:func:`rgb8`), whether it had transparent pixels, and whether it was grey. A file that is not one decodable
    picture (unreadable, or an animation) is an :class:`InputError` naming ``name``."""
    if not isinstance(source, bytes) and not os.path.isfile(source):
        broken = "a broken link" if os.path.islink(source) else "not a file"
        raise InputError(f"{name}: cannot be read ({broken}); point it at the image, or remove it")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.load()
            frames = getattr(im, "n_frames", 1)
            grey = len(set(im.getbands()) - {"A"}) == 1 and im.mode not in ("P", "PA")
            rgb, transparent = rgb8(im)
    except Exception as e:  # Pillow raises many types for files it cannot decode
        raise InputError(f"{name}: cannot read it as an image ({type(e).__name__}); pass a PNG or JPEG file") from None
    if frames > 1:
        raise InputError(f"{name}: {frames} frames (an animation?), not one picture; pass the frame you mean as a "
                         f"PNG or JPEG")
    return rgb, transparent, grey


def decode_sample(sample: dict) -> dict:
    """Raw tar members -> arrays (``image`` H x W x 3 uint8, ``w2c`` 4 x 4, ``yaw``, ``pitch``, ``key``, and
    ``depth``/``mask`` where present). Errors name the shard and key."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    try:
        img = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        pose = json.loads(sample["pose.json"])
        w2c = np.load(io.BytesIO(sample["w2c.npy"]), allow_pickle=False).astype(np.float32)
    except KeyError as e:
        raise InputError(f"{where}: sample lacks the field {e}; shards must hold png, pose.json and w2c.npy") from None
    out = {"key": sample["__key__"], "image": img, "w2c": w2c, "yaw": float(pose["yaw"]),
           "pitch": float(pose["pitch"])}
    if "depth.npy" in sample:
        out["depth"] = np.load(io.BytesIO(sample["depth.npy"]), allow_pickle=False).astype(np.float32)
    if "mask.png" in sample:
        out["mask"] = np.asarray(Image.open(io.BytesIO(sample["mask.png"])).convert("L")) > 127
    if not np.isfinite(out["w2c"]).all():
        raise InputError(f"{where}: pose contains NaN/Inf")
    return out


def collate(samples: list[dict]) -> dict:
    batch = {
        "key": [s["key"] for s in samples],
        "image": torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1,
        "w2c": torch.from_numpy(np.stack([s["w2c"].reshape(16) for s in samples])),
        "yaw": torch.tensor([s["yaw"] for s in samples], dtype=torch.float32),
        "pitch": torch.tensor([s["pitch"] for s in samples], dtype=torch.float32),
    }
    for k in ("depth", "mask"):
        if all(k in s for s in samples):
            batch[k] = torch.from_numpy(np.stack([s[k] for s in samples]).astype(np.float32))[:, None]
    return batch


def read_samples(urls: Sequence[str], batch_size: int | None = None, split: bool = False) -> wds.DataPipeline:
    """One finite pass over the shards, in shard order: decoded samples, or batches of ``batch_size`` (the last
    one partial). ``split``: every sample exactly once across ranks (shards split by node) and loader workers
    (split by worker); otherwise every process reads everything."""
    stages = [wds.SimpleShardList(list(urls))]
    if split:
        stages += [wds.split_by_node, wds.split_by_worker]
    stages += [wds.tarfile_to_samples(), wds.map(decode_sample)]
    if batch_size:
        stages.append(wds.batched(batch_size, collation_fn=collate, partial=True))
    return wds.DataPipeline(*stages)


def eval_loader(urls: Sequence[str], batch_size: int, num_workers: int = 0) -> wds.WebLoader:
    """Batches of every sample exactly once across ranks and ``num_workers`` loader workers."""
    return wds.WebLoader(read_samples(urls, batch_size, split=True), batch_size=None, num_workers=num_workers)


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 (hex), cached while its size and modification time stay the same."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime)


def write_atomic(path: str | Path, write) -> Path:
    """Write ``path`` whole or not at all: ``write(tmp)`` fills ``<name>.<pid>.partial`` beside it (the folder is made
    if missing), which then replaces ``path``; the temporary file is removed if ``write`` raises (Ctrl-C too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
