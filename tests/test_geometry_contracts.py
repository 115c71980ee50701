"""The camera and plane functions' contracts beyond their arithmetic: dtypes, batches, devices, the samplers' streams
and the errors they raise on bad input. Each test names the slip it rules out."""

from dataclasses import replace

import pytest
import torch

from gmpi_lightning import cameras as C
from gmpi_lightning import planes as P
from gmpi_lightning.presets import get_preset
from tests.conftest import max_err

META = torch.device("meta")  # shapes and devices without data: catches a tensor made on the host by mistake


def test_sphere_cameras_are_made_where_the_angles_live_in_the_asked_dtype():
    """Angles on another device give cameras there (float32 unless asked). Rules out the sphere centre, the world's
    down axis or the identity made on the host (the sum with a device tensor then fails) and a result left in
    float64."""
    yaw = torch.zeros(3, device=META)
    assert C.sphere_c2w(yaw, yaw, 1.0, 1.0).device == META
    assert C.sphere_c2w(yaw, [0.0, 0.1, 0.2], 1.0, 1.0).device == META  # pitch given as numbers goes to yaw's device
    c2w = C.sphere_c2w([0.1, -0.2], [0.0, 0.1], 1.0, 1.0)
    assert c2w.dtype == torch.float32 and c2w.shape == (2, 4, 4)
    assert C.sphere_c2w(0.1, 0.0, 1.0, 1.0, dtype=torch.float64).dtype == torch.float64


def test_plane_texels_are_made_where_the_extent_lives():
    """texel_xyz with an extent on another device computes there. Rules out its steps or depth made on the host."""
    xyz = P.texel_xyz(1.0, torch.tensor([0.2, 0.3], device=META), 4)
    assert xyz.device == META and xyz.shape == (4, 4, 3) and xyz.dtype == torch.float32


def _yaw_face_batch():
    angle = torch.tensor([[0.1, -0.3, 0.05], [-0.2, 0.25, -0.1]], dtype=torch.float64)
    trans = torch.tensor([[0.01, -0.02, 0.03], [-0.03, 0.0, 0.02]], dtype=torch.float64)
    return angle, trans


def test_converters_treat_a_batch_row_by_row_and_return_float32():
    """Every converter maps a batch of B poses to B results equal to its row-by-row results, in float32, and accepts a
    single unbatched pose. Rules out a batch reshape that keeps one row, an elementary rotation stacked along the
    batch axis, the pose repeated by its angle count, a norm taken over the whole batch when placing cameras on the
    sphere, and results left in float64."""
    angle, trans = _yaw_face_batch()
    both = C.w2c_from_deep3dface(angle, trans, 1.0, 1.0)
    assert both.shape == (2, 4, 4) and both.dtype == torch.float32
    for i in range(2):
        assert max_err(both[i], C.w2c_from_deep3dface(angle[i].tolist(), trans[i].tolist(), 1.0, 1.0)[0]) < 1e-7
    assert C.w2c_from_deep3dface([0.1, 0.2, 0.3], [0.0, 0.0, 0.0], 1.0, 1.0).shape == (1, 4, 4)
    # lists are read in float64, like float64 tensors (not rounded to float32 first)
    listed = C.w2c_from_deep3dface(angle.tolist(), trans.tolist(), 1.0, 1.0, normalize_trans=False)
    assert torch.equal(listed, C.w2c_from_deep3dface(angle, trans, 1.0, 1.0, normalize_trans=False))

    c2w = C.sphere_c2w([0.2, -0.4], [0.1, -0.05], 2.7, 2.7, dtype=torch.float64)
    centre = torch.tensor([0.0, 0.0, 2.7], dtype=torch.float64)
    c2w[1, :3, 3] = centre + 3.0 * (c2w[1, :3, 3] - centre)  # off the sphere: placed back on it
    labels = (C._FLIP_YZ @ torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, -2.7], [0, 0, 0, 1.0]],
                                        dtype=torch.float64) @ c2w).reshape(2, 16)
    labels = torch.cat([labels, torch.ones(2, 9, dtype=torch.float64)], dim=1)
    w2c = C.w2c_from_eg3d_label(labels, 2.7, 2.7)
    assert w2c.shape == (2, 4, 4) and w2c.dtype == torch.float32
    for i in range(2):
        assert max_err(w2c[i], C.w2c_from_eg3d_label(labels[i].tolist(), 2.7, 2.7)[0]) < 1e-7
        centre = -(w2c[i, :3, :3].double().T @ w2c[i, :3, 3].double())
        assert abs(float((centre - torch.tensor([0, 0, 2.7], dtype=torch.float64)).norm()) - 2.7) < 1e-5
    assert C.w2c_from_eg3d_label(labels[:, :16], 2.7, 2.7).shape == (2, 4, 4)  # 16 numbers: no intrinsics

    yaw, pitch = C.yaw_pitch_from_w2c(w2c.double(), 2.7)
    assert yaw.dtype == pitch.dtype == torch.float32 and yaw.shape == (2,)
    dy, dp = C.deep3dface_dataset_angles(angle)
    assert dy.dtype == dp.dtype == torch.float32
    assert max_err(dy, -angle[:, 1]) < 1e-7 and max_err(dp, angle[:, 0]) < 1e-7
    assert C.flatten_w2c(c2w).dtype == torch.float64 and C.flatten_w2c(c2w.float()).dtype == torch.float32


def test_the_condition_is_the_float64_inverse_rounded_once():
    """flatten_w2c of float32 cameras is their inverse computed in float64 and rounded once (bit for bit), as the
    official float64 path. Rules out inverting in float32, which differs in the last bits."""
    c2w = C.sphere_c2w(torch.linspace(-0.5, 0.5, 64), torch.linspace(0.3, -0.3, 64), 1.0, 1.0)
    ref = C.invert_rigid(c2w.double()).float().reshape(64, 16)
    assert torch.equal(C.flatten_w2c(c2w), ref)


def test_camera_inputs_that_cannot_work_are_clear_errors():
    """Each bad input raises a ValueError that names the problem and the sizes. Rules out a check that never fires
    (a camera at the sphere centre then divides by 0) and messages without their numbers."""
    with pytest.raises(ValueError, match=r"expected 4 x 4 camera matrices, got shape \(1, 3, 3\)"):
        C.flatten_w2c(torch.eye(3))
    with pytest.raises(ValueError, match="same length, got 2 and 3"):
        C.sphere_c2w([0.0, 0.1], [0.0, 0.1, 0.2], 1.0, 1.0)
    with pytest.raises(ValueError, match="batch sizes differ: 2 vs 1"):
        C.w2c_from_deep3dface(torch.zeros(2, 3), torch.zeros(1, 3), 1.0, 1.0)
    at_centre = torch.tensor([1, 0, 0, 0, 0, -1, 0, 0, 0, 0, -1, 0.0, 0, 0, 0, 1])  # EG3D camera at its origin
    with pytest.raises(ValueError, match="coincides with the sphere centre"):
        C.w2c_from_eg3d_label(at_centre, 2.7, 2.7)
    assert C.w2c_from_eg3d_label(at_centre, 2.7, 2.7, normalize_trans=False).shape == (1, 4, 4)


def _official_truncated(draws: torch.Tensor, n_stds: float) -> torch.Tensor:
    """METHOD.md §1 read literally: per value, the first of its 4 draws strictly inside (-n, n), else draw 0
    clamped."""
    out = []
    for row in draws.tolist():
        inside = [x for x in row if -n_stds < x < n_stds]
        out.append(inside[0] if inside else min(max(row[0], -n_stds), n_stds))
    return torch.tensor(out, dtype=torch.float64)


def test_truncated_normal_is_the_official_sampler_on_the_given_stream():
    """With a seeded generator the sample is mean + std * (the first of 4 float64 draws per value inside the bounds,
    else draw 0 clamped), reproducibly; without one it draws from the global stream on the host; float32 unless
    asked. Rules out the generator ignored, 5 draws per value, float32 draws, the sign of the draw flipped, and a
    default device that is not the host."""
    for n_stds in (0.3, 2.0):
        draws = torch.randn(500, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        ours = C.truncated_normal(500, 0.2, 0.5, n_stds, torch.Generator().manual_seed(3), dtype=torch.float64)
        assert max_err(ours, 0.2 + 0.5 * _official_truncated(draws, n_stds)) < 1e-12
    assert C.truncated_normal(4, 0.0, 1.0, 2.0).dtype == torch.float32
    torch.manual_seed(0)
    a = C.truncated_normal(8, 0.0, 1.0, 2.0)
    torch.manual_seed(0)
    assert torch.equal(a, C.truncated_normal(8, 0.0, 1.0, 2.0)) and a.device.type == "cpu"


def test_pose_priors_defaults_independence_and_spread():
    """The default prior is the 2-std truncated Gaussian; yaw and pitch are independent draws for every method; the
    Gaussian and uniform priors have their std; every method and the preset sampler follow the generator they are
    given. Rules out another default truncation or method, pitch drawn from yaw's numbers, a std that divides, and
    the generator dropped."""
    g = torch.Generator().manual_seed(0)
    yaw, pitch = C.sample_sphere_pose(4000, 0.0, 1.0, 0.0, 1.0, generator=g)
    assert float(yaw.abs().max()) <= 2.0 and float(yaw.abs().max()) > 1.9 and float(yaw.std()) < 0.95
    for method, std in (("truncated_gaussian", 0.88 * 0.3), ("uniform", 2 * 0.3 / 3**0.5), ("gaussian", 0.3)):
        yaw, pitch = C.sample_sphere_pose(4000, 0.1, 0.3, -0.1, 0.3, 2.0, method=method, generator=g)
        assert abs(float(torch.corrcoef(torch.stack([yaw, pitch]))[0, 1])) < 0.1, method
        assert float(yaw.std()) == pytest.approx(std, rel=0.08) and float(pitch.std()) == pytest.approx(std, rel=0.08)
        assert float(yaw.mean()) == pytest.approx(0.1, abs=0.03)
        assert float(pitch.mean()) == pytest.approx(-0.1, abs=0.03)
        first, again = (C.sample_sphere_pose(6, 0.0, 0.3, 0.0, 0.3, 2.0, method=method,
                                             generator=torch.Generator().manual_seed(5)) for _ in range(2))
        assert all(torch.equal(a, b) for a, b in zip(first, again)), method
    preset = get_preset("FFHQ256")
    first = C.sample_preset_pose(6, preset, torch.Generator().manual_seed(5))
    again = C.sample_preset_pose(6, preset, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_plane_inputs_that_cannot_work_are_clear_errors():
    """near/far must satisfy 0 < near < far and an MPI needs 2 planes (2 is enough). Rules out accepting near = 0 or
    near = far, refusing 2 planes, and messages without their numbers."""
    with pytest.raises(ValueError, match="need 0 < near < far, got near=0, far=1"):
        P.make_plane_depths(0, 1, 4)
    with pytest.raises(ValueError, match="near=1.0, far=1.0"):
        P.make_plane_depths(1.0, 1.0, 4)
    with pytest.raises(ValueError, match="at least 2 planes, got 1"):
        P.make_plane_depths(1.0, 2.0, 1)
    assert max_err(P.make_plane_depths(1.0, 2.0, 2), [1.0, 2.0]) < 1e-7


def _planes(n=3, depths=None, normalized=None, extents=None):
    d = torch.linspace(1.0, 2.0, n) if depths is None else depths
    return P.Planes(depths=d, normalized=(d - 1.0) if normalized is None else normalized,
                    extents=torch.ones(len(d), 2) if extents is None else extents)


def test_planes_are_checked_on_the_host_and_trusted_on_a_device():
    """A Planes needs matching shapes (each one alone is checked), L >= 2 (2 is enough), finite values and strictly
    increasing depths; its device copy keeps the shapes and skips the value checks, and a copy to its own device is
    itself. Rules out a shape check joined with 'and', refusing 2 planes, accepting equal depths, running the value
    checks on the wrong device type, and messages without the shapes."""
    assert len(_planes(2)) == 2
    with pytest.raises(ValueError, match=r"got \(1,\), \(1,\), \(1, 2\)"):
        _planes(1)
    good = dict(depths=torch.linspace(1, 2, 3), normalized=torch.zeros(3), extents=torch.ones(3, 2))
    for bad in (dict(depths=torch.linspace(1, 2, 3)[:, None]), dict(normalized=torch.zeros(4)),
                dict(extents=torch.ones(3, 3))):  # one wrong shape at a time
        with pytest.raises(ValueError, match="planes need depths"):
            P.Planes(**{**good, **bad})
    with pytest.raises(ValueError, match="must be finite"):
        _planes(extents=torch.tensor([[1.0, 1.0], [float("inf"), 1.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"must increase from near to far, got \[1.0, 1.0, 2.0\]"):
        _planes(depths=torch.tensor([1.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="must increase"):
        _planes(depths=torch.tensor([1.0, 3.0, 2.0]))
    planes = _planes(4)
    assert planes.to("cpu") is planes and planes.to(torch.device("cpu")) is planes
    on_meta = planes.to("meta")
    assert on_meta.device == META and on_meta.extents.shape == (4, 2) and len(on_meta) == 4
    trusted = P.Planes(torch.zeros(3, device=META), torch.zeros(3, device=META), torch.zeros(3, 2, device=META))
    assert trusted.device == META


def test_preset_planes_follow_the_preset_and_the_asked_spacing():
    """preset_planes uses the spacing it is asked for (else the preset's) and the preset's volume shape. Rules out the
    spacing argument dropped and the confined-volume flag ignored."""
    preset = get_preset("FFHQ256")
    uniform = P.preset_planes(preset, 5, "uniform").depths
    assert max_err(uniform, torch.linspace(preset.near, preset.far, 5)) < 1e-6
    assert max_err(P.preset_planes(preset, 5).depths, P.make_plane_depths(preset.near, preset.far, 5)) == 0
    frustum = P.preset_planes(replace(preset, confined_volume=False), 5)
    ratio = frustum.extents[:-1, 0] / frustum.depths[:-1]
    assert max_err(ratio, ratio[:1].expand(4)) < 1e-6 and float(frustum.extents[0, 0]) < float(frustum.extents[3, 0])


@pytest.mark.parametrize("name", ["FFHQ256", "AFHQCat", "synthetic32"])
def test_pose_range_is_the_truncated_prior_around_its_mean(name):
    """pose_range is (mean - n std, mean + n std) in yaw and in pitch, n = the preset's n_truncated_stds: rules out
    bounds without n or the std, a one-sided range, and yaw and pitch mixed up."""
    p = replace(get_preset(name), yaw_mean=0.1, pitch_mean=-0.05, yaw_std=0.3, pitch_std=0.2, n_truncated_stds=1.5)
    (y0, y1), (p0, p1) = C.pose_range(p)
    assert (y0, y1, p0, p1) == pytest.approx((0.1 - 0.45, 0.1 + 0.45, -0.05 - 0.3, -0.05 + 0.3))


def test_clamp_to_prior_moves_only_what_lies_outside():
    """A pose inside the prior is returned as it is; yaw and pitch outside it are moved to the nearer edge, each on its
    own axis: rules out clamping yaw to the pitch range, one-sided clamps, and swapped outputs."""
    p = replace(get_preset("FFHQ256"), yaw_mean=0.1, pitch_mean=-0.05, yaw_std=0.3, pitch_std=0.2, n_truncated_stds=1.0)
    assert C.clamp_to_prior(0.2, 0.05, p) == pytest.approx((0.2, 0.05))
    assert C.clamp_to_prior(2.0, -1.0, p) == pytest.approx((0.4, -0.25))
    assert C.clamp_to_prior(-2.0, 1.0, p) == pytest.approx((-0.2, 0.15))
