"""`gmpi render` end to end, media writers and mesh extraction."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from gmpi_lightning import export
from gmpi_lightning.cli import main as gmpi_main
from gmpi_lightning.commands import parse_seeds
from gmpi_lightning.inference import load_generator
from gmpi_lightning.io import save_gmpi_checkpoint
from gmpi_lightning.nn.alpha import ALPHA_MODES
from gmpi_lightning.nn.gmpi import GMPIGenerator
from gmpi_lightning.presets import get_preset
from gmpi_lightning.scene import seed_latents
from tests.conftest import max_err


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    G = GMPIGenerator(z_dim=16, c_dim=0, w_dim=16, img_resolution=32, mapping_kwargs=dict(num_layers=2),
                      synthesis_kwargs=dict(channel_base=512, channel_max=32))
    path = tmp_path_factory.mktemp("ckpt") / "gmpi.pt"
    return save_gmpi_checkpoint(path, G, preset=get_preset("FFHQ256", resolution=32).to_dict())


def test_render_command_writes_every_output(small_ckpt, tmp_path):
    out = tmp_path / "out"
    rc = gmpi_main(["render", "--ckpt", str(small_ckpt), "--seeds", "1-2", "--planes", "24", "--yaw=-0.3,0.3",
                    "--pitch", "0.1", "--video", "--frames", "6", "--mesh", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    for seed in (1, 2):
        for v in (0, 1):
            rgb = iio.imread(out / f"seed{seed:04d}_view{v:02d}.png")
            depth = iio.imread(out / f"seed{seed:04d}_view{v:02d}_depth.png")
            assert rgb.shape == (32, 32, 3) and depth.shape == (32, 32, 3) and rgb.std() > 1
        strip = iio.imread(out / f"seed{seed:04d}_planes.png")
        assert strip.shape == (32, 32 * 8, 4)
        frames = iio.imread(out / f"seed{seed:04d}_yaw.mp4", plugin="pyav")
        assert frames.shape == (6, 32, 64, 3)
        verts, faces = export.read_ply(out / f"seed{seed:04d}_mesh.ply")
        assert len(verts) > 10 and faces.max() < len(verts)
    # the two views differ (parallax), and the seed decides the image
    a, b = (iio.imread(out / f"seed0001_view{v:02d}.png").astype(float) for v in (0, 1))
    assert np.abs(a - b).mean() > 0.5
    c = iio.imread(out / "seed0002_view00.png").astype(float)
    assert np.abs(a - c).mean() > 1


def test_render_matches_the_python_api(small_ckpt, tmp_path):
    out = tmp_path / "o"
    assert gmpi_main(["render", "--ckpt", str(small_ckpt), "--seeds", "5", "--planes", "16", "--yaw", "0.2",
                      "--pitch", "-0.1", "--out", str(out), "--device", "cpu"]) == 0
    loaded = load_generator(small_ckpt)
    preset = loaded.preset
    from gmpi_lightning import cameras, render
    from gmpi_lightning.planes import preset_planes

    planes = preset_planes(preset, 16)
    with torch.no_grad():
        mpi = loaded.G(seed_latents([5], 16), None, planes.normalized)
        img = render.render_mpi(mpi, planes.depths, planes.extents,
                                cameras.sphere_c2w(0.2, -0.1, 1.0, 1.0), preset.fov_deg, 32, 32)["rgb"][0]
    assert max_err(iio.imread(out / "seed0005_view00.png"), export.to_uint8(img)) <= 1


def test_stylegan2_pickle_renders_as_flat_billboard(sg2_fixture, tmp_path):
    loaded = load_generator(sg2_fixture / "network-snapshot-000000.pkl")
    assert loaded.kind == "stylegan2-flat"
    codes = get_preset("FFHQ256").normalized_plane_depths(8)
    z = torch.randn(2, 64)
    with torch.no_grad():
        mpi = loaded.G(z, None, codes)
        img = loaded.G.G(z, None, noise_mode="const")
    assert bool((mpi[:, 0, 3] == 1).all()) and float(mpi[:, 1:].abs().max()) == 0
    assert max_err(mpi[:, 0, :3], ((img + 1) / 2).clamp(0, 1)) < 1e-6


def test_render_errors_are_clear(small_ckpt, tmp_path, capsys):
    assert gmpi_main(["render", "--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path)]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    # a camera far outside the prior leaves the MPI: an explanation, not a crash or a silent render
    assert gmpi_main(["render", "--ckpt", str(small_ckpt), "--seeds", "0", "--planes", "8", "--yaw", "0.9",
                      "--out", str(tmp_path / "x"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "rays leave the background plane" in err and "--allow-outside" in err
    args = ["render", "--ckpt", str(small_ckpt), "--out", str(tmp_path / "y"), "--device", "cpu"]
    assert gmpi_main([*args, "--seeds", "0", "--planes", "0"]) == 1
    assert "at least 2 planes, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the parser's own type check: a usage error naming the value
        gmpi_main([*args, "--seeds", "4294967296"])
    assert "'4294967296': a seed must be in 0 .. 2**32 - 1" in capsys.readouterr().err
    assert gmpi_main([*args, "--seeds", "0", "--resolution", "0"]) == 1  # not taken for "the generator's"
    assert "resolution must be a positive number of pixels, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="parse seeds"):
        parse_seeds("a-b")
    with pytest.raises(ValueError, match="1, 3 listed more than once"):  # would render (or train) the same twice
        parse_seeds("0-3,1,3")
    with pytest.raises(ValueError, match="2 listed more than once"):
        parse_seeds([2, 2])
    with pytest.raises(ValueError, match=r"must be in 0 \.\. 2\*\*32 - 1"):
        parse_seeds([-1])
    assert parse_seeds("0-2,7") == (0, 1, 2, 7)


def test_mesh_of_a_known_surface():
    """A generator whose alpha is a step in depth yields a mesh at that depth."""

    class Step(torch.nn.Module):
        img_resolution, z_dim = 16, 4

        def forward(self, z, c, codes, opaque_background=None, **kw):
            n = codes.numel()
            mpi = torch.zeros(1, n, 4, 16, 16)
            mpi[:, :, :3] = 0.5
            mpi[:, :, 3] = (codes >= 0.5).float()[None, :, None, None]  # opaque from the middle depth on
            return mpi

    preset = get_preset("FFHQ256", resolution=16)
    verts, faces, colors = export.extract_mesh(Step(), torch.zeros(1, 4), preset, (0.2473, 0.2473), grid=64)
    mid = preset.near + 0.5 * (preset.far - preset.near)
    front = verts[np.abs(verts[:, 0]) < 0.05]
    assert abs(float(np.median(front[:, 2])) - mid) < 0.01
    assert bool((colors == 128).all())
    Step.alpha = ALPHA_MODES["vanilla"]  # only its training planes: no dense volume to mesh
    with pytest.raises(ValueError, match="vanilla alpha branch"):
        export.extract_mesh(Step(), torch.zeros(1, 4), preset, (0.2473, 0.2473), grid=64)


def test_mesh_volume_is_the_largest_non_background_plane():
    extents = torch.tensor([[0.20, 0.21], [0.24, 0.25], [0.30, 0.32], [9.0, 9.0]])  # the last: the background
    assert export.mesh_extent(extents).tolist() == pytest.approx([0.30, 0.32])
    assert export.mesh_extent(extents[:1]).tolist() == pytest.approx([0.20, 0.21])


def test_depth_colour_and_strip_helpers():
    depth = torch.tensor([[[1.0, 2.0]]])
    col = export.depth_to_color(depth, 1.0, 2.0)
    assert col.shape == (1, 2, 3) and not np.array_equal(col[0, 0], col[0, 1])
    black = export.depth_to_color(depth, 1.0, 2.0, coverage=torch.zeros(1, 1, 2))
    assert int(black.max()) == 0
    poses = export.sweep_poses("yaw", 5)
    assert poses[0] == (0.5, 0.0) and poses[-1] == (-0.5, 0.0)
    with pytest.raises(ValueError, match="trajectory"):
        export.sweep_poses("spiral", 3)
