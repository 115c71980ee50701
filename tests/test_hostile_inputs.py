"""Hostile or broken inputs fail fast, with a clear message, in bounded memory, and change nothing on disk outside
the output folder: NVlabs pickles and our checkpoints, dataset cards, FFHQ zips, and the output folder itself."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
import torch
from scipy.io import savemat

from datamodules import converters as cv
from datamodules import sources
from datamodules.shards import CARD_FORMAT, BadSample, ShardSetWriter, read_card
from gmpi_lightning.cli import main as gmpi_main
from gmpi_lightning.io import NetworkFormatError, UnsafePickleError, load_stylegan2_pkl, safe_pickle
from gmpi_lightning.io import stylegan2_pkl as sg2
from gmpi_lightning.io.gmpi_ckpt import GMPI_FORMAT
from gmpi_lightning.nn import Generator
from tests.conftest import REPO
from tests.nvlabs_pickle import _install_fake_modules, dumps_nvlabs

TINY = dict(z_dim=8, c_dim=0, w_dim=8, img_resolution=8, img_channels=3, mapping_kwargs=dict(num_layers=1),
            synthesis_kwargs=dict(channel_base=64, channel_max=8))
# What a hostile file may ask for. The other two are inside every bound, but the
# networks they describe (5.2e8 and 1.1e8 parameters: 2.1 GB and 0.45 GB, measured below) are not the ones whose
# tensors the file holds: other tensor names, or the same names with other shapes.
HUGE = dict(TINY, img_resolution=2**20, synthesis_kwargs=dict(channel_base=2**30, channel_max=2**30))
BIG_IN_BOUNDS = dict(TINY, z_dim=512, w_dim=512, img_resolution=4096,
                     synthesis_kwargs=dict(channel_base=2**18, channel_max=2048))
WIDE_IN_BOUNDS = dict(TINY, synthesis_kwargs=dict(channel_base=2**18, channel_max=2048))


def _storage_bomb_blob(numel: int) -> bytes:
    """A legacy torch.save storage blob (what NVlabs pickles embed) of 2 floats that declares ``numel``."""
    with warnings.catch_warnings():  # TypedStorage is deprecated, and it is what the NVlabs format holds
        warnings.simplefilter("ignore")
        _, (raw,) = torch.tensor([1.0, 2.0]).storage().__reduce__()
    old = b"cpuq\x03K\x02N"  # location 'cpu', then BININT1 2 (the element count)
    assert raw.count(old) == 1
    return raw.replace(old, b"cpuq\x03J" + numel.to_bytes(4, "little") + b"N")


class _StorageFromBytes:
    def __init__(self, blob: bytes):
        self.blob = blob

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.blob,)


def _write_hostile_files(folder) -> dict[str, str]:
    files = {}
    tiny = Generator(**TINY).eval()
    for name, kwargs in (("huge_kwargs", HUGE), ("big_in_bounds", BIG_IN_BOUNDS), ("wide_in_bounds", WIDE_IN_BOUNDS)):
        path = folder / f"{name}.pkl"
        path.write_bytes(dumps_nvlabs({"G_ema": tiny}, {"G_ema": kwargs}))
        files[name] = str(path)
    path = folder / "storage_bomb.pkl"  # 2**30 float32 = 4 GiB declared by a 262-byte blob
    path.write_bytes(pickle.dumps({"G": _StorageFromBytes(_storage_bomb_blob(2**30))}, protocol=4))
    files["storage_bomb"] = str(path)
    path = folder / "converted_huge.pt"  # our own converted format, same request
    torch.save({"format": sg2.FORMAT, "version": sg2.FORMAT_VERSION, "training_set_kwargs": None,
                "networks": {"G": {"class_name": "Generator", "init_kwargs": HUGE, "state_dict": tiny.state_dict()}}},
               path)
    files["converted_huge"] = str(path)
    path = folder / "gmpi_big.pt"  # a GMPI checkpoint whose kwargs describe a 4096 px generator
    torch.save({"format": GMPI_FORMAT, "version": 1, "generator": {"init_kwargs": BIG_IN_BOUNDS,
                                                                  "state_dict": tiny.state_dict()}}, path)
    files["gmpi_big"] = str(path)
    return files


_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    # Safety net only (a regression must not take the machine down); the assertions are on the numbers printed.
    resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))

    def peak_rss_mb():
        # VmHWM: this process's own high-water mark. ru_maxrss would also carry the parent's (pytest's) RSS, which
        # Linux keeps across fork + exec.
        try:
            line = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
            return int(line.split()[1]) / 1024
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    from gmpi_lightning.io import load_gmpi_checkpoint, load_stylegan2_pkl
    files = json.loads(sys.argv[1])
    out = {"rss_after_import_mb": peak_rss_mb(), "files": {}}
    for name, path in files.items():
        load = load_gmpi_checkpoint if name.startswith("gmpi") else load_stylegan2_pkl
        t0 = time.perf_counter()
        try:
            load(path)
            error = None
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        out["files"][name] = {"seconds": time.perf_counter() - t0, "error": error}
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))
""")


def test_hostile_network_files_are_refused_fast_in_bounded_memory(tmp_path):
    files = _write_hostile_files(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(files)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # Measured on a 2-core CPU: every file refused in < 1 s (the first use of torch's meta device costs ~0.8 s and
    # ~160 MB once, the later ones ~0.02 s); peak RSS ~670 MB, of which ~510 MB is importing torch.
    print(json.dumps(report, indent=1))
    for name, r in report["files"].items():
        assert r["error"] and r["error"].startswith("NetworkFormatError"), (name, r)
        assert files[name] in r["error"], (name, r)  # the message names the file
        assert r["seconds"] < 5, (name, r)
    assert "img_resolution=1048576 is outside" in report["files"]["huge_kwargs"]["error"]
    assert "nothing was allocated" in report["files"]["huge_kwargs"]["error"]
    assert "tensors do not match a Generator built from its kwargs" in report["files"]["big_in_bounds"]["error"]
    assert "tensor synthesis.b4.const has shape (8, 4, 4), expected (2048, 4, 4)" in \
        report["files"]["wide_in_bounds"]["error"]
    assert "declares 4294967296 bytes" in report["files"]["storage_bomb"]["error"]
    assert report["peak_rss_mb"] < 1024
    assert report["peak_rss_mb"] - report["rss_after_import_mb"] < 300  # what the refusals themselves added


@pytest.mark.parametrize("kwargs,params", [(BIG_IN_BOUNDS, 5.2e8), (WIDE_IN_BOUNDS, 1.13e8)])
def test_in_bounds_but_mismatched_networks_would_have_been_large(kwargs, params):
    """The shape check is what stops those files: built, their networks would hold this many float32."""
    probe = sg2.probe_network(Generator, kwargs, "x")
    n = sum(t.numel() for t in probe.state_dict().values())
    assert n == pytest.approx(params, rel=0.01) and all(t.is_meta for t in probe.state_dict().values())


@pytest.mark.parametrize("bad", [
    {"img_resolution": 48}, {"img_resolution": 8192}, {"z_dim": 10**6}, {"w_dim": 0}, {"z_dim": 8.0},
    {"img_channels": True}, {"mapping_kwargs": {"num_layers": 10**6}}, {"synthesis_kwargs": {"num_fp16_res": -1}},
    {"synthesis_kwargs": {"channel_max": 4096}}, {"synthesis_kwargs": {"channel_base": 2**20}},
])
def test_kwargs_out_of_bounds_are_named(bad):
    kwargs = {k: (dict(TINY[k], **v) if isinstance(v, dict) else v) for k, v in bad.items()}
    with pytest.raises(NetworkFormatError, match="outside the supported range|not a power of two"):
        sg2.check_network_kwargs(dict(TINY, **kwargs), "f.pkl")
    sg2.check_network_kwargs(TINY, "f.pkl")  # the sane ones pass


def _dumps_record(meta: dict) -> bytes:
    """A pickle that calls NVlabs' _reconstruct_persistent_obj(meta) with whatever meta we choose."""
    mods = _install_fake_modules()
    saved = {name: sys.modules.get(name) for name in mods}
    sys.modules.update(mods)

    class Record:
        def __reduce__(self):
            return mods["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)

    try:
        return pickle.dumps({"G": Record()}, protocol=4)
    finally:
        for name, mod in saved.items():
            sys.modules.pop(name) if mod is None else sys.modules.__setitem__(name, mod)


@pytest.mark.parametrize("state", [[1, 2], "x", None])
def test_record_state_that_is_not_a_dict_is_a_clear_error(tmp_path, state):
    path = tmp_path / "bad_state.pkl"
    path.write_bytes(_dumps_record({"type": "class", "version": 6, "module_src": "", "class_name": "Generator",
                                    "state": state}))
    with pytest.raises(ValueError, match=r"bad_state\.pkl: the record of 'Generator' has a \w+ state; expected"):
        load_stylegan2_pkl(path)


def test_numpy_object_arrays_are_refused_numeric_ones_kept(tmp_path):
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps({"G": np.array([1, "a"], dtype=object)}, protocol=4))
    with pytest.raises(UnsafePickleError, match="object arrays"):
        load_stylegan2_pkl(path)
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    back = safe_pickle.RestrictedUnpickler(io.BytesIO(pickle.dumps(arr, protocol=4)), "x").load()
    assert np.array_equal(np.asarray(back), arr) and back.dtype == np.float32
    with pytest.raises(UnsafePickleError):  # numpy pickles always start from shape (0,): no pre-sized arrays
        safe_pickle._numpy_reconstruct(np.ndarray, (10**12,), b"b")


# ------------------------------------------------------------------------------------------- dataset cards
@pytest.mark.parametrize("name", ["../x.tar", "/etc/passwd", "sub/../../x.tar", "pipe:rm -rf x", "{a,b}.tar", 7])
def test_card_shard_names_must_stay_inside_the_folder(tmp_path, name):
    (tmp_path / "dataset.json").write_text(json.dumps({"shards": [{"name": "shard-000000.tar"}, {"name": name}]}))
    with pytest.raises(ValueError, match=r"dataset\.json: field 'shards\[1\]\.name'"):
        read_card(tmp_path)


def test_card_plain_names_are_kept(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"shards": [{"name": "shard-000000.tar"},
                                                                  {"name": "part1/shard-000001.tar"}]}))
    assert [s["name"] for s in read_card(tmp_path)["shards"]] == ["shard-000000.tar", "part1/shard-000001.tar"]


# ----------------------------------------------------------------------------------------------- FFHQ zips
def _png16(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "png")
    return buf.getvalue()


def _mat(path, angle=(0.0, 0.1, 0.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"angle": np.asarray(angle, np.float32)[None], "trans": np.zeros((1, 3), np.float32)})


def test_zip_names_with_dotdot_never_read_poses_outside(tmp_path, monkeypatch):
    poses = tmp_path / "coeffs"
    _mat(poses / "00000" / "img00000000.mat")
    _mat(tmp_path / "secret" / "img.mat")  # where "../secret/img.png" would have led
    zpath = tmp_path / "ffhq.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("00000/img00000000.png", _png16(0))
        z.writestr("../secret/img.png", _png16(1))
    read = []
    real = cv.read_deep3dface_mat
    monkeypatch.setattr(cv, "read_deep3dface_mat", lambda p: read.append(p.resolve()) or real(p))
    with pytest.raises(BadSample, match=r"\.\./secret/img\.png: member name leaves the archive root"):
        cv.convert_ffhq(zpath, poses, tmp_path / "stop", workers=0)
    out = cv.convert_ffhq(zpath, poses, tmp_path / "skip", workers=0, skip_bad=True)
    card = read_card(out)
    assert card["count"] == 1 and card["rejected"] == 1
    assert read and all(p.is_relative_to(poses.resolve()) for p in read)


def _zip_with_zeros(path, name: str, nbytes: int) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z, z.open(name, "w") as f:
        chunk = bytes(1 << 20)
        for _ in range(nbytes >> 20):
            f.write(chunk)
        f.write(bytes(nbytes & ((1 << 20) - 1)))


def test_zip_bomb_is_refused_without_inflating(tmp_path):
    zpath = tmp_path / "bomb.zip"
    size = sources.MAX_MEMBER_BYTES + (1 << 20)  # 129 MiB of zeros: ~130 kB compressed
    _zip_with_zeros(zpath, "00000/img00000000.png", size)
    assert zpath.stat().st_size < 1 << 20
    _mat(tmp_path / "coeffs" / "00000" / "img00000000.mat")
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(BadSample, match=rf"img00000000\.png: declares {size} bytes uncompressed, over the"):
        cv.convert_ffhq(zpath, tmp_path / "coeffs", tmp_path / "out", workers=0)
    seconds, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 5 and peak < 16 << 20  # measured: 0.002 s, 0.06 MB (inflating it: 0.34 s, 284 MB)
    assert not (tmp_path / "out").exists()


def test_zip_header_that_lies_cannot_inflate_more(tmp_path):
    zpath = tmp_path / "liar.zip"
    _zip_with_zeros(zpath, "a.png", 4 << 20)
    raw = bytearray(zpath.read_bytes())
    # Say 1000 bytes in the central directory (what zipfile trusts); the data still inflates to 4 MiB.
    with zipfile.ZipFile(zpath) as z:
        info = z.getinfo("a.png")
    cd = raw.rfind(b"PK\x01\x02")  # the central directory entry: uncompressed size at offset 24
    assert int.from_bytes(raw[cd + 24:cd + 28], "little") == info.file_size == 4 << 20
    raw[cd + 24:cd + 28] = (1000).to_bytes(4, "little")
    zpath.write_bytes(bytes(raw))
    with zipfile.ZipFile(zpath) as z:
        with pytest.raises(BadSample, match="a.png"):
            sources.read_zip_member(z, "a.png")


def test_bounded_read_stops_at_the_cap_whatever_the_header_says():
    """Had the zip reader trusted the stream rather than the header, the bounded read still stops at cap + 1."""

    class Liar:
        filename = "liar.zip"

        def getinfo(self, name):
            return zipfile.ZipInfo(name)  # file_size 0

        def open(self, info):
            return io.BytesIO(bytes(10_000))

    with pytest.raises(BadSample, match="inflates past the 4096-byte cap"):
        sources.read_zip_member(Liar(), "a.png", cap=4096)


# --------------------------------------------------------------------------------------- output folders
def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("content", ["notes", "eg3d_card"])
def test_unrelated_folder_is_never_replaced(tmp_path, content):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "keep.txt").write_text("my notes")
    if content == "eg3d_card":  # an EG3D source folder has a dataset.json too, but not ours
        (out / "dataset.json").write_text(json.dumps({"labels": [["a.png", [0.0] * 25]]}))
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="not a dataset written by `gmpi data`.*even with --overwrite"):
        ShardSetWriter(out, "synthetic32", 32, "synthetic", overwrite=True)
    rc = gmpi_main(["data", "synthetic", "--out", str(out), "--num", "2", "--resolution", "32", "--overwrite"])
    assert rc != 0
    assert _snapshot(out) == before and not (tmp_path / "photos.partial").exists()


def test_unrelated_partial_sibling_is_never_removed(tmp_path):
    (tmp_path / "d.partial").mkdir()
    (tmp_path / "d.partial" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="was not left by an interrupted"):
        ShardSetWriter(tmp_path / "d", "synthetic32", 32, "synthetic")
    assert (tmp_path / "d.partial" / "keep.txt").read_text() == "x"


def test_our_dataset_is_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "d"
    with ShardSetWriter(out, "synthetic32", 32, "synthetic") as w:
        w.write("k0", np.zeros((32, 32, 3), np.uint8), np.eye(4, dtype=np.float32), 0.0, 0.0, 12.6, "k0")
    assert read_card(out)["format"] == CARD_FORMAT and not (out / ".gmpi-partial").exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        ShardSetWriter(out, "synthetic32", 32, "synthetic")
    ShardSetWriter(out, "synthetic32", 32, "synthetic", overwrite=True).close(success=False)


def test_make_data_recipe_does_not_pass_overwrite(tmp_path):
    dry = subprocess.run(["make", "-n", "data", f"DATA={tmp_path / 'photos'}"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    line = next(ln for ln in dry.stdout.splitlines() if "gmpi data synthetic" in ln)
    assert "--overwrite" not in line


def test_official_state_dict_with_empty_but_huge_tensors_is_refused(tmp_path):
    """A zero-element tensor can declare any shape; the architecture read off such shapes is bounded too."""
    from gmpi_lightning.io import load_official_gmpi

    path = tmp_path / "generator.pth"
    torch.save({"synthesis.b4.conv1.weight": torch.empty(2**30, 0, 3, 3), "mapping.fc0.weight": torch.empty(8, 8)},
               path)
    t0 = time.perf_counter()
    with pytest.raises(NetworkFormatError, match=r"generator\.pth.*channel_(base|max)=\d+ is outside"):
        load_official_gmpi(path)
    assert time.perf_counter() - t0 < 5
    torch.save({"synthesis.b4.conv1.weight": torch.empty(8, 8, 3, 3)}, path)
    with pytest.raises(NetworkFormatError, match="mapping"):
        load_official_gmpi(path)
