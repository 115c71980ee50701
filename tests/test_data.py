"""Converters on tiny files in the real formats, bad-input handling, shard cards and the datamodule."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from datamodules import converters as cv
from datamodules.posed_images import PosedImageDataModule, mirror_w2c, xflip
from datamodules.shards import BadSample, read_card
from gmpi_lightning import cameras as C
from gmpi_lightning.cli import main as gmpi_main
from gmpi_lightning.data import write_atomic
from gmpi_lightning.errors import InputError
from tests.conftest import max_err

RES = 16


def _png_array(seed: int, size=(RES, RES)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


def _png(seed: int, size=(RES, RES)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_png_array(seed, size)).save(buf, format="png")
    return buf.getvalue()


def _rgba_png(alpha: int) -> bytes:
    buf = io.BytesIO()
    rgba = np.dstack([_png_array(9), np.full((RES, RES), alpha, np.uint8)])
    Image.fromarray(rgba).save(buf, format="png")
    return buf.getvalue()


def _apng() -> bytes:
    buf = io.BytesIO()
    frames = [Image.fromarray(_png_array(9)), Image.fromarray(_png_array(10))]
    frames[0].save(buf, format="png", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _ffhq(tmp_path, records, extra_files=None, mats=True):
    """A StyleGAN2 dataset-tool zip (00000/img0000000k.png) + Deep3DFaceRecon-style .mat per image."""
    zpath, poses = tmp_path / "ffhq16x16.zip", tmp_path / "coeffs"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("dataset.json", json.dumps({"labels": None}))
        for i in range(len(records)):
            z.writestr(f"00000/img{i:08d}.png", _png(i))
        for name, data in (extra_files or {}).items():
            z.writestr(name, data)
    for i, rec in enumerate(records if mats else []):
        (poses / "00000").mkdir(parents=True, exist_ok=True)
        savemat(poses / "00000" / f"img{i:08d}.mat", {
            "id": np.zeros((1, 80), np.float32), "exp": np.zeros((1, 64), np.float32),
            "angle": np.asarray(rec["angle"], np.float32)[None], "trans": np.asarray(rec["trans"], np.float32)[None]})
    poses.mkdir(exist_ok=True)
    return zpath, poses


@pytest.fixture(scope="module")
def cam_refs():
    from tests.conftest import fixture_dir

    return json.loads((fixture_dir("camera") / "camera_refs.json").read_text())


def _samples(folder):
    dm = PosedImageDataModule(str(folder), num_workers=0, eval_batch_size=64)
    batches = list(dm.eval_dataloader())
    return {k: v for b in batches for k, v in zip(b["key"], zip(b["w2c"], b["yaw"], b["pitch"], b["image"]))}


def test_ffhq_conversion_matches_official_poses(tmp_path, cam_refs):
    recs = cam_refs["ffhq_deep3dface"]
    zpath, poses = _ffhq(tmp_path, recs)
    out = cv.convert_ffhq(zpath, poses, tmp_path / "shards", workers=2, samples_per_shard=2)
    card = read_card(out)
    assert card["count"] == len(recs) and card["rejected"] == 0 and card["resolution"] == RES
    assert len(card["shards"]) == 3 and all(len(s["sha256"]) == 64 for s in card["shards"])
    got = _samples(out)
    for i, rec in enumerate(recs):
        w2c, yaw, pitch, img = got[f"00000_img{i:08d}"]
        assert max_err(w2c, rec["w2c_flat16"]) <= 1e-5
        assert max_err(yaw, rec["yaw_from_w2c"]) <= 1e-5 and max_err(pitch, rec["pitch_from_w2c"]) <= 1e-5
        ref = np.asarray(Image.open(io.BytesIO(_png(i))))
        assert max_err((img.permute(1, 2, 0) + 1) * 127.5, ref) < 1e-3  # lossless, [-1, 1] scaling
    assert card["pose_stats"]["yaw"]["std"] > 0


def test_ffhq_fail_list_and_xflip(tmp_path, cam_refs):
    recs = cam_refs["ffhq_deep3dface"][:3]
    zpath, poses = _ffhq(tmp_path, recs)
    fail = tmp_path / "fail_list.txt"
    fail.write_text("00000/img00000001.png\n")
    out = cv.convert_ffhq(zpath, poses, tmp_path / "s", fail_list=fail, xflip=True, workers=0)
    card = read_card(out)
    assert card["count"] == 4 and card["excluded_by_fail_list"] == 1
    got = _samples(out)
    assert set(got) == {"00000_img00000000", "00000_img00000000_xflip", "00000_img00000002",
                        "00000_img00000002_xflip"}
    w, y, p, img = got["00000_img00000002"]
    wf, yf, pf, imgf = got["00000_img00000002_xflip"]
    assert float(yf) == pytest.approx(-float(y)) and float(pf) == pytest.approx(float(p))
    assert max_err(imgf, img.flip(-1)) == 0
    assert max_err(wf.reshape(4, 4), mirror_w2c(w.reshape(4, 4).numpy())) < 1e-6


def test_eg3d_conversion_matches_official_poses(tmp_path, cam_refs):
    recs = cam_refs["afhq_eg3d"]
    root = tmp_path / "afhq_v2_train_cat_512"
    root.mkdir()
    labels = []
    for i, rec in enumerate(recs):
        (root / f"img{i:05d}.png").write_bytes(_png(10 + i))
        labels.append([f"img{i:05d}.png", rec["label25"]])
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    out = cv.convert_eg3d(root, tmp_path / "s", workers=0)
    card = read_card(out)
    assert card["preset"] == "AFHQCat" and card["count"] == len(recs)
    got = _samples(out)
    for i, rec in enumerate(recs):
        w2c, yaw, pitch, _ = got[f"img{i:05d}"]
        assert max_err(w2c, rec["w2c_flat16"]) <= 1e-5
        assert max_err(yaw, rec["yaw_from_w2c"]) <= 1e-5 and max_err(pitch, rec["pitch_from_w2c"]) <= 1e-5


def test_folder_conversion_json_and_csv(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"face{i}.png").write_bytes(_png(20 + i))
    (tmp_path / "poses.json").write_text(json.dumps({f"face{i}.png": {"yaw": 0.1 * i, "pitch": -0.05 * i}
                                                     for i in range(3)}))
    out = cv.convert_folder(imgs, tmp_path / "poses.json", tmp_path / "s", workers=0)
    got = _samples(out)
    w2c, yaw, pitch, _ = got["face2"]
    assert float(yaw) == pytest.approx(0.2) and float(pitch) == pytest.approx(-0.1)
    assert max_err(w2c, C.flatten_w2c(C.sphere_c2w(0.2, -0.1, 1.0, 1.0))[0]) < 1e-6
    c2w = C.sphere_c2w(0.25, 0.1, 1.0, 1.0)[0].numpy()
    cols = ["file"] + [f"c2w_{i}{j}" for i in range(4) for j in range(4)]
    rows = [",".join(cols)] + [",".join([f"face{i}.png"] + [repr(float(v)) for v in c2w.reshape(-1)]) for i in range(3)]
    (tmp_path / "poses.csv").write_text("\n".join(rows) + "\n")
    got = _samples(cv.convert_folder(imgs, tmp_path / "poses.csv", tmp_path / "s2", workers=0))
    w2c, yaw, pitch, _ = got["face1"]
    assert float(yaw) == pytest.approx(0.25, abs=1e-6) and float(pitch) == pytest.approx(0.1, abs=1e-6)


def test_folder_poses_files_users_write(tmp_path, capsys):
    """What a user's own folder and pose file look like: a BOM-prefixed CSV from a spreadsheet, an upper-case .JSON,
    a folder named like an image, a pose for a .bmp this converter does not read, and the first file an odd size.
    Each works or gets one line naming the file and the format; nothing is counted away silently."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "0tiny.png").write_bytes(_png(1, (2, 2)))  # first in order: must not set the dataset's resolution
    for i in range(3):
        (imgs / f"face{i}.png").write_bytes(_png(20 + i))
    (imgs / "folder.png").mkdir()
    rows = ["file,yaw,pitch"] + [f"face{i}.png,{0.1 * i},0.0" for i in range(3)] + ["0tiny.png,0,0", "old.bmp,0,0"]
    (tmp_path / "p.csv").write_bytes("\ufeff".encode() + ("\n".join(rows) + "\n").encode())
    out = cv.convert_folder(imgs, tmp_path / "p.csv", tmp_path / "s", workers=0, skip_bad=True)
    card = read_card(out)
    assert card["resolution"] == RES and card["count"] == 3 and card["rejected"] == 1
    assert card["poses_without_image"] == 1
    err = capsys.readouterr().err
    assert "1 pose(s) name no image" in err and "old.bmp" in err and ".bmp files are not read" in err
    (tmp_path / "P.JSON").write_text(json.dumps({"face0.png": {"yaw": 0.1, "pitch": 0.0}}))
    assert cv.read_folder_poses(tmp_path / "P.JSON") == {"face0.png": {"yaw": 0.1, "pitch": 0.0}}
    for name, text, says in [("bad.json", "{oops", "not valid JSON"), ("list.json", "[1, 2]", "records"),
                             ("nofile.json", '[{"name": "a.png", "yaw": 0}]', "records"),
                             ("semi.csv", "file;yaw;pitch\na.png;0;0\n", "CSV columns"),
                             ("part.csv", "file,c2w_00\na.png,1\n", "CSV columns")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=says) as e:
            cv.read_folder_poses(tmp_path / name)
        assert name in str(e.value) and "yaw" in str(e.value)


def test_folder_layouts_users_have(tmp_path, capsys):
    """Images behind a symlinked subfolder are read (once, even with a link back up the tree; under the real path
    whatever the links' names); a broken link stops the conversion with its name, or is listed with --skip-bad; the
    output written inside the images folder (shards, card, preview.png) is not read as input
    on the next run, so the same command can be run again with --overwrite and gives the same dataset."""
    from gmpi_lightning.data import image_files

    imgs, elsewhere = tmp_path / "imgs", tmp_path / "elsewhere"
    imgs.mkdir()
    elsewhere.mkdir()
    (imgs / "a.png").write_bytes(_png(1))
    (elsewhere / "b.png").write_bytes(_png(2))
    (imgs / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "up").symlink_to(imgs, target_is_directory=True)  # a loop through the link
    assert image_files(imgs) == ["a.png", "linked/b.png"]
    (imgs / "people").mkdir()
    (imgs / "people" / "c.png").write_bytes(_png(3))
    for alias in ("alias", "faces", "shortcut", "zz"):  # links sorting before and after the real folder
        (imgs / alias).symlink_to(imgs / "people", target_is_directory=True)
    assert image_files(imgs) == ["a.png", "linked/b.png", "people/c.png"]  # the real path, whatever the link order
    for alias in ("alias", "faces", "shortcut", "zz"):
        (imgs / alias).unlink()
    (imgs / "people" / "c.png").unlink()
    (imgs / "people").rmdir()
    (imgs / "gone.png").symlink_to(tmp_path / "deleted.png")
    assert image_files(imgs) == ["a.png", "gone.png", "linked/b.png"]
    (tmp_path / "p.json").write_text(json.dumps({"a.png": {"yaw": 0.1, "pitch": 0.0}, "gone.png": {"yaw": 0.0,
                                                 "pitch": 0.0}, "linked/b.png": {"yaw": -0.2, "pitch": 0.05}}))
    with pytest.raises(BadSample, match=r"gone.png: cannot be read \(No such file or directory; a broken link\)"):
        cv.convert_folder(imgs, tmp_path / "p.json", tmp_path / "s", workers=0)
    card = read_card(cv.convert_folder(imgs, tmp_path / "p.json", tmp_path / "s", workers=0, skip_bad=True))
    assert card["count"] == 2 and "gone.png" in (tmp_path / "s" / "rejected.jsonl").read_text()
    (imgs / "gone.png").unlink()
    (imgs / "old.partial").mkdir()  # an interrupted run's leftovers: not input either
    (imgs / "old.partial" / ".gmpi-partial").touch()
    (imgs / "old.partial" / "preview.png").write_bytes(_png(4))
    assert image_files(imgs) == ["a.png", "linked/b.png"]
    (tmp_path / "p.json").write_text(json.dumps({"a.png": {"yaw": 0.1, "pitch": 0.0},
                                                 "linked/b.png": {"yaw": -0.2, "pitch": 0.05}}))
    args = ["data", "folder", "--images", str(imgs), "--poses", str(tmp_path / "p.json"), "--out", str(imgs / "ds")]
    assert gmpi_main(args) == 0 and (imgs / "ds" / "preview.png").is_file()
    first = _samples(imgs / "ds")
    assert read_card(imgs / "ds")["rejected"] == 0 and sorted(first) == ["a", "linked_b"]
    capsys.readouterr()
    assert gmpi_main([*args, "--overwrite"]) == 0
    assert "a `gmpi data` output, not input" in capsys.readouterr().err
    again = _samples(imgs / "ds")
    assert read_card(imgs / "ds")["rejected"] == 0 and sorted(again) == sorted(first)
    assert all(max_err(again[k][0], first[k][0]) == 0 for k in first)
    with pytest.raises(InputError, match="is a dataset written by `gmpi data`.*not a folder of images"):
        image_files(imgs / "ds")  # --images pointed at the output


@pytest.mark.parametrize("yaw, pitch", [(30.0, 5.0), (0.1, 2.0), (-4.0, 0.0)])
def test_folder_poses_in_degrees_are_refused(tmp_path, yaw, pitch):
    """A yaw beyond pi or a pitch beyond pi/2 cannot be radians: refused, naming the file (a pose in degrees
    would otherwise become a camera several turns round the sphere)."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(_png(1))
    (tmp_path / "p.json").write_text(json.dumps({"a.png": {"yaw": yaw, "pitch": pitch}}))
    with pytest.raises(BadSample, match="a.png: .* not radians .*degrees"):
        cv.convert_folder(imgs, tmp_path / "p.json", tmp_path / "s", workers=0)


BAD_CASES = {
    "corrupt": ({"00000/img00000009.png": b"\x89PNG\r\n\x1a\nbroken"}, "cannot read it as an image"),
    "nonsquare": ({"00000/img00000009.png": _png(9, (16, 12))}, "square"),
    "resolution": ({"00000/img00000009.png": _png(9, (32, 32))}, "expected 16px"),
    "missing_pose": ({"00000/img00000009.png": _png(9)}, "pose file missing"),
    "duplicate": ({"00000/img00000000.jpg": _png(9)}, "same sample key"),
    "transparent": ({"00000/img00000009.png": _rgba_png(254)}, "has transparent pixels"),
    "animated": ({"00000/img00000009.png": _apng()}, "2 frames"),
}


def test_opaque_alpha_is_read_as_its_rgb(tmp_path):
    """An alpha channel that hides nothing is dropped without a word; the RGB is the file's (a transparent one is
    refused: BAD_CASES)."""
    from datamodules.shards import decode_image

    assert np.array_equal(decode_image(_rgba_png(255), "a.png", RES), _png_array(9))


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_inputs_stop_or_are_listed(tmp_path, cam_refs, case):
    extra, message = BAD_CASES[case]
    zpath, poses = _ffhq(tmp_path, cam_refs["ffhq_deep3dface"][:2], extra_files=extra)
    with pytest.raises(BadSample, match=message):
        cv.convert_ffhq(zpath, poses, tmp_path / "stop", workers=0)
    assert not (tmp_path / "stop").exists()  # nothing that looks like a finished dataset
    assert not (tmp_path / "stop.partial").exists()  # and nothing half-written left behind
    out = cv.convert_ffhq(zpath, poses, tmp_path / "skip", workers=2, skip_bad=True)
    card = read_card(out)
    assert card["rejected"] == 1 and card["count"] == 2
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and message in rejected[0]["error"] and rejected[0]["file"].startswith("00000/")


def test_a_member_named_twice_in_a_zip_is_rejected_not_merged(tmp_path, cam_refs):
    """A zip can hold two members of one name: the second is the repeated key it is, for FFHQ's and EG3D's
    converters alike (never silently dropped, and never taken for an image without a pose)."""
    recs = cam_refs["ffhq_deep3dface"][:2]
    zpath, poses = _ffhq(tmp_path, recs)
    eg3d = tmp_path / "eg3d.zip"
    with zipfile.ZipFile(eg3d, "w") as z:
        z.writestr("dataset.json", json.dumps({"labels": [[f"img{i}.png", r["label25"]]
                                                          for i, r in enumerate(cam_refs["afhq_eg3d"][:2])]}))
        for i in range(2):
            z.writestr(f"img{i}.png", _png(i))
    for path, member in ((zpath, "00000/img00000001.png"), (eg3d, "img1.png")):
        with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "a") as z:
            z.writestr(member, _png(7))
    for name, convert in (("ffhq", lambda out, **kw: cv.convert_ffhq(zpath, poses, out, **kw)),
                          ("eg3d", lambda out, **kw: cv.convert_eg3d(eg3d, out, preset="AFHQCat", **kw))):
        with pytest.raises(BadSample, match="same sample key"):
            convert(tmp_path / f"{name}_stop", workers=0)
        out = convert(tmp_path / f"{name}_skip", workers=0, skip_bad=True)
        card = read_card(out)
        rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
        assert (card["count"], card["rejected"], len(rejected)) == (2, 1, 1), name
        assert "same sample key" in rejected[0]["error"] and rejected[0]["file"].endswith("1.png"), name
        assert card.get("excluded_by_fail_list", 0) == 0


def test_malformed_and_nan_poses(tmp_path, cam_refs):
    recs = cam_refs["ffhq_deep3dface"][:2]
    zpath, poses = _ffhq(tmp_path, recs)
    savemat(poses / "00000" / "img00000001.mat", {"angle": np.zeros((1, 3))})
    with pytest.raises(BadSample, match=r"img00000001\.mat: field 'trans' missing"):
        cv.convert_ffhq(zpath, poses, tmp_path / "a", workers=0)
    savemat(poses / "00000" / "img00000001.mat", {"angle": np.array([[np.nan, 0, 0]]), "trans": np.zeros((1, 3))})
    with pytest.raises(BadSample, match="NaN"):
        cv.convert_ffhq(zpath, poses, tmp_path / "b", workers=0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "x.png").write_bytes(_png(1))
    (tmp_path / "p.json").write_text(json.dumps({"x.png": {"yaw": "left"}}))
    with pytest.raises(BadSample, match="malformed pose record"):
        cv.convert_folder(imgs, tmp_path / "p.json", tmp_path / "c", workers=0)


def test_existing_output_needs_overwrite(tmp_path, cam_refs):
    zpath, poses = _ffhq(tmp_path, cam_refs["ffhq_deep3dface"][:2])
    cv.convert_ffhq(zpath, poses, tmp_path / "o", workers=0)
    with pytest.raises(FileExistsError, match="--overwrite"):
        cv.convert_ffhq(zpath, poses, tmp_path / "o", workers=0)
    assert read_card(cv.convert_ffhq(zpath, poses, tmp_path / "o", workers=0, overwrite=True))["count"] == 2


def test_gmpi_data_command_and_preview(tmp_path, cam_refs):
    zpath, poses = _ffhq(tmp_path, cam_refs["ffhq_deep3dface"])
    rc = gmpi_main(["data", "ffhq", "--images", str(zpath), "--poses", str(poses), "--out", str(tmp_path / "d"),
                    "--workers", "0"])
    assert rc == 0 and (tmp_path / "d" / "preview.png").is_file()
    assert read_card(tmp_path / "d")["count"] == len(cam_refs["ffhq_deep3dface"])
    assert gmpi_main(["data", "ffhq", "--images", str(zpath), "--poses", str(poses), "--out",
                      str(tmp_path / "d")]) == 1  # exists: a clear error, exit code 1


def test_training_stream_batches_and_xflip(tmp_path, cam_refs):
    zpath, poses = _ffhq(tmp_path, cam_refs["ffhq_deep3dface"])
    out = cv.convert_ffhq(zpath, poses, tmp_path / "s", workers=0, samples_per_shard=1)
    dm = PosedImageDataModule(str(out), batch_size=3, batches_per_epoch=4, num_workers=2, seed=7)
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    b = batches[0]
    assert b["image"].shape == (3, 3, RES, RES) and b["w2c"].shape == (3, 16)
    assert float(b["image"].min()) >= -1 and float(b["image"].max()) <= 1
    again = list(PosedImageDataModule(str(out), batch_size=3, batches_per_epoch=4, num_workers=2,
                                      seed=7).train_dataloader())
    assert [x["key"] for x in again] == [x["key"] for x in batches]  # seeded streams are reproducible
    # x-flip mirrors the pose consistently: flipping a sphere pose gives the pose at -yaw
    s = {"key": "k", "image": np.zeros((4, 4, 3), np.uint8), "yaw": 0.3, "pitch": 0.1,
         "w2c": C.invert_rigid(C.sphere_c2w(0.3, 0.1, 1.0, 1.0))[0].numpy()}
    f = xflip(s)
    assert f["yaw"] == -0.3
    assert max_err(f["w2c"], C.invert_rigid(C.sphere_c2w(-0.3, 0.1, 1.0, 1.0))[0]) < 1e-6


def test_missing_shards_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        PosedImageDataModule(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="gmpi data"):
        PosedImageDataModule(str(tmp_path / "x-{000000..000003}.tar"))


def test_mirror_is_an_involution():
    w2c = C.invert_rigid(C.sphere_c2w(0.2, -0.1, 1.0, 1.0))[0].numpy()
    assert max_err(mirror_w2c(mirror_w2c(w2c)), w2c) < 1e-7
    assert np.linalg.det(mirror_w2c(w2c)[:3, :3]) == pytest.approx(1.0, abs=1e-5)


def test_two_process_rank_split(tmp_path, cam_refs):
    """2 gloo ranks x 2 workers: the finite pass reads every sample exactly once across ranks (disjoint shards),
    and the training stream yields the same number of batches on every rank."""
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO

    recs = cam_refs["ffhq_deep3dface"] * 2  # 10 images -> 10 shards of 1
    zpath, poses = _ffhq(tmp_path, recs)
    out = cv.convert_ffhq(zpath, poses, tmp_path / "s", workers=0, samples_per_shard=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, "-m", "tests.ddp_data_worker", str(out), str(tmp_path), str(port)],
                          cwd=REPO, env=dict(env, GLOO_SOCKET_IFNAME="lo"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert set(r0["eval"]).isdisjoint(r1["eval"])
    assert sorted(r0["eval"] + r1["eval"]) == sorted(_samples(out))
    assert len(r0["eval"]) == len(r1["eval"]) == 5
    assert len(r0["train"]) == len(r1["train"]) == 5
    assert r0["train"] != r1["train"]  # each rank draws its own stream


def test_write_atomic_gives_the_whole_file_or_leaves_the_old_one(tmp_path):
    """The file appears whole (100,000 bytes, nothing under its name while they are written) in a folder made for it,
    with no temporary file left; a ``write`` that raises halfway (an error, or Ctrl-C) leaves the older file's 3 bytes
    as they were and no temporary file."""
    target, seen = tmp_path / "sub" / "out.bin", []

    def write(tmp):
        seen.append(tmp)
        tmp.write_bytes(b"x" * 100_000)
        assert not target.exists()

    assert write_atomic(str(target), write) == target
    assert target.read_bytes() == b"x" * 100_000 and os.listdir(target.parent) == ["out.bin"]
    assert seen == [target.parent / f"out.bin.{os.getpid()}.partial"]  # beside it, unique to the process
    target.write_bytes(b"old")
    for error in (OSError("disk full"), KeyboardInterrupt()):
        def fail(tmp, error=error):
            tmp.write_bytes(b"y" * 50_000)
            raise error

        with pytest.raises(type(error)):
            write_atomic(target, fail)
        assert target.read_bytes() == b"old" and os.listdir(target.parent) == ["out.bin"]
