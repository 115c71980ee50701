"""`gmpi export-web` (gmpi_lightning/web): the page in headless Chromium against `gmpi render`, the data format, the
budget, and the hooks (`gmpi render --web`, the WebViewer media callback, wandb.Html).

The browser tests run in the default suite where Chromium is installed (Debian's package; .ci/run installs it) and
are `slow` (and skip) where it is not."""

from __future__ import annotations

import base64
import io
import json
import zlib
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from gmpi_lightning.cli import main as gmpi_main
from gmpi_lightning.hparams import Architecture, Views
from gmpi_lightning.io import save_gmpi_checkpoint
from gmpi_lightning.nn.gmpi import GMPIGenerator
from gmpi_lightning.planes import preset_planes
from gmpi_lightning.presets import get_preset
from gmpi_lightning.web import MAX_TEXELS, ViewerWriter, check_budget, pack_mpi, single_file_html
from tests.browser import Chromium, find_chromium

RES = 32
PLANES = 24
MAD_LIMIT = 3.0  # grey levels (of 255) per channel: the acceptance bar
CHROMIUM = find_chromium()


def browser_test(fn):
    """In the default suite where Chromium is installed; elsewhere `slow` (deselected by default) and skipped."""
    fn = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium and chromedriver on PATH (apt-get install chromium "
                                                     "chromium-driver)")(fn)
    return pytest.mark.slow(fn) if CHROMIUM is None else fn


# (seed, yaw, pitch, page size): the texture is 32 px; 48 and 64 px pages magnify it (texel mapping, borders)
CAMERAS = [(1, 0.0, 0.0, 32), (1, 0.35, -0.15, 48), (2, -0.55, 0.24, 64)]


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    G = GMPIGenerator(z_dim=16, c_dim=0, w_dim=16, img_resolution=RES, mapping_kwargs=dict(num_layers=2),
                      synthesis_kwargs=dict(channel_base=512, channel_max=32))
    path = tmp_path_factory.mktemp("ckpt") / "gmpi.pt"
    return save_gmpi_checkpoint(path, G, preset=get_preset("FFHQ256", resolution=RES).to_dict())


@pytest.fixture(scope="module")
def page(small_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("web") / "viewer"
    assert gmpi_main(["export-web", "--ckpt", str(small_ckpt), "--seeds", "1-2", "--planes", str(PLANES),
                      "--out", str(out), "--device", "cpu"]) == 0
    return out


def rendered(ckpt, tmp_path, seed, yaw, pitch, size) -> tuple[np.ndarray, np.ndarray]:
    """`gmpi render`'s view and colour-mapped depth of one camera."""
    out = tmp_path / f"render_{seed}_{yaw}_{pitch}_{size}"
    assert gmpi_main(["render", "--ckpt", str(ckpt), "--seeds", str(seed), "--planes", str(PLANES), f"--yaw={yaw}",
                      f"--pitch={pitch}", "--resolution", str(size), "--out", str(out), "--device", "cpu"]) == 0
    return (iio.imread(out / f"seed{seed:04d}_view00.png").astype(np.float64),
            iio.imread(out / f"seed{seed:04d}_view00_depth.png").astype(np.float64))


def shot(browser: Chromium, url: str, size: int) -> np.ndarray:
    browser.open(url, size, size + 80)  # room for the controls below the canvas
    return iio.imread(io.BytesIO(browser.screenshot(0, 0, size, size)))[..., :3].astype(np.float64)


# ------------------------------------------------------------------------------------------ in the browser
@browser_test
def test_page_matches_gmpi_render_in_headless_chromium(page, small_ckpt, tmp_path):
    figures = []
    with Chromium() as browser:
        for seed, yaw, pitch, size in CAMERAS:
            want_rgb, want_depth = rendered(small_ckpt, tmp_path, seed, yaw, pitch, size)
            url = f"{(page / 'index.html').as_uri()}?seed={seed}&yaw={yaw}&pitch={pitch}&size={size}"
            got_rgb = shot(browser, url, size)
            got_depth = shot(browser, url + "&mode=depth", size)
            assert browser.evaluate("window.gmpiViewer.view") == dict(seed=seed, yaw=yaw, pitch=pitch, mode="depth",
                                                                      size=size)
            assert got_rgb.shape == want_rgb.shape == (size, size, 3)
            mad_rgb = np.abs(got_rgb - want_rgb).mean((0, 1))
            mad_depth = np.abs(got_depth - want_depth).mean((0, 1))
            figures.append((seed, yaw, pitch, size, mad_rgb.max(), mad_depth.max(),
                            np.abs(got_rgb - want_rgb).max(), np.abs(got_depth - want_depth).max()))
            assert mad_rgb.max() <= MAD_LIMIT and mad_depth.max() <= MAD_LIMIT, figures[-1]
            assert want_rgb.std() > 2 and np.abs(want_rgb - want_depth).mean() > 10  # real pictures, distinct
        assert browser.console() == []
    for seed, yaw, pitch, size, rgb, depth, rgb_max, depth_max in figures:
        print(f"seed {seed} yaw {yaw:+.2f} pitch {pitch:+.2f} {size} px: MAD rgb {rgb:.3f} depth {depth:.3f} "
              f"(max |diff| {rgb_max:.0f}, {depth_max:.0f}) of 255")
    # the cameras differ enough that a page ignoring the URL would fail: views of seed 1 from two poses
    a, b = (rendered(small_ckpt, tmp_path, 1, y, p, 32)[0] for y, p in ((0.0, 0.0), (0.35, -0.15)))
    assert np.abs(a - b).mean() > 4 * MAD_LIMIT


@browser_test
def test_page_reports_errors_fps_and_clamps_the_pose(page):
    with Chromium() as browser:
        with pytest.raises(Exception, match="seed 7 is not in this page"):
            browser.open(f"{(page / 'index.html').as_uri()}?seed=7", 64, 64, timeout=20)
        browser.open(f"{(page / 'index.html').as_uri()}?seed=2&yaw=3&pitch=-3", 64, 64)
        view = browser.evaluate("window.gmpiViewer.view")
        preset = get_preset("FFHQ256")
        assert view["yaw"] == pytest.approx(2 * preset.yaw_std)
        assert view["pitch"] == pytest.approx(-2 * preset.pitch_std)
        assert "clamped" in browser.evaluate("document.getElementById('message').textContent")
        frames = browser.evaluate("new Promise(r => setTimeout(() => r(window.gmpiViewer.frames), 1200))")
        assert frames > 3 and browser.evaluate("window.gmpiViewer.fps") > 0  # it keeps drawing; FPS read-out
        assert "fps" in browser.evaluate("document.getElementById('fps').textContent")
        # the single-file page (what wandb.Html uploads) draws the same picture
        single = page.parent / "single.html"
        single.write_text(single_file_html(page))
        url = "?seed=1&yaw=0.2&pitch=0.1"
        a = shot(browser, (page / "index.html").as_uri() + url, 32)
        b = shot(browser, single.as_uri() + url, 32)
        assert np.array_equal(a, b)


@browser_test
def test_small_pages_are_shown_large_with_nearest_upscaling(page):
    """A 32 px page in a 900 x 700 window is shown at the largest whole multiple that fits above the controls
    (20 x: 640 px), each drawn pixel an exact block: the block centres are the 1:1 picture. Rules out leaving it at
    32 px in the corner, smoothing the upscale (blocks would blur), and drawing more pixels instead of showing them
    larger (the picture would no longer be gmpi render's at the page's size)."""
    url = f"{(page / 'index.html').as_uri()}?seed=1&yaw=0.2&pitch=-0.1"
    with Chromium() as browser:
        one = shot(browser, url, 32)
        assert browser.evaluate("window.gmpiViewer.shown") == 32  # a window too small to enlarge: 1:1
        browser.open(url, 900, 700)
        shown = browser.evaluate("window.gmpiViewer.shown")
        assert shown == 640 and browser.evaluate("document.getElementById('view').width") == 32
        big = iio.imread(io.BytesIO(browser.screenshot(0, 0, shown, shown)))[..., :3].astype(np.float64)
        panel_top = browser.evaluate("document.getElementById('panel').getBoundingClientRect().top")
    scale = shown // 32
    assert np.array_equal(big[scale // 2::scale, scale // 2::scale], one) and panel_top == shown
    blocks = big.reshape(32, scale, 32, scale, 3)
    assert np.abs(blocks - blocks[:, :1, :, :1]).max() == 0  # every block one colour: nearest, not bilinear


# ------------------------------------------------------------------------------------------ no browser needed
def test_folder_format_and_shared_colour_layers(page):
    names = sorted(p.name for p in page.iterdir())
    assert names == ["index.html", "manifest.js", "seed0001.js", "seed0002.js", "viewer.js"]
    for name in ("viewer.js", "index.html"):  # nothing from the network, no CDN, no fetch (blocked on file://)
        text = (page / name).read_text()
        assert "http://" not in text and "https://" not in text and "fetch(" not in text
    seed_js = (page / "seed0001.js").read_text()
    entry = json.loads(seed_js.split("= ", 2)[-1].rstrip(";\n"))
    raw = zlib.decompress(base64.b64decode(entry["data"]))
    # GMPI: every plane but the background shares one colour image; alpha 16 bit per plane
    assert entry["rgb_layers"] == 2 and entry["rgb_index"] == [0] * (PLANES - 1) + [1]
    assert len(raw) == PLANES * RES * RES * 2 + 2 * 3 * RES * RES


def test_pack_round_trip_and_exactness():
    torch.manual_seed(0)
    mpi = torch.rand(5, 4, 8, 8)
    mpi[1:3, :3] = mpi[0, :3]  # planes 0-2 share a colour layer
    entry = pack_mpi(mpi)
    assert entry["rgb_index"] == [0, 0, 0, 1, 2] and entry["rgb_layers"] == 3
    raw = zlib.decompress(base64.b64decode(entry["data"]))
    alpha = np.frombuffer(raw[:5 * 64 * 2], "<u2").reshape(5, 8, 8) / 65535
    rgb = np.frombuffer(raw[5 * 64 * 2:], np.uint8).reshape(3, 3, 8, 8) / 255
    assert np.abs(alpha - mpi[:, 3].numpy()).max() <= 0.5 / 65535 + 1e-9
    assert np.abs(rgb[[0, 0, 0, 1, 2]] - mpi[:, :3].numpy()).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="L x 4 x T x T"):
        pack_mpi(torch.rand(1, 5, 4, 8, 8))


def test_budget_refuses_96_planes_at_512_unless_forced(small_ckpt, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--planes 64 or fewer, or --resolution 418 or less.*--force"):
        check_budget(4, 96, 512)
    line = check_budget(4, 96, 512, force=True)
    assert "4 seed(s) x 96 planes at 512 px" in line and "MB on disk" in line
    assert check_budget(1, 96, 256) and 64 * 512 ** 2 <= MAX_TEXELS < 96 * 512 ** 2
    # the CLI prints the estimate first and writes nothing when it refuses
    out = tmp_path / "big"
    assert gmpi_main(["export-web", "--ckpt", str(small_ckpt), "--seeds", "0", "--planes", str(MAX_TEXELS // RES ** 2
                      + 1), "--out", str(out), "--device", "cpu"]) == 1
    assert "too heavy for a web page" in capsys.readouterr().err and not out.exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert gmpi_main(["export-web", "--ckpt", str(small_ckpt), "--seeds", "0", "--planes", "4", "--out", str(taken),
                      "--device", "cpu"]) == 1
    assert "holds no viewer" in capsys.readouterr().err


def test_render_web_flag_and_media_callback_write_the_page(small_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "r"
    assert gmpi_main(["render", "--ckpt", str(small_ckpt), "--seeds", "3", "--planes", "8", "--yaw", "0",
                      "--resolution", "40", "--web", "--out", str(out), "--device", "cpu"]) == 0
    manifest = (out / "web" / "manifest.js").read_text()
    assert '"seeds":[3]' in manifest and '"resolution":40' in manifest and '"texture_resolution":32' in manifest
    # the media callback: the run's folder, and wandb.Html (one file, every script inline) to a W&B logger
    from callbacks.media import WebViewer
    from gmpi_lightning.module import GMPIModule

    module = GMPIModule(preset="synthetic32", resolution=16, train_planes=6, views=Views(per_z=2), max_iters=3,
                        arch=Architecture(z_dim=16, w_dim=16, mapping_layers=2, channel_base=256, channel_max=16))
    module.iteration = 5
    logged = []

    class FakeWandb:
        def log_metrics(self, metrics, step):
            logged.append((metrics, step))

    monkeypatch.setattr("callbacks.media.wandb_loggers", lambda trainer: [FakeWandb()])
    trainer = SimpleNamespace(is_global_zero=True, loggers=[], default_root_dir=str(tmp_path), global_step=10)
    files = WebViewer(seeds=[0, 1]).run(trainer, module)
    assert files == [tmp_path / "media" / "web_it000005" / "index.html"]
    assert sorted(p.name for p in files[0].parent.glob("seed*.js")) == ["seed0000.js", "seed0001.js"]
    (metrics, step), = logged
    html = metrics["media/web"].html
    assert step == 10 and '<script src="' not in html and "GMPI_SEEDS[1]" in html and "GMPI_MANIFEST" in html


def test_viewer_writer_checks_what_it_is_given(tmp_path):
    preset = get_preset("FFHQ256", resolution=16)
    planes = preset_planes(preset, 4)
    page = ViewerWriter(tmp_path / "w", preset, planes, 16, 16, [0, 1], verbose=False)
    with pytest.raises(ValueError, match="3 planes, the page has 4"):
        page.add(0, torch.rand(3, 4, 16, 16))
    page.add(0, torch.rand(4, 4, 32, 32))  # resampled to the texture size
    with pytest.raises(ValueError, match=r"seeds \[1\] were announced"):
        page.close()
