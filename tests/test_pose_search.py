"""Cameras by analysis-by-synthesis (gmpi_lightning/pose_search.py, the camera in inversion's stage 1) and
`gmpi poses` (gmpi_lightning/poses.py): known answers from a tiny generator's own pictures, the confidence, the
round trip through `gmpi data folder`, Ctrl-C and resume, bad input."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from gmpi_lightning import export, inversion, pose_search
from gmpi_lightning.cameras import flatten_w2c, pose_range, sphere_c2w
from gmpi_lightning.cli import main as gmpi_main
from gmpi_lightning.inversion import InvertSettings, invert
from gmpi_lightning.io import save_gmpi_checkpoint
from gmpi_lightning.pose_search import PoseSearch, SearchSettings, pose_grid
from gmpi_lightning.scene import Scene
from tests.test_invert import PRESET, known_target, tiny_generator

# cameras of the known-answer pictures: spread over the prior (yaw -0.578..0.578, pitch -0.254..0.254)
CAMERAS = [(-0.45, 0.15), (0.05, 0.2), (0.5, 0.0)]
SEEDS = [6, 7, 9]  # latent seeds of known_target
STEPS = 100  # stage 1 steps in these tests (300 by default)
YAW_TOL = PITCH_TOL = 0.02  # measured on CAMERAS: at most 0.002 (yaw) and 0.001 (pitch)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_gmpi_checkpoint(tmp_path_factory.mktemp("ckpt") / "gmpi.pt", tiny_generator(), PRESET.to_dict())


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """The tiny generator's own pictures at CAMERAS (8-bit PNGs): images whose camera is known exactly."""
    G = tiny_generator()
    folder = tmp_path_factory.mktemp("heads")
    for i, (yaw, pitch) in enumerate(CAMERAS):
        target = known_target(G, seed=SEEDS[i], yaw=yaw, pitch=pitch)[1]
        iio.imwrite(folder / f"head{i}.png", export.to_uint8(target[0]))
    return folder


def test_grid_is_the_centres_of_the_prior_cells():
    """Rules out a grid through the range's end points (half the cells outside the search's reach at the
    edges are wasted) or one that misses the prior's mean."""
    yaw, pitch = pose_grid(PRESET, 7, 3)
    (y0, y1), (p0, p1) = pose_range(PRESET)
    cell = (y1 - y0) / 7
    assert yaw[:7].tolist() == pytest.approx([y0 + (k + 0.5) * cell for k in range(7)])
    assert pitch.reshape(3, 7)[:, 0].tolist() == pytest.approx([p0 + (p1 - p0) / 6, 0.0, p1 - (p1 - p0) / 6])
    assert float(yaw[3]) == pytest.approx(PRESET.yaw_mean) and len(yaw) == 21


def test_runner_up_is_another_hypothesis_and_confidence_its_relative_gap():
    """The runner-up skips candidates that ended within one cell of the winner: rules out taking the plain
    second-best loss (the winner's neighbour, which makes every confidence near 0), and a gap over the wrong loss."""
    yaws = torch.tensor([-0.4, -0.2, 0.0, 0.2, 0.4], dtype=torch.float64)
    found = PoseSearch(yaws, torch.zeros(5, dtype=torch.float64), yaws.clone(), torch.zeros(5, dtype=torch.float64),
                       torch.tensor([0.30, 0.25, 0.10, 0.11, 0.20], dtype=torch.float64), torch.zeros(5, 4), (1, 5),
                       (0.2, 0.5), 1.0, 0.0)
    assert found.best == 2 and found.runner_up == 4  # 3 is the winner's neighbour
    assert found.loss_gap == pytest.approx(0.10) and found.confidence == pytest.approx(0.10 / 0.20)
    found.yaws[4] = 0.15  # candidate 4 ended next to the winner: the same hypothesis
    assert found.runner_up == 0 and found.confidence == pytest.approx(0.20 / 0.30)


def test_render_is_differentiable_in_the_camera():
    """The gradient of a rendered picture with respect to yaw matches a finite difference: rules out a renderer
    that treats the camera as a constant (the refinement would never move it)."""
    G = tiny_generator()
    scene = Scene(PRESET, 8)
    with torch.no_grad():
        mpi = G.synthesize(G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(1)), None),
                           scene.planes.normalized)
    weights = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    yaw = torch.tensor(0.2, requires_grad=True)
    (scene.render(mpi, scene.camera(yaw, 0.1), validate=False)["rgb"] * weights).sum().backward()
    with torch.no_grad():
        f = [float((scene.render_pose(mpi, 0.2 + e, 0.1)["rgb"] * weights).sum()) for e in (-1e-3, 1e-3)]
    assert abs(float(yaw.grad)) > 1 and float(yaw.grad) == pytest.approx((f[1] - f[0]) / 2e-3, rel=0.05)


def test_search_and_refinement_recover_known_cameras(heads):
    """Without a camera, invert finds it: the search's winner, then yaw and pitch learned with the latent, land
    within 0.02 rad of the truth over the prior. Rules out: a search that scores candidates at one camera (or with
    yaw's sign flipped), a refinement that does not move the camera (the search's winner alone is off by up to
    0.05 in pitch here), a camera pushed outside the prior."""
    G = tiny_generator()
    for i, (yaw, pitch) in enumerate(CAMERAS):
        target = torch.from_numpy(iio.imread(heads / f"head{i}.png")).permute(2, 0, 1)[None].float() / 255
        inv = invert(G, PRESET, target, settings=InvertSettings(steps=STEPS, pti_steps=0))
        found = inv.history["pose_search"]
        print(f"truth {yaw:+.3f} {pitch:+.3f}: search {found['best']['yaw']:+.3f} {found['best']['pitch']:+.3f}, "
              f"refined {inv.yaw:+.3f} {inv.pitch:+.3f}, confidence {found['confidence']:.3f}")
        assert abs(inv.yaw - yaw) < YAW_TOL and abs(inv.pitch - pitch) < PITCH_TOL
        assert abs(found["best"]["yaw"] - yaw) < 0.1  # the search alone picks the right hypothesis
        assert inv.history["latent"]["pose_refined"] and found["confidence"] > 0.1
        assert inv.metrics()["recon_psnr"] > 35
        if i == 0:  # here the search alone is 0.046 off in pitch: the refinement is what gets it right
            assert abs(found["best"]["pitch"] - pitch) > 2 * PITCH_TOL


def test_camera_stays_inside_the_prior_and_ctrl_c_keeps_the_best(monkeypatch):
    """A picture from beyond the prior's yaw range is posed at the range's edge, not past it (rules out a refinement
    without the projection). Ctrl-C in the search keeps the best candidate scored so far (rules out losing
    everything, or keeping an unscored candidate)."""
    G = tiny_generator()
    (y0, y1), (p0, p1) = pose_range(PRESET)
    ws = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(3)), None)
    scene = Scene(PRESET, PRESET.train_planes)
    with torch.no_grad():
        target = scene.render_pose(G.synthesize(ws, scene.planes.normalized), y1 + 0.15, 0.0, check_inside=False)["rgb"]
    inv = invert(G, PRESET, target, settings=InvertSettings(steps=40, pti_steps=0, pose_lr=0.05),
                 search=SearchSettings(yaws=3, pitches=1, steps=10))
    assert inv.yaw == pytest.approx(y1, abs=1e-6) and p0 <= inv.pitch <= p1
    real, calls = inversion.image_loss, {"n": 0}

    def interrupt(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(pose_search, "image_loss", interrupt)
    inv = invert(G, PRESET, target, settings=InvertSettings(steps=5, pti_steps=5),
                 search=SearchSettings(yaws=3, pitches=1, steps=10))
    found = inv.history["pose_search"]
    assert inv.interrupted and found["interrupted"] and "latent" not in inv.history and not inv.tuned
    losses = [c["loss"] for c in found["grid"]["candidates"]]
    assert (inv.yaw, inv.pitch) == (found["best"]["yaw"], found["best"]["pitch"])
    assert min(loss for loss in losses if loss is not None) == found["best"]["loss"]


def test_invert_without_pose_reports_the_camera(tiny_ckpt, heads, tmp_path):
    """`gmpi invert` without --pose searches: metrics.json's camera has the refined pose, the search's start, its
    runner-up and confidence, and views.json's input camera is that pose (rules out writing the search's grid
    pose, or the preset's mean, as the input camera)."""
    out = tmp_path / "inv"
    assert gmpi_main(["invert", "--ckpt", str(tiny_ckpt), "--image", str(heads / "head2.png"), "--steps", "40",
                      "--pti-steps", "0", "--search-grid", "5x3", "--search-steps", "20", "--out", str(out),
                      "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    cam = metrics["camera"]
    assert cam["source"] == metrics["pose_source"] == "search" and cam["refined"]
    assert len(metrics["stages"]["pose_search"]["grid"]["candidates"]) == 15
    assert cam["runner_up"] is not None and cam["confidence"] == pytest.approx(cam["loss_gap"] /
                                                                              cam["runner_up"]["loss"])
    assert abs(cam["yaw"] - CAMERAS[2][0]) < 0.05 and cam["yaw"] != cam["start"][0]
    views = json.loads((out / "views.json").read_text())
    assert (views["input"]["yaw"], views["input"]["pitch"]) == (cam["yaw"], cam["pitch"])


def test_invert_mirror_inverts_at_the_mean_of_both_searches(tiny_ckpt, heads, tmp_path, monkeypatch, capsys):
    """`gmpi invert --mirror`: the camera searched on the image and on its left-right mirror (each fit with the
    command's search and no tuning), averaged, and the image inverted and tuned at that camera without moving it.
    Rules out inverting at one fit's camera, refining the average away, the wrong flip, tuning inside the fits, and
    --mirror silently ignored, or refused only after work, where there is no search to repeat."""
    from gmpi_lightning import camera_fit, invert_cli

    calls = []
    for module in (camera_fit, invert_cli):
        real = module.invert
        monkeypatch.setattr(module, "invert", lambda G, preset, target, *a, _real=real, _m=module.__name__, **kw:
                            calls.append((_m, target, a, kw)) or _real(G, preset, target, *a, **kw))
    out = tmp_path / "inv"
    args = ["invert", "--ckpt", str(tiny_ckpt), "--image", str(heads / "head2.png"), "--steps", "40", "--pti-steps",
            "3", "--search-grid", "5x3", "--search-steps", "20", "--out", str(out), "--device", "cpu", "--mirror"]
    assert gmpi_main(args) == 0
    assert [c[0].split(".")[-1] for c in calls] == ["camera_fit", "camera_fit", "invert_cli"]
    assert torch.equal(calls[1][1], calls[0][1].flip(-1)) and torch.equal(calls[2][1], calls[0][1])
    assert [c[3]["settings"].pti_steps for c in calls[:2]] == [0, 0] and calls[2][2][2].pti_steps == 3
    assert all((c[3]["search"].yaws, c[3]["search"].pitches) == (5, 3) for c in calls[:2])
    metrics = json.loads((out / "metrics.json").read_text())
    cam, m = metrics["camera"], metrics["camera"]["mirror"]
    assert cam["source"] == "search, mirror-averaged" and not cam["refined"]
    assert cam["yaw"] == pytest.approx((m["image"]["yaw"] - m["mirrored"]["yaw"]) / 2, abs=1e-6)
    assert cam["pitch"] == pytest.approx((m["image"]["pitch"] + m["mirrored"]["pitch"]) / 2, abs=1e-6)
    assert calls[2][2][:2] == (cam["yaw"], cam["pitch"]) and calls[2][3]["refine_pose"] is False
    assert cam["confidence"] == min(m["image"]["confidence"], m["mirrored"]["confidence"])
    assert cam["start"] == m["image"]["search"] and metrics["seconds_inversion"] > m["image"]["seconds"]
    views = json.loads((out / "views.json").read_text())
    assert (views["input"]["yaw"], views["input"]["pitch"]) == (cam["yaw"], cam["pitch"])
    assert abs(m["image"]["yaw"] - CAMERAS[2][0]) < 0.05  # the image's own fit, as without --mirror
    calls.clear()
    for extra, says in [(["--pose", "0.1,0"], "--pose gives it"), (["--pose-init", "mean"], "--pose-init mean does"),
                        (["--estimators", "none.pt"], "--estimators makes the pose CNN's reading the start")]:
        fresh = tmp_path / "never"
        assert gmpi_main([*args[:-4], str(fresh), *args[-3:], *extra]) == 1
        assert says in capsys.readouterr().err and not fresh.exists() and not calls  # before any work
    monkeypatch.setattr(camera_fit, "invert", lambda *a, **kw: type("Stop", (), {"interrupted": 1})())
    assert gmpi_main([*args[:-4], str(tmp_path / "stopped"), *args[-3:]]) == 130  # Ctrl-C in a fit
    assert "nothing written" in capsys.readouterr().err and not (tmp_path / "stopped").exists()


# ------------------------------------------------------------------------------------------------- gmpi poses
def _shard_cameras(folder) -> dict:
    from datamodules.posed_images import PosedImageDataModule

    dm = PosedImageDataModule(str(folder), num_workers=0, eval_batch_size=64)
    return {k: (w2c, float(y), float(p)) for b in dm.eval_dataloader() for k, w2c, y, p in
            zip(b["key"], b["w2c"], b["yaw"], b["pitch"])}


def test_poses_round_trip_through_gmpi_data_folder(tiny_ckpt, heads, tmp_path, monkeypatch, capsys):
    """Pictures with known cameras -> `gmpi poses` -> `gmpi data folder` -> shards whose w2c are the true cameras'
    within the error measured above (0.02 rad). Rules out poses written in another convention than the folder
    reader's (degrees, swapped yaw/pitch, c2w for w2c), lost on the way, or attached to the wrong file. Ctrl-C keeps
    the finished images and the same command resumes without estimating them again; --min-confidence on a rerun
    leaves the unsure ones out of poses.json, named in the report and on stderr, without estimating anything."""
    out = tmp_path / "poses.json"
    args = ["poses", "--ckpt", str(tiny_ckpt), "--images", str(heads), "--out", str(out), "--steps", str(STEPS),
            "--device", "cpu"]
    from gmpi_lightning import camera_fit

    real, calls = camera_fit.invert, []

    def interrupt_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(camera_fit, "invert", interrupt_second)
    assert gmpi_main(args) == 130
    assert list(json.loads(out.read_text())) == ["head0.png"]
    monkeypatch.setattr(camera_fit, "invert", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    calls.clear()
    assert gmpi_main(args) == 0 and len(calls) == 2  # resumed: only head1 and head2
    written = json.loads(out.read_text())
    report = json.loads((tmp_path / "poses.report.json").read_text())
    assert sorted(written) == ["head0.png", "head1.png", "head2.png"] and not report["interrupted"]
    assert all(written[n]["confidence"] == report["estimates"][n]["confidence"] for n in written)
    assert gmpi_main(["data", "folder", "--images", str(heads), "--poses", str(out), "--preset", "FFHQ256",
                      "--out", str(tmp_path / "shards"), "--workers", "0"]) == 0
    shards = _shard_cameras(tmp_path / "shards")
    assert len(shards) == 3
    for i, (yaw, pitch) in enumerate(CAMERAS):
        w2c, y, p = shards[f"head{i}"]
        truth = flatten_w2c(sphere_c2w(yaw, pitch, PRESET.sphere_center_z, PRESET.sphere_r))[0]
        assert abs(y - yaw) < YAW_TOL and abs(p - pitch) < PITCH_TOL
        assert float((w2c.reshape(-1) - truth).abs().max()) < YAW_TOL  # w2c entries move at most ~1 per radian
    # a stricter threshold on the same estimates: nothing estimated again, the unsure image left out and named
    conf = sorted(written[n]["confidence"] for n in written)
    threshold = (conf[0] + conf[1]) / 2
    calls.clear()
    capsys.readouterr()
    assert gmpi_main([*args, "--min-confidence", str(threshold)]) == 0 and not calls
    lowest = min(written, key=lambda n: written[n]["confidence"])
    report = json.loads((tmp_path / "poses.report.json").read_text())
    assert sorted(json.loads(out.read_text())) == sorted(set(written) - {lowest})
    assert report["left_out"] == report["low_confidence"] == [lowest] and report["count"] == 2
    assert f"{lowest}: camera unsure" in capsys.readouterr().err


def test_poses_refuses_bad_images_before_any_work(tiny_ckpt, heads, tmp_path, capsys):
    """A non-square or unreadable file stops the command with its name and nothing is written; --skip-bad lists it
    in the report (rules out posing a centre crop under the uncropped file's name, or skipping it silently). What
    reading changed (an alpha channel dropped) is noted per image in the report and counted on stderr.
    Another checkpoint's run in --out is never resumed."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes((heads / "head0.png").read_bytes())
    iio.imwrite(folder / "wide.png", np.zeros((32, 48, 3), np.uint8))
    (folder / "notes.png").write_text("not an image")
    rgb = iio.imread(heads / "head1.png")
    iio.imwrite(folder / "rgba.png", np.concatenate([rgb, np.full_like(rgb[..., :1], 128)], axis=-1))
    out = tmp_path / "p.json"
    base = ["poses", "--ckpt", str(tiny_ckpt), "--images", str(folder), "--out", str(out), "--steps", "2",
            "--search-grid", "3x1", "--search-steps", "2", "--device", "cpu"]
    assert gmpi_main(base) == 1
    err = capsys.readouterr().err
    assert "2 of 4 images" in err and "wide.png: 48 x 32 is not square" in err and "notes.png: cannot read" in err
    assert "--skip-bad" in err and not out.exists()
    assert gmpi_main([*base, "--skip-bad"]) == 0
    report = json.loads((tmp_path / "p.report.json").read_text())
    assert list(json.loads(out.read_text())) == ["a.png", "rgba.png"]
    assert sorted(report["skipped"]) == ["notes.png", "wide.png"] and "notes" not in report["estimates"]["a.png"]
    assert [n[:22] for n in report["estimates"]["rgba.png"]["notes"]] == ["alpha channel ignored "]
    assert "1 image(s) were changed on reading" in capsys.readouterr().err
    other_G = tiny_generator()
    torch.nn.init.zeros_(next(other_G.parameters()))
    other = save_gmpi_checkpoint(tmp_path / "other.pt", other_G, PRESET.to_dict())
    assert gmpi_main([*base[:2], str(other), *base[3:], "--skip-bad"]) == 1
    assert "exists from another checkpoint" in capsys.readouterr().err
    assert gmpi_main(["poses", "--ckpt", str(tiny_ckpt), "--images", str(tmp_path / "none"), "--out",
                      str(out)]) == 1
    assert "image folder not found" in capsys.readouterr().err



def test_poses_resume_poses_a_changed_file_again_and_drops_a_removed_one(tiny_ckpt, heads, tmp_path, capsys,
                                                                         monkeypatch):
    """The report keys every camera to its file's sha256: on a rerun an image replaced since it was posed (here by
    its mirror image) is estimated again, a removed one leaves poses.json, an unchanged one is kept without work.
    A truncated JPEG is caught before any estimation (it decodes only half-way), and --out must be a .json file,
    never a folder or the user's image."""
    from gmpi_lightning import camera_fit

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"h{i}.png").write_bytes((heads / f"head{i}.png").read_bytes())
    out = tmp_path / "p.json"
    base = ["poses", "--ckpt", str(tiny_ckpt), "--images", str(folder), "--out", str(out), "--steps", "2",
            "--search-grid", "3x1", "--search-steps", "2", "--device", "cpu"]
    assert gmpi_main(base) == 0
    first = json.loads((tmp_path / "p.report.json").read_text())["estimates"]
    iio.imwrite(folder / "h0.png", np.ascontiguousarray(iio.imread(heads / "head0.png")[:, ::-1]))
    (folder / "h2.png").unlink()
    real, calls = camera_fit.invert, []
    monkeypatch.setattr(camera_fit, "invert", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    capsys.readouterr()
    assert gmpi_main(base) == 0 and len(calls) == 1  # h0 only
    assert "1 of 2 images already posed" in capsys.readouterr().out
    again = json.loads((tmp_path / "p.report.json").read_text())["estimates"]
    assert sorted(json.loads(out.read_text())) == sorted(again) == ["h0.png", "h1.png"]
    assert again["h1.png"] == first["h1.png"] and again["h0.png"]["sha256"] != first["h0.png"]["sha256"]
    # a JPEG cut in half: refused up front (before any work), listed with --skip-bad
    jpeg = tmp_path / "whole.jpg"
    iio.imwrite(jpeg, iio.imread(heads / "head1.png"))
    (folder / "cut.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    calls.clear()
    assert gmpi_main(base) == 1 and not calls
    assert "cut.jpg: cannot read it as an image" in capsys.readouterr().err
    assert gmpi_main([*base, "--skip-bad"]) == 0 and not calls
    assert list(json.loads((tmp_path / "p.report.json").read_text())["skipped"]) == ["cut.jpg"]
    for bad_out in (folder / "h1.png", tmp_path):
        assert gmpi_main([*base[:6], str(bad_out), *base[7:], "--overwrite"]) == 1
        assert "a .json file" in capsys.readouterr().err
    assert iio.imread(folder / "h1.png").shape == (32, 32, 3)  # the image is untouched


def test_poses_mirror_averages_the_image_and_its_mirror(tiny_ckpt, heads, tmp_path, monkeypatch, capsys):
    """--mirror fits the image and its left-right mirror (not an upside-down or the same image) and writes yaw
    (y - y_mirrored) / 2, pitch the mean, the lower confidence; the report keeps both fits. Rules out a sum for the
    difference (a yaw near 0), the wrong flip axis, and resuming a run made without --mirror."""
    from gmpi_lightning import camera_fit

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "h.png").write_bytes((heads / "head2.png").read_bytes())  # CAMERAS[2]: yaw 0.5
    real, targets = camera_fit.invert, []
    monkeypatch.setattr(camera_fit, "invert", lambda G, preset, target, **kw: targets.append(target) or
                        real(G, preset, target, **kw))
    out = tmp_path / "p.json"
    base = ["poses", "--ckpt", str(tiny_ckpt), "--images", str(folder), "--out", str(out), "--steps", str(STEPS),
            "--device", "cpu"]
    assert gmpi_main([*base, "--mirror"]) == 0
    assert len(targets) == 2 and torch.equal(targets[1], targets[0].flip(-1))
    est = json.loads((tmp_path / "p.report.json").read_text())["estimates"]["h.png"]
    image, mirrored = est["image"], est["mirrored"]
    assert abs(image["yaw"] - CAMERAS[2][0]) < YAW_TOL  # (the tiny generator is not symmetric: its mirror fit is not)
    written = json.loads(out.read_text())["h.png"]
    assert written["yaw"] == pytest.approx((image["yaw"] - mirrored["yaw"]) / 2, abs=1e-12)
    assert written["pitch"] == pytest.approx((image["pitch"] + mirrored["pitch"]) / 2, abs=1e-12)
    assert written["confidence"] == min(image["confidence"], mirrored["confidence"])
    assert est["mirror_disagreement"] == pytest.approx(abs(image["yaw"] + mirrored["yaw"]), abs=1e-12)
    capsys.readouterr()
    assert gmpi_main(base) == 1 and "exists from another checkpoint, folder or settings" in capsys.readouterr().err
    plain = [*base[:6], str(tmp_path / "q.json"), *base[7:]]
    assert gmpi_main(plain) == 0 and len(targets) == 3
    report = json.loads((tmp_path / "q.report.json").read_text())
    del report["mirror"]  # a report written before the setting existed was made without it: it resumes
    (tmp_path / "q.report.json").write_text(json.dumps(report))
    assert gmpi_main(plain) == 0 and len(targets) == 3
    calls = []  # Ctrl-C inside the image's fit: the mirror's is not started, and the image is not done
    stopped = type("Stop", (), {"interrupted": 1})
    monkeypatch.setattr(camera_fit, "invert", lambda *a, **kw: calls.append(1) or stopped())
    assert gmpi_main([*base[:6], str(tmp_path / "r.json"), *base[7:], "--mirror"]) == 130
    assert len(calls) == 1 and json.loads((tmp_path / "r.json").read_text()) == {}
    one = {"yaw": 0.3, "pitch": 0.1, "confidence": None}
    assert camera_fit.mirror_average(one, dict(one, yaw=-0.2, confidence=0.5))["confidence"] is None  # unsure stays
    sure = dict(one, confidence=0.4, loss_gap=0.1, runner_up={"yaw": 0.2, "pitch": 0.0})
    unsure = dict(sure, yaw=-0.25, confidence=0.1, loss_gap=0.02, runner_up={"yaw": 0.3, "pitch": 0.05})
    avg = camera_fit.mirror_average(sure, unsure)  # the search's fields: the less confident fit's, in this frame
    assert (avg["confidence"], avg["loss_gap"], avg["runner_up"]["yaw"]) == (0.1, 0.02, -0.3)
