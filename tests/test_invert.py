"""`gmpi invert` end to end on a tiny generator, a known-answer inversion, Ctrl-C, and every bad input."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from gmpi_lightning import export, inversion
from gmpi_lightning.cli import main as gmpi_main
from gmpi_lightning.errors import InputError
from gmpi_lightning.estimators import FORMAT as ESTIMATOR_FORMAT
from gmpi_lightning.estimators import DepthCNN, PoseCNN
from gmpi_lightning.image_losses import image_loss, psnr_ssim, pyramid_ssim_loss
from gmpi_lightning.inference import load_generator, load_image
from gmpi_lightning.inversion import InvertSettings, invert
from gmpi_lightning.invert_cli import parse_views
from gmpi_lightning.io import save_gmpi_checkpoint
from gmpi_lightning.nn.gmpi import GMPIGenerator
from gmpi_lightning.presets import get_preset
from gmpi_lightning.scene import Scene

PRESET = get_preset("FFHQ256", resolution=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_generator() -> GMPIGenerator:
    torch.manual_seed(0)
    return GMPIGenerator(z_dim=16, c_dim=0, w_dim=16, img_resolution=32, mapping_kwargs=dict(num_layers=2),
                         synthesis_kwargs=dict(channel_base=512, channel_max=32)).eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_gmpi_checkpoint(tmp_path_factory.mktemp("ckpt") / "gmpi.pt", tiny_generator(), PRESET.to_dict())


@torch.no_grad()
def rendered(G, ws, yaw, pitch, planes=PRESET.train_planes):
    scene = Scene(PRESET, planes)
    return scene.render_pose(G.synthesize(ws, scene.planes.normalized), yaw, pitch)


def known_target(G, seed=5, yaw=0.15, pitch=-0.05):
    """An image the generator itself makes from a known latent and camera (8-bit, as a file would hold it)."""
    ws = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(seed)), None)
    rgb = rendered(G, ws, yaw, pitch)["rgb"]
    return ws, (rgb * 255 + 0.5).floor() / 255


def write_png(path, image01):
    iio.imwrite(path, export.to_uint8(image01[0]))
    return path


def test_invert_command_writes_every_output(tiny_ckpt, tmp_path):
    G = load_generator(tiny_ckpt).G
    image = write_png(tmp_path / "in.png", known_target(G)[1])
    out = tmp_path / "out"
    rc = gmpi_main(["invert", "--ckpt", str(tiny_ckpt), "--image", str(image), "--pose", "0.15,-0.05",
                    "--views", "-0.2,0;0.25,0.05;0,0.1", "--video", "--frames", "6", "--mesh", "--steps", "20",
                    "--pti-steps", "5", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    views = json.loads((out / "views.json").read_text())
    assert [(v["yaw"], v["pitch"]) for v in views["views"]] == [(-0.2, 0.0), (0.25, 0.05), (0.0, 0.1)]
    assert [v["image"] for v in views["views"]] == ["view_00.png", "view_01.png", "view_02.png"]
    assert (views["input"]["yaw"], views["input"]["pitch"]) == (0.15, -0.05)
    # every view is the tuned generator's rendering of the saved latent at the camera views.json names
    tuned = load_generator(out / "generator.pt").G
    latent = torch.load(out / "latent.pt", weights_only=True)
    assert latent["ws"].shape == (1, G.num_ws, G.w_dim) and latent["generator"] == "generator.pt"
    assert any(float((a - b).abs().max()) > 0 for a, b in zip(tuned.parameters(), G.parameters()))  # tuned
    for v in views["views"]:
        r = rendered(tuned, latent["ws"], v["yaw"], v["pitch"])
        png = iio.imread(out / v["image"])
        assert png.shape == (32, 32, 3) and np.abs(png.astype(int) - export.to_uint8(r["rgb"][0])).max() <= 1
        assert iio.imread(out / v["depth"]).shape == (32, 32, 3)
    recon = iio.imread(out / "recon.png")
    r = rendered(tuned, latent["ws"], 0.15, -0.05)
    assert np.abs(recon.astype(int) - export.to_uint8(r["rgb"][0])).max() <= 1
    assert np.array_equal(iio.imread(out / "input.png"), iio.imread(image))
    metrics = json.loads((out / "metrics.json").read_text())
    psnr = psnr_ssim(torch.from_numpy(recon).permute(2, 0, 1)[None] / 255.0,
                     torch.from_numpy(iio.imread(image)).permute(2, 0, 1)[None] / 255.0)[0]
    assert metrics["recon_psnr"] == pytest.approx(psnr, abs=0.3)
    assert metrics["stages"]["latent"]["steps"] == 20 and metrics["stages"]["pti"]["steps"] == 5
    assert metrics["pose_source"] == "given" and metrics["settings"]["steps"] == 20 and not metrics["interrupted"]
    frames = iio.imread(out / "yaw.mp4", plugin="pyav")
    assert frames.shape == (6, 32, 64, 3) and np.abs(frames[0].astype(int) - frames[-1]).mean() > 0.5  # it turns
    verts, faces = export.read_ply(out / "mesh.ply")
    assert len(verts) > 10 and faces.max() < len(verts) and metrics["mesh"]["vertices"] == len(verts)
    # gmpi render takes the tuned generator like any checkpoint
    assert gmpi_main(["render", "--ckpt", str(out / "generator.pt"), "--seeds", "0", "--planes", "8",
                      "--yaw", "0", "--out", str(tmp_path / "r"), "--device", "cpu"]) == 0
    # a second, smaller inversion into the same folder leaves none of the first one's files (a stale generator.pt
    # would be rendered with the new latent); a file of the user's own stays
    (out / "notes.txt").write_text("mine")
    assert gmpi_main(["invert", "--ckpt", str(tiny_ckpt), "--image", str(image), "--pose", "0,0", "--views", "0.1,0",
                      "--steps", "2", "--pti-steps", "0", "--out", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["input.png", "latent.pt", "metrics.json", "notes.txt",
                                                     "recon.png", "view_00.png", "view_00_depth.png", "views.json"]


def test_known_answer_inversion_recovers_the_scene():
    """A generator's own image from a known latent and camera inverts back: the reconstruction is near-exact, and
    the recovered scene is the generator's from a *novel* camera too (copying the input scores 17 dB there)."""
    G = tiny_generator()
    ws, target = known_target(G)
    inv = invert(G, PRESET, target, 0.15, -0.05, InvertSettings(steps=200, pti_steps=0))
    truth = rendered(G, ws, -0.3, 0.1)["rgb"]
    recon_psnr, novel_psnr = inv.metrics()["recon_psnr"], psnr_ssim(inv.render(-0.3, 0.1)["rgb"], truth)[0]
    start = rendered(G, inversion.latent_stats(G)[0][:, None].expand(-1, G.num_ws, -1), 0.15, -0.05)["rgb"]
    assert psnr_ssim(start, target)[0] < 10  # where the search starts; measured: 39.6 / 35.1 dB after 200 steps
    assert recon_psnr > 35 and novel_psnr > 30 and psnr_ssim(target, truth)[0] < 20
    assert not inv.tuned and inv.G is G and inv.history["latent"]["steps"] == 200
    G.train().requires_grad_(True)  # the caller's mode and flags survive (only the latent and a copy learn)
    invert(G, PRESET, target, 0.15, -0.05, InvertSettings(steps=2, pti_steps=2))
    assert G.training and all(p.requires_grad and p.grad is None for p in G.parameters())
    G.eval()
    # W+ in the second half: layers differ; W only: one w for all layers
    assert float((inv.ws - inv.ws[:, :1]).abs().max()) > 1e-4
    w_only = invert(G, PRESET, target, 0.15, -0.05, InvertSettings(steps=4, pti_steps=0, w_plus_from=1.0))
    assert float((w_only.ws - w_only.ws[:, :1]).abs().max()) == 0


def test_tuning_regularisers_keep_geometry_and_other_latents():
    """Stage 2 on an image the pivot cannot make (the target mirrored): without regularisers tuning moves the pivot's
    depth at other cameras and the MPIs of other latents; the depth term and the locality term hold each back."""
    G = tiny_generator()
    target = known_target(G)[1].flip(-1)
    others = G.mapping(torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(9)), None)
    planes = Scene(PRESET, PRESET.train_planes).planes.normalized
    cameras = [(-0.4, 0.1), (0.4, -0.1), (0.0, 0.2)]

    def changes(depth_weight, locality_weight):
        inv = invert(G, PRESET, target, 0.15, -0.05, InvertSettings(steps=30, pti_steps=40, pti_lr=2e-3,
                                                                    depth_weight=depth_weight,
                                                                    locality_weight=locality_weight))
        depth = np.mean([float((rendered(inv.G, inv.ws, y, p)["depth"] - rendered(G, inv.ws, y, p)["depth"]).abs()
                               .mean()) for y, p in cameras])
        with torch.no_grad():
            other = float((inv.G.synthesize(others, planes) - G.synthesize(others, planes)).abs().mean())
        return depth, other

    free, with_depth, with_locality = changes(0, 0), changes(10, 0), changes(0, 10)
    assert free[0] > 0.01 and free[1] > 0.05  # measured: 0.034 and 0.087
    assert with_depth[0] < free[0] / 5  # measured: 0.0008
    assert with_locality[1] < free[1] / 2  # measured: 0.034


def test_pyramid_ssim_loss():
    x = torch.rand(2, 3, 32, 32)
    assert float(pyramid_ssim_loss(x, x)) == pytest.approx(0, abs=1e-5)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    assert float(pyramid_ssim_loss(x, y)) > 0.05 and float(pyramid_ssim_loss(x, blurred)) > 0.05
    y.requires_grad_(True)
    image_loss(y, x).backward()
    assert float(y.grad.abs().sum()) > 0


def test_ctrl_c_keeps_the_best_step(monkeypatch):
    """KeyboardInterrupt in either stage ends it and returns the best state seen, not the last or nothing."""
    G = tiny_generator()
    target = known_target(G)[1]
    seen, real = [], inversion.image_loss

    def loss_then_interrupt(pred, tgt, w):
        if len(seen) == 12:
            raise KeyboardInterrupt
        value = real(pred, tgt, w)
        seen.append(value.item())
        return value

    monkeypatch.setattr(inversion, "image_loss", loss_then_interrupt)
    inv = invert(G, PRESET, target, 0.15, -0.05, InvertSettings(steps=50, pti_steps=10, noise=0.0))
    monkeypatch.setattr(inversion, "image_loss", real)
    assert inv.interrupted and not inv.tuned and inv.history["latent"]["steps"] == 12
    assert inv.history["latent"]["best_loss"] == pytest.approx(min(seen), rel=1e-6)
    # the kept latent is the one that scored best: rendering it gives that loss again
    again = float(real(rendered(G, inv.ws, 0.15, -0.05)["rgb"], target, 1.0))
    assert again == pytest.approx(min(seen), rel=1e-4) and min(seen) < seen[0]
    # stage 2 interrupted: the tuned copy is kept at its best state, G itself never changes
    before = [p.clone() for p in G.parameters()]
    seen.clear()
    calls = {"n": 0}

    def interrupt_in_pti(pred, tgt, w):
        calls["n"] += 1
        if calls["n"] == 10 + 4:  # 10 latent steps, then the 4th tuning step
            raise KeyboardInterrupt
        return real(pred, tgt, w)

    monkeypatch.setattr(inversion, "image_loss", interrupt_in_pti)
    inv = invert(G, PRESET, target, 0.15, -0.05, InvertSettings(steps=10, pti_steps=10, pti_lr=1e-3))
    assert inv.interrupted and inv.tuned and inv.history["pti"]["steps"] == 3
    assert all(torch.equal(a, b) for a, b in zip(before, G.parameters()))


def test_command_writes_the_best_result_when_interrupted(tiny_ckpt, tmp_path, monkeypatch):
    G = load_generator(tiny_ckpt).G
    image = write_png(tmp_path / "in.png", known_target(G)[1])
    real, calls = inversion.image_loss, {"n": 0}

    def interrupt(pred, tgt, w):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(pred, tgt, w)

    monkeypatch.setattr(inversion, "image_loss", interrupt)
    out = tmp_path / "out"
    assert gmpi_main(["invert", "--ckpt", str(tiny_ckpt), "--image", str(image), "--pose", "0,0", "--steps", "50",
                      "--out", str(out), "--device", "cpu"]) == 130
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] and metrics["stages"]["latent"]["steps"] == 5 and "pti" not in metrics["stages"]
    assert (out / "recon.png").is_file() and (out / "latent.pt").is_file() and not (out / "generator.pt").exists()


def test_a_mesh_that_cannot_be_made_is_one_warning(tiny_ckpt, tmp_path, monkeypatch, capsys):
    G = load_generator(tiny_ckpt).G
    image = write_png(tmp_path / "in.png", known_target(G)[1])

    def no_surface(*args, **kwargs):
        raise InputError("the alpha volume never crosses the iso-level 0.5")

    monkeypatch.setattr(export, "extract_mesh", no_surface)
    out = tmp_path / "out"
    assert gmpi_main(["invert", "--ckpt", str(tiny_ckpt), "--image", str(image), "--pose", "0,0", "--steps", "2",
                      "--pti-steps", "0", "--mesh", "--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["warnings"] == ["no mesh: the alpha volume never crosses the iso-level 0.5"]
    assert "mesh" not in metrics and not list(out.glob("mesh*"))
    assert capsys.readouterr().err.count("no mesh:") == 1

def test_pose_from_the_estimator_or_the_preset_mean(tiny_ckpt, tmp_path, capsys):
    """--estimators: the pose CNN's reading (clamped into the prior) starts the camera; --pose-init mean: the preset's
    mean (the search without --pose: tests/test_pose_search.py)."""
    G = load_generator(tiny_ckpt).G
    image = write_png(tmp_path / "in.png", known_target(G)[1])
    # a pose "estimator" whose answer is known: zero head weights, so it returns its pose_mean buffer
    pose = PoseCNN(input_size=32)
    torch.nn.init.zeros_(pose.head[-1].weight)
    torch.nn.init.zeros_(pose.head[-1].bias)
    pose.pose_mean.copy_(torch.tensor([0.2, 0.05]))
    est = tmp_path / "est.pt"
    torch.save({"format": ESTIMATOR_FORMAT, "pose": {"kwargs": pose.kwargs(), "state_dict": pose.state_dict()},
                "depth": {"kwargs": DepthCNN(32).kwargs(), "state_dict": DepthCNN(32).state_dict()}}, est)
    out = tmp_path / "est_out"
    assert gmpi_main(["invert", "--ckpt", str(tiny_ckpt), "--image", str(image), "--estimators", str(est),
                      "--steps", "1", "--pti-steps", "0", "--out", str(out), "--device", "cpu"]) == 0
    views = json.loads((out / "views.json").read_text())
    assert (views["input"]["yaw"], views["input"]["pitch"]) == pytest.approx((0.2, 0.05), abs=1e-6)
    assert json.loads((out / "metrics.json").read_text())["pose_source"].startswith("estimated")
    # an estimate outside the prior is clamped into it, with a warning
    pose.pose_mean.copy_(torch.tensor([2.0, 0.0]))
    torch.save({"format": ESTIMATOR_FORMAT, "pose": {"kwargs": pose.kwargs(), "state_dict": pose.state_dict()},
                "depth": {"kwargs": DepthCNN(32).kwargs(), "state_dict": DepthCNN(32).state_dict()}}, est)
    assert gmpi_main(["invert", "--ckpt", str(tiny_ckpt), "--image", str(image), "--estimators", str(est),
                      "--steps", "1", "--pti-steps", "0", "--out", str(out), "--device", "cpu"]) == 0
    assert "clamped" in capsys.readouterr().err
    yaw_max = PRESET.yaw_mean + PRESET.n_truncated_stds * PRESET.yaw_std
    assert json.loads((out / "views.json").read_text())["input"]["yaw"] == pytest.approx(yaw_max)
    # the preset's mean on request; a pose CNN on request where there is none is a clear error
    out = tmp_path / "mean_out"
    assert gmpi_main(["invert", "--ckpt", str(tiny_ckpt), "--image", str(image), "--steps", "1", "--pti-steps", "0",
                      "--pose-init", "mean", "--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pose_source"] == "preset mean" and metrics["camera"]["start"] == [0.0, 0.0]
    assert gmpi_main(["invert", "--ckpt", str(tiny_ckpt), "--image", str(image), "--steps", "1", "--pti-steps", "0",
                      "--pose-init", "cnn", "--out", str(tmp_path / "cnn_out"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "--pose-init cnn needs a pose estimator" in err and "--estimators FILE" in err
    assert not (tmp_path / "cnn_out").exists()


def test_non_square_and_wrong_size_images(tiny_ckpt, tmp_path, capsys):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)  # 48 wide, 32 high
    iio.imwrite(tmp_path / "wide.png", wide)
    args = ["invert", "--ckpt", str(tiny_ckpt), "--pose", "0,0", "--steps", "1", "--pti-steps", "0", "--device", "cpu"]
    assert gmpi_main([*args, "--image", str(tmp_path / "wide.png"), "--no-crop", "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "wide.png" in err and "not square" in err and "--no-crop" in err and not (tmp_path / "a").exists()
    assert gmpi_main([*args, "--image", str(tmp_path / "wide.png"), "--out", str(tmp_path / "b")]) == 0
    assert "centre-cropped to 32 x 32" in capsys.readouterr().err
    assert np.array_equal(iio.imread(tmp_path / "b" / "input.png"), wide[:, 8:40])  # the centre, unchanged
    # twice the resolution: resized (area-like) to the generator's, with a warning
    big = np.kron(wide[:, 8:40], np.ones((2, 2, 1), np.uint8))  # each pixel a 2 x 2 block
    iio.imwrite(tmp_path / "big.png", big)
    assert gmpi_main([*args, "--image", str(tmp_path / "big.png"), "--out", str(tmp_path / "c")]) == 0
    assert "64 x 64 resized to the generator's 32 x 32" in capsys.readouterr().err
    assert np.abs(iio.imread(tmp_path / "c" / "input.png").astype(int) - wide[:, 8:40]).max() <= 1
    # grey and RGBA files become RGB, with a warning
    notes = []
    iio.imwrite(tmp_path / "grey.png", wide[:, 8:40, 0])
    x = export.to_uint8(load_image(tmp_path / "grey.png", 32, warn=notes.append)[0])
    assert (x == wide[:, 8:40, :1]).all() and "grey" in notes[0]
    iio.imwrite(tmp_path / "rgba.png", np.concatenate([wide[:, 8:40], wide[:, 8:40, :1]], axis=-1))
    x = load_image(tmp_path / "rgba.png", 32, warn=notes.append)
    assert np.array_equal(export.to_uint8(x[0]), wide[:, 8:40]) and "alpha channel" in notes[1] and len(notes) == 2


def test_every_image_mode_is_read_as_its_colours(tmp_path):
    """16-bit grey scaled (not clipped to white), CMYK and palette files as the colours they show, never channel by
    channel, and a photo with an EXIF orientation upright; the training data's converter (``decode_image``) reads
    each the same way."""
    from PIL import Image

    from datamodules.shards import decode_image

    yy, xx = np.mgrid[0:32, 0:32]
    smooth = np.stack([yy * 8, xx * 8, (yy + xx) * 4], -1).astype(np.uint8)  # JPEG keeps a smooth image close
    grey16 = (yy * 2000 + xx * 40).astype(np.uint16)  # up to 63,240 of 65,535
    turned = Image.fromarray(np.rot90(smooth))  # stored a quarter-turn left, its EXIF says: turn it right
    exif = turned.getexif()
    exif[0x0112] = 6
    files = {"grey16.png": Image.fromarray(grey16), "cmyk.jpg": Image.fromarray(smooth).convert("CMYK"),
             "palette.png": Image.fromarray(smooth).quantize(256), "rgb.png": Image.fromarray(smooth),
             "portrait.jpg": turned}
    expect16 = np.round(grey16 / 257.0).astype(int)
    for name, im in files.items():
        im.save(tmp_path / name, **({"quality": 98} if name.endswith(".jpg") else {}),
                **({"exif": exif.tobytes()} if name == "portrait.jpg" else {}))
        got = export.to_uint8(load_image(tmp_path / name, 32, warn=lambda m: None)[0]).astype(int)
        again = decode_image((tmp_path / name).read_bytes(), name).astype(int)
        assert np.array_equal(got, again), name  # both readers agree
        if name == "grey16.png":
            assert np.abs(got - expect16[..., None]).max() <= 1 and got.max() == 246
        elif name == "palette.png":  # the palette's colours (its indices read as grey would be far off)
            assert np.array_equal(got, np.asarray(im.convert("RGB"))) and np.abs(got - smooth).mean() < 5
        else:
            assert np.abs(got - smooth).mean() < 3, name  # CMYK as RGB + alpha, or a sideways photo: ~50-128 off
    with pytest.raises(InputError, match="2 frames"):
        frames = [Image.fromarray(smooth), Image.fromarray(255 - smooth)]
        frames[0].save(tmp_path / "two.gif", save_all=True, append_images=frames[1:])
        load_image(tmp_path / "two.gif", 32)


def test_bad_inputs_are_clear_errors(tiny_ckpt, sg2_fixture, tmp_path, capsys):
    G = load_generator(tiny_ckpt).G
    image = write_png(tmp_path / "in.png", known_target(G)[1])
    base = ["invert", "--steps", "1", "--pti-steps", "0", "--device", "cpu", "--out", str(tmp_path / "o")]

    def fails(*args) -> str:
        assert gmpi_main([*base, *args]) == 1
        return capsys.readouterr().err

    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    err = fails("--ckpt", str(tiny_ckpt), "--image", str(not_image))
    assert "notes.png" in err and "cannot read it as an image" in err and "PNG or JPEG" in err
    assert "image not found" in fails("--ckpt", str(tiny_ckpt), "--image", str(tmp_path / "none.png"))
    err = fails("--ckpt", str(tiny_ckpt), "--image", str(image), "--pose", "0.9,0")
    assert "outside the FFHQ256 preset's camera range" in err and "yaw -0.578..0.578" in err
    assert "cannot parse pose" in fails("--ckpt", str(tiny_ckpt), "--image", str(image), "--pose", "0.1")
    err = fails("--ckpt", str(tiny_ckpt), "--image", str(image), "--pose", "0,0", "--views", "0,0;1.2,0")
    assert "view 1 (yaw 1.2, pitch 0.0)" in err and "past the edge of the MPI" in err
    err = fails("--ckpt", str(sg2_fixture / "network-snapshot-000000.pkl"), "--image", str(image))
    assert "network-snapshot-000000.pkl" in err and "not a GMPI one" in err
    text = tmp_path / "weights.pt"
    text.write_text("hello")
    err = fails("--ckpt", str(text), "--image", str(image))
    assert "weights.pt: not a GMPI generator checkpoint" in err
    assert "checkpoint not found" in fails("--ckpt", str(tmp_path / "none.pt"), "--image", str(image))
    assert not (tmp_path / "o").exists()  # nothing written for a refused input
    with pytest.raises(ValueError, match="no views"):
        parse_views(" ; ")
    with pytest.raises(ValueError, match="steps"):
        InvertSettings(steps=0)
