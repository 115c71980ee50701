"""Cameras, pose converters, plane geometry and presets: parity with the official geometry and invariants."""

import json
import math

import numpy as np
import pytest
import torch

from gmpi_lightning import cameras as C
from gmpi_lightning.errors import InputError
from gmpi_lightning.planes import make_plane_depths, normalize_depths, plane_extents, preset_planes, texel_xyz
from gmpi_lightning.presets import PRESETS, get_preset
from tests.conftest import max_err

TOL = 1e-4


@pytest.fixture(scope="module")
def cam_refs():
    from tests.conftest import fixture_dir

    return json.loads((fixture_dir("camera") / "camera_refs.json").read_text())


def test_deep3dface_conversion_parity(cam_refs):
    for rec in cam_refs["ffhq_deep3dface"]:
        w2c = C.w2c_from_deep3dface(rec["angle"], rec["trans"], 1.0, 1.0)[0]
        raw = C.w2c_from_deep3dface(rec["angle"], rec["trans"], 1.0, 1.0, normalize_trans=False)[0]
        assert max_err(w2c, rec["w2c"]) <= TOL and max_err(w2c.reshape(16), rec["w2c_flat16"]) <= TOL
        assert max_err(raw, rec["w2c_no_normalize_trans"]) <= TOL
        yaw, pitch = C.yaw_pitch_from_w2c(w2c, 1.0)
        assert max_err(yaw, [rec["yaw_from_w2c"]]) <= TOL and max_err(pitch, [rec["pitch_from_w2c"]]) <= TOL
        dy, dp = C.deep3dface_dataset_angles(rec["angle"])
        assert max_err(dy, [rec["dataset_yaw"]]) == 0 and max_err(dp, [rec["dataset_pitch"]]) == 0
        # the real camera is placed exactly on the training sphere
        centre = -(w2c[:3, :3].T @ w2c[:3, 3])
        assert abs(float((centre - torch.tensor([0, 0, 1.0])).norm()) - 1.0) < 1e-5


def test_eg3d_label_conversion_parity(cam_refs):
    for rec in cam_refs["afhq_eg3d"]:
        w2c = C.w2c_from_eg3d_label([rec["label25"]], 2.7, 2.7)[0]
        assert max_err(w2c, rec["w2c"]) <= TOL
        assert max_err(C.w2c_from_eg3d_label([rec["label25"]], 2.7, 2.7, normalize_trans=False)[0],
                       rec["w2c_no_normalize_trans"]) <= TOL
        yaw, pitch = C.yaw_pitch_from_w2c(w2c, 2.7)
        assert max_err(yaw, [rec["yaw_from_w2c"]]) <= TOL and max_err(pitch, [rec["pitch_from_w2c"]]) <= TOL
    with pytest.raises(ValueError, match="25 numbers"):
        C.w2c_from_eg3d_label(torch.zeros(1, 12), 2.7, 2.7)


def test_sphere_sampler_parity(cam_refs):
    for name, ref in cam_refs["sphere_sampler"].items():
        preset = get_preset(name if name != "FFHQ" else "FFHQ256")
        assert (preset.sphere_center_z, preset.sphere_r) == (ref["sphere_center_z"], ref["sphere_r"])
        c2w64 = C.sphere_c2w(ref["yaw"], ref["pitch"], preset.sphere_center_z, preset.sphere_r, dtype=torch.float64)
        c2w32 = C.sphere_c2w(ref["yaw"], ref["pitch"], preset.sphere_center_z, preset.sphere_r)
        assert max_err(c2w64, ref["c2w_float64"]) <= TOL and max_err(c2w32, ref["c2w_float32"]) <= TOL
        assert max_err(C.flatten_w2c(c2w32), ref["w2c_flat16"]) <= TOL
        yaw, pitch = C.yaw_pitch_from_w2c(C.invert_rigid(c2w64), preset.sphere_center_z)
        assert max_err(yaw, ref["yaw_from_w2c"]) <= TOL and max_err(pitch, ref["pitch_from_w2c"]) <= TOL


def test_sign_conventions_and_canonical_camera():
    c2w = C.sphere_c2w([0.0, 0.3, 0.0], [0.0, 0.0, 0.2], 1.0, 1.0, dtype=torch.float64)
    assert max_err(c2w[0], torch.eye(4)) < 1e-12  # canonical camera: origin, identity rotation
    assert max_err(c2w[1, :3, 3], [math.sin(0.3), 0.0, 1 - math.cos(0.3)]) < 1e-12  # +yaw -> +X
    assert max_err(c2w[2, :3, 3], [0.0, -math.sin(0.2), 1 - math.cos(0.2)]) < 1e-12  # +pitch -> up (-Y)
    # every camera looks at the sphere centre, without roll (x axis horizontal)
    to_centre = torch.tensor([0, 0, 1.0], dtype=torch.float64) - c2w[:, :3, 3]
    assert max_err(torch.nn.functional.normalize(to_centre, dim=-1), c2w[:, :3, 2]) < 1e-12
    assert float(c2w[:, 1, 0].abs().max()) < 1e-12
    assert max_err(C.flatten_w2c(c2w[:1].float()), torch.eye(4).reshape(1, 16)) < 1e-6
    assert max_err(C.invert_rigid(c2w) @ c2w, torch.eye(4).expand(3, 4, 4)) < 1e-12


def test_intrinsics_and_rays():
    K = C.intrinsics(12.6, 32, 32)
    assert float(K[0, 0]) == pytest.approx(144.9261869798229, rel=1e-6)
    assert float(K[0, 2]) == 16.0 and float(K[1, 2]) == 16.0
    rays, origins = C.pixel_rays(torch.eye(4), 12.6, 32, 32)
    assert rays.shape == (1, 32, 32, 3) and max_err(rays.norm(dim=-1), torch.ones(1, 32, 32)) < 1e-6
    # pixel (15, 16) centre is at x = 15.5 -> left of the axis by 0.5 px; pixel (16, 16) right by 0.5 px
    assert float(rays[0, 16, 15, 0]) == pytest.approx(-float(rays[0, 16, 16, 0]), rel=1e-6)
    assert float(rays[0, 16, 16, 0] / rays[0, 16, 16, 2]) == pytest.approx(0.5 / float(K[0, 0]), rel=1e-5)


def test_truncated_gaussian_pose_prior():
    g = torch.Generator().manual_seed(0)
    yaw, pitch = C.sample_preset_pose(20000, get_preset("FFHQ256"), generator=g)
    assert float(yaw.abs().max()) <= 2 * 0.289 + 1e-6 and float(pitch.abs().max()) <= 2 * 0.127 + 1e-6
    # a 2-sigma truncated normal has std ~0.88 sigma
    assert float(yaw.std()) == pytest.approx(0.88 * 0.289, rel=0.05) and abs(float(yaw.mean())) < 0.01
    u_yaw, _ = C.sample_sphere_pose(5000, 0.0, 0.1, 0.0, 0.1, 2, method="uniform", generator=g)
    assert float(u_yaw.abs().max()) <= 0.2 and float(u_yaw.std()) == pytest.approx(0.2 / math.sqrt(3), rel=0.05)
    with pytest.raises(ValueError, match="unknown pose sample method"):
        C.sample_sphere_pose(2, 0, 1, 0, 1, method="fancy")


def test_plane_geometry_parity(gmpi_fixture):
    refs = np.load(gmpi_fixture / "refs.npz")
    planes = preset_planes(get_preset("FFHQ256"), 8)
    assert max_err(planes.depths, refs["plane_depths_L8"]) <= TOL
    assert max_err(planes.normalized, refs["normalized_plane_depths_L8"]) <= TOL
    assert max_err(planes.extents, refs["plane_extents_hw_L8"]) <= TOL
    dhw = torch.cat([planes.depths[:, None], planes.extents], 1)
    assert max_err(dhw, refs["plane_dhws_L8"]) <= TOL
    xyz = torch.stack([texel_xyz(float(d), e, 32) for d, e in zip(planes.depths, planes.extents)])
    assert max_err(xyz, refs["tex_xyz_L8"]) <= TOL


@pytest.mark.parametrize("name,fg,bg", [("FFHQ256", 0.2473, (0.4146, 0.4945)), ("AFHQCat", 0.6574, (1.2142, 1.0478)),
                                        ("MetFaces", 0.2473, (0.4508, 0.5684))])
def test_plane_extents_per_preset_and_plane_count(name, fg, bg):
    for n in (32, 96):
        ext = preset_planes(get_preset(name), n).extents
        assert max_err(ext[:-1], torch.full((n - 1, 2), fg)) < 1e-4
        assert max_err(ext[-1], bg) < 1e-4


def test_plane_depths_spacing_and_normalisation():
    d = make_plane_depths(0.95, 1.12, 32)
    assert float(d[0]) == pytest.approx(0.95) and float(d[-1]) == pytest.approx(1.12)
    disp = 1 / d.double()
    assert max_err(disp[1:] - disp[:-1], torch.full((31,), float(disp[1] - disp[0]))) < 1e-6  # uniform disparity
    assert max_err(d[:4], [0.95, 0.95467, 0.95939, 0.96417]) < 1e-5
    nd = normalize_depths(d, 0.95, 1.12)
    assert float(nd[0]) == 0 and float(nd[-1]) == pytest.approx(1.0) and max_err(nd[1], 0.0275) < 1e-4
    u = make_plane_depths(1.0, 2.0, 5, "uniform")
    assert max_err(u, [1.0, 1.25, 1.5, 1.75, 2.0]) < 1e-7
    lg = make_plane_depths(1.0, 4.0, 3, "log-uniform")
    assert max_err(lg, [1.0, 2.0, 4.0]) < 1e-6
    with pytest.raises(ValueError, match="spacing"):
        make_plane_depths(1, 2, 4, "sqrt2")
    # Changing L at inference keeps the same near/far mapping: shared endpoints, monotone codes in [0, 1].
    for n in (8, 32, 96):
        codes = get_preset("FFHQ256").normalized_plane_depths(n)
        assert float(codes[0]) == 0 and float(codes[-1]) == pytest.approx(1.0)
        assert bool((codes[1:] > codes[:-1]).all())
    # every code maps back to its depth
    p = get_preset("FFHQ256")
    assert max_err(p.near + p.normalized_plane_depths(96) * (p.far - p.near), p.plane_depths(96)) < 1e-6


def test_out_of_volume_is_a_clear_error():
    with pytest.raises(ValueError, match="too large for an MPI"):
        plane_extents(make_plane_depths(0.95, 1.12, 8), 12.6, 1.0, 1.0, 0.0, 0.7, 0.0, 0.3, 2)


def test_presets_table():
    assert set(PRESETS) == {"FFHQ256", "FFHQ512", "FFHQ1024", "AFHQCat", "MetFaces", "synthetic32", "synthetic64",
                            "synthetic128"}
    assert get_preset("ffhq256").channel_base == 16384 and get_preset("FFHQ512").channel_base == 32768
    assert get_preset("AFHQCat").fov_deg == 13.39 and get_preset("AFHQCat").n_truncated_stds == 3
    assert get_preset("FFHQ256", resolution=64).resolution == 64
    with pytest.raises(InputError, match="available"):  # a user's typo: one line from `gmpi`, no traceback
        get_preset("CelebA")
