"""Where the converters read images from: a folder or a zip, as untrusted input. A zip member is read only if its
declared size is at most :data:`MAX_MEMBER_BYTES`, and through a bounded read (a header that lies cannot make us
inflate more); a member name with ``..`` or an absolute path never selects a file outside its root.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath

from PIL import Image

from gmpi_lightning.data import IMAGE_EXTS, image_files
from gmpi_lightning.errors import warner

from .shards import BadSample, decode_image

MAX_MEMBER_BYTES = 128 << 20  # one zip member (an image, dataset.json): a 4096 px PNG is well under it


def read_zip_member(z: zipfile.ZipFile, name: str, cap: int = MAX_MEMBER_BYTES) -> bytes:
    """A member's bytes, refusing one that declares (or inflates to) more than ``cap`` bytes: a zip bomb is
    refused before it is decompressed, and a header that under-declares is caught by the bounded read."""
    where = f"{z.filename}:{name}"
    try:
        info = z.getinfo(name)
    except KeyError:
        raise FileNotFoundError(f"{where}: no such member in the zip") from None
    if info.file_size > cap:
        raise BadSample(f"{where}: declares {info.file_size} bytes uncompressed, over the {cap}-byte cap per member "
                        f"(a zip bomb?); not decompressed")
    try:
        with z.open(info) as f:
            data = f.read(cap + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise BadSample(f"{where}: corrupt zip member ({type(e).__name__}: {e})") from None
    if len(data) > cap:
        raise BadSample(f"{where}: inflates past the {cap}-byte cap per member (its header says "
                        f"{info.file_size}); refused")
    return data


def is_inside_name(name: str) -> bool:
    """A relative member name that stays inside its root: no absolute path, drive, backslash or '..' part."""
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and "\\" not in name and ":" not in name and ".." not in p.parts


class ImageSource:
    """Image files of a folder or a zip, by relative name, in sorted order. Picklable (workers reopen)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"images not found: {self.path}")
        self._zip = None

    def names(self) -> list[str]:
        if self.path.is_dir():
            return image_files(self.path, note=warner("gmpi data"))
        with zipfile.ZipFile(self.path) as z:
            return sorted(n for n in z.namelist() if Path(n).suffix.lower() in IMAGE_EXTS)

    def read(self, name: str) -> bytes:
        if self.path.is_dir():
            path = self.path / name
            try:
                return path.read_bytes()
            except OSError as e:  # a broken link, a file removed since it was listed, no permission
                link = "; a broken link" if path.is_symlink() else ""
                raise BadSample(f"{name}: cannot be read ({e.strerror}{link})") from None
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return read_zip_member(self._zip, name)

    def read_text(self, name: str) -> str:
        if self.path.is_dir():
            return (self.path / name).read_text()
        with zipfile.ZipFile(self.path) as z:
            return read_zip_member(z, name).decode()

    def __getstate__(self):
        return {"path": self.path, "_zip": None}


def common_size(source: ImageSource, names: list[str], sample: int = 256) -> int:
    """The side most of ``sample`` square images spread over ``names`` have (their headers only), so that one odd
    file, first or not, cannot set the dataset's resolution; with none readable, the first file's error."""
    sides = {}
    for name in names[:: max(1, len(names) // sample)][:sample]:
        try:
            with Image.open(io.BytesIO(source.read(name))) as im:
                w, h = im.size
        except Exception:  # any undecodable file: decode_image names it when its turn comes
            continue
        if w == h:
            sides[w] = sides.get(w, 0) + 1
    if not sides:
        return decode_image(source.read(names[0]), names[0]).shape[0]
    return max(sides, key=lambda side: (sides[side], side))
