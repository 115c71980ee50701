"""MPI renderer and shading: parity with the official renderer and invariants with known answers."""

import numpy as np
import pytest
import torch

from gmpi_lightning import cameras as C
from gmpi_lightning import render as R
from gmpi_lightning.planes import preset_planes
from gmpi_lightning.presets import get_preset
from tests.conftest import max_err

TOL = 1e-4
FOV = 12.6


@pytest.fixture(scope="module")
def refs(request):
    from tests.conftest import fixture_dir

    return np.load(fixture_dir("gmpi") / "refs.npz")


@pytest.fixture(scope="module")
def planes8():
    return preset_planes(get_preset("FFHQ256"), 8)


def test_render_parity(refs, planes8):
    mpi = torch.from_numpy(refs["mpi_rgba_L8"])
    for k in range(3):
        c2w = torch.from_numpy(refs["cam_c2w_L8"][k])
        out = R.render_mpi(mpi, planes8.depths, planes8.extents, c2w, FOV, 32, 32)
        assert max_err(2 * out["rgb"] - 1, refs["render_rgb_L8"][:, k]) <= TOL
        assert max_err(out["depth"], refs["render_depth_L8"][:, k]) <= TOL
        assert float(out["alpha"].min()) > 0.9999  # the background plane is opaque and always hit


def test_cameras_of_the_fixture_come_from_the_sphere_sampler(refs):
    c2w = C.sphere_c2w([0.0, 0.3, 0.0], [0.0, 0.0, -0.2], 1.0, 1.0)
    assert max_err(c2w, refs["cam_c2w_L8"]) <= TOL
    assert max_err(C.flatten_w2c(c2w), refs["cam_w2c_flat_L8"]) <= TOL


def test_shading_parity(refs, planes8):
    mpi = torch.from_numpy(refs["mpi_rgba_L8"][:1])
    points = R.mpi_point_cloud(mpi[:, :, 3], planes8.depths, planes8.extents)
    assert max_err(points, refs["light_pcl_L8"]) <= TOL
    assert max_err(R.point_cloud_normals(points), refs["light_normal_L8"]) <= 1e-3
    light = R.light_direction(0.15, 0.2, 1.0, 1.0)
    assert max_err(light[0], refs["light_dir"]) <= TOL
    assert max_err(C.sphere_c2w(0.15, 0.2, 1.0, 1.0)[0, :3, 3], refs["light_pos"]) <= TOL
    shaded = R.shade_mpi(mpi, planes8.depths, planes8.extents, light, ka=0.6, kd=0.4)
    assert max_err(shaded, refs["mpi_rgba_shaded_L8"]) <= TOL


def _plane_reference(texture: np.ndarray, depth: float, extent_hw, c2w: np.ndarray, res: int):
    """Independent homography: pixel centre -> world point on z = depth via w2c = [R|t], then bilinear
    sampling (align_corners=True, zero outside) of colour and of an opaque alpha; the composited colour
    is their product. Returns (rgb H x W x 3, z-depth H x W)."""
    w2c = np.linalg.inv(c2w)
    f = res / (2 * np.tan(np.radians(FOV) / 2))
    K = np.array([[f, 0, res / 2], [0, f, res / 2], [0, 0, 1.0]])
    H = K @ np.stack([w2c[:3, 0], w2c[:3, 1], depth * w2c[:3, 2] + w2c[:3, 3]], axis=1)  # (x, y, 1) -> pixel
    Hinv = np.linalg.inv(H)
    th, tw = texture.shape[:2]
    rgb, zd = np.zeros((res, res, texture.shape[2])), np.zeros((res, res))
    for v in range(res):
        for u in range(res):
            x, y, s = Hinv @ np.array([u + 0.5, v + 0.5, 1.0])
            x, y = x / s, y / s
            cam = w2c @ np.array([x, y, depth, 1.0])
            zd[v, u] = cam[2]
            fx = (x / extent_hw[1] + 0.5) * (tw - 1)
            fy = (y / extent_hw[0] + 0.5) * (th - 1)
            x0, y0 = int(np.floor(fx)), int(np.floor(fy))
            acc, cover = np.zeros(texture.shape[2]), 0.0
            for dy in (0, 1):
                for dx in (0, 1):
                    xi, yi = x0 + dx, y0 + dy
                    wgt = (1 - abs(fx - xi)) * (1 - abs(fy - yi))
                    if 0 <= xi < tw and 0 <= yi < th:
                        acc += wgt * texture[yi, xi]
                        cover += wgt
            rgb[v, u] = acc * cover
    return rgb, zd


@pytest.mark.parametrize("yaw,pitch", [(0.0, 0.0), (0.35, -0.1)])
def test_single_opaque_plane_renders_as_its_homography(planes8, yaw, pitch):
    g = torch.Generator().manual_seed(0)
    res, k = 24, 3
    mpi = torch.zeros(1, 8, 4, 20, 20)
    mpi[0, k, :3] = torch.rand(3, 20, 20, generator=g)
    mpi[0, k, 3] = 1.0
    c2w = C.sphere_c2w(yaw, pitch, 1.0, 1.0)
    out = R.render_mpi(mpi, planes8.depths, planes8.extents, c2w, FOV, res, res, check_inside=False)
    ref_rgb, ref_z = _plane_reference(mpi[0, k, :3].permute(1, 2, 0).numpy(), float(planes8.depths[k]),
                                      planes8.extents[k].numpy(), c2w[0].double().numpy(), res)
    assert max_err(out["rgb"][0].permute(1, 2, 0), ref_rgb) < 1e-4
    inside = out["alpha"][0, 0] > 0.999  # where the ray hits the plane, depth is the plane's z-depth
    assert int(inside.sum()) > res * res // 2
    assert max_err(out["depth"][0, 0][inside], ref_z[inside.numpy()]) < 1e-5


def test_transparent_planes_in_front_of_opaque_far_plane(planes8):
    g = torch.Generator().manual_seed(1)
    mpi = torch.zeros(2, 8, 4, 16, 16)
    mpi[:, :, :3] = torch.rand(2, 8, 3, 16, 16, generator=g)  # colours of transparent planes must not leak
    mpi[:, -1, 3] = 1.0
    c2w = C.sphere_c2w([0.2, -0.3], [0.1, 0.05], 1.0, 1.0)
    out = R.render_mpi(mpi, planes8.depths, planes8.extents, c2w, FOV, 20, 20)
    only_far = mpi.clone()
    only_far[:, :-1] = 0
    ref = R.render_mpi(only_far, planes8.depths, planes8.extents, c2w, FOV, 20, 20)
    assert max_err(out["rgb"], ref["rgb"]) < 1e-6
    ref_rgb, ref_z = _plane_reference(mpi[1, -1, :3].permute(1, 2, 0).numpy(), 1.12, planes8.extents[-1].numpy(),
                                      c2w[1].double().numpy(), 20)
    assert max_err(out["rgb"][1].permute(1, 2, 0), ref_rgb) < 1e-4
    assert max_err(out["depth"][1, 0], ref_z) < 1e-5


def test_compositing_order_and_weights():
    rgb = torch.tensor([1.0, 0.0, 0.5]).reshape(1, 3, 1, 1, 1).expand(1, 3, 3, 1, 1)
    alpha = torch.tensor([0.5, 0.5, 1.0]).reshape(1, 3, 1, 1, 1)
    depth = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1, 1)
    c, d, w, t = R.composite(rgb, alpha, depth)
    # weights 0.5, 0.25, 0.25 (front to back, plane 0 nearest)
    assert max_err(c[0, :, 0, 0], [0.5 + 0.125] * 3) < 1e-6
    assert max_err(d, [[[[0.5 + 0.5 + 0.75]]]]) < 1e-6 and max_err(w, [[[[1.0]]]]) < 1e-6


def test_plane_chunked_rendering_matches(refs, planes8):
    mpi = torch.from_numpy(refs["mpi_rgba_L8"])
    c2w = C.sphere_c2w([0.3, -0.2], [0.1, 0.0], 1.0, 1.0)
    full = R.render_mpi(mpi, planes8.depths, planes8.extents, c2w, FOV, 32, 32)
    for chunk in (1, 3, 5):
        part = R.render_mpi(mpi, planes8.depths, planes8.extents, c2w, FOV, 32, 32, plane_chunk=chunk)
        for key in ("rgb", "depth", "alpha"):
            assert max_err(full[key], part[key]) < 1e-6


def test_render_is_differentiable_in_the_mpi(planes8):
    mpi = torch.rand(1, 8, 4, 8, 8, requires_grad=True)
    out = R.render_mpi(mpi, planes8.depths, planes8.extents, C.sphere_c2w(0.1, 0.1, 1.0, 1.0), FOV, 8, 8,
                       check_inside=False)
    (out["rgb"].sum() + out["depth"].sum()).backward()
    assert float(mpi.grad[:, :, :3].abs().sum()) > 0 and float(mpi.grad[:, :, 3].abs().sum()) > 0


def test_render_errors(planes8):
    d, e = planes8.depths, planes8.extents
    mpi = torch.rand(1, 8, 4, 8, 8)
    mpi[:, -1, 3] = 1
    with pytest.raises(ValueError, match="rays leave the background plane"):
        R.render_mpi(mpi, d, e, C.sphere_c2w(0.9, 0.0, 1.0, 1.0), FOV, 8, 8)
    behind = torch.eye(4)
    behind[2, 3] = 1.0
    with pytest.raises(ValueError, match="behind the nearest plane"):
        R.render_mpi(mpi, d, e, behind, FOV, 8, 8)
    bad = mpi.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        R.render_mpi(bad, d, e, torch.eye(4), FOV, 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        R.render_mpi(mpi * 2 - 1, d, e, torch.eye(4), FOV, 8, 8)
    with pytest.raises(ValueError, match="B x L x 4"):
        R.render_mpi(mpi[:, :, :3], d, e, torch.eye(4), FOV, 8, 8)
    with pytest.raises(ValueError, match="needs plane_depths"):
        R.render_mpi(mpi, d[:7], e[:7], torch.eye(4), FOV, 8, 8)


def test_flat_surface_normals_and_lambertian_factor(planes8):
    alpha = torch.zeros(1, 8, 16, 16)
    alpha[:, 4] = 1.0  # one opaque plane: a flat surface facing the canonical camera
    normals = R.point_cloud_normals(R.mpi_point_cloud(alpha, planes8.depths, planes8.extents))
    # points are pulled along rays from the origin onto z = d: a fronto-parallel plane, normal (0, 0, -1)
    assert max_err(normals, torch.tensor([0.0, 0.0, -1.0]).expand(1, 16, 16, 3)) < 1e-5
    mpi = torch.cat([torch.full((1, 8, 3, 16, 16), 0.8), alpha[:, :, None]], dim=2)
    light = R.light_direction(0.0, 0.0, 1.0, 1.0)  # light at the canonical camera: l = (0, 0, 1), -n.l = 1
    shaded = R.shade_mpi(mpi, planes8.depths, planes8.extents, light, ka=0.5, kd=0.25)
    assert max_err(shaded[:, :, :3], torch.full_like(shaded[:, :, :3], 0.8 * 0.75)) < 1e-5
    assert max_err(shaded[:, :, 3], alpha) == 0


def test_shading_schedules():
    assert R.shading_coefficients(0) == (0.0, 0.0)  # as coded: fakes start black
    assert R.shading_coefficients(500) == pytest.approx((0.45, 0.05))
    assert R.shading_coefficients(5000) == pytest.approx((0.9, 0.1))
    assert R.shading_coefficients(0, schedule="ramp") == (1.0, 0.0)  # monotone ramp: starts unshaded
    assert R.shading_coefficients(500, schedule="ramp") == pytest.approx((0.95, 0.05))
    with pytest.raises(ValueError, match="schedule"):
        R.shading_coefficients(1, schedule="cosine")
    yaw, pitch = R.sample_light(4000, generator=torch.Generator().manual_seed(0))
    assert float(yaw.abs().max()) <= 0.4 + 1e-6 and abs(float(pitch.mean()) - 0.2) < 0.005
