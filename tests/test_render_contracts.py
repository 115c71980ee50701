"""The renderer's and the shading's contracts beyond the parity fixtures: outputs and their dtypes, per-plane weights,
the validity checks at their exact limits, batches of lights and the clip. Each test names the slip it rules out."""

import math

import pytest
import torch

from gmpi_lightning import cameras as C
from gmpi_lightning import render as R
from tests.conftest import max_err

DEPTHS = torch.tensor([1.0, 1.5, 2.0])
FOV = 20.0


def _mpi(b=1, n=3, res=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mpi = torch.rand(b, n, 4, res, res, generator=g)
    mpi[:, -1, 3] = 1.0
    return mpi


def test_render_outputs_their_weights_only_when_asked_and_in_float32():
    """A render returns rgb, depth and alpha in float32 (even from float64 depths and cameras); with return_weights it
    adds every plane's weight B x L x 1 x H x W, which sum to alpha, the same in one pass or by chunks. Rules out the
    weights returned or dropped regardless of the flag, weights concatenated along the wrong axis, and a float64
    depth from the z-per-step factor."""
    mpi = _mpi(b=2)
    extents = torch.full((3, 2), 5.0, dtype=torch.float64)
    c2w = C.sphere_c2w([0.1, -0.2], [0.05, 0.1], 1.0, 1.0, dtype=torch.float64)
    out = R.render_mpi(mpi, DEPTHS.double(), extents, c2w, FOV, 5, 7)
    assert set(out) == {"rgb", "depth", "alpha"} and all(v.dtype == torch.float32 for v in out.values())
    full = R.render_mpi(mpi, DEPTHS, extents, c2w, FOV, 5, 7, return_weights=True)
    assert full["weights"].shape == (2, 3, 1, 5, 7)
    assert max_err(full["weights"].sum(1), full["alpha"]) < 1e-6
    chunked = R.render_mpi(mpi, DEPTHS, extents, c2w, FOV, 5, 7, return_weights=True, plane_chunk=2)
    assert max_err(chunked["weights"], full["weights"]) < 1e-7
    rgb, depth, weight, _ = R.composite(mpi[:, :, :3], mpi[:, :, 3:])
    assert depth is None and rgb.shape == (2, 3, 6, 6) and weight.shape == (2, 1, 6, 6)


def test_render_checks_hold_at_their_exact_limits():
    """A camera exactly on the nearest plane renders and one between the first two planes does not; rays reaching
    exactly the background's border texels are inside; values above 1 (not only below 0) and extents of the wrong
    shape are refused, and a camera batch that does not match is named. Rules out a camera check against the second
    plane or without its tolerance, a border check that refuses the border texels, a value bound of 2, a shape check
    that needs both depths and extents wrong, and messages without their numbers."""
    mpi = _mpi()
    on_plane = torch.eye(4)
    on_plane[2, 3] = 1.0
    R.render_mpi(mpi, DEPTHS, torch.full((3, 2), 5.0), on_plane, FOV, 4, 4)
    between = on_plane.clone()
    between[2, 3] = 1.25
    with pytest.raises(ValueError, match="nearest plane at 1.0000"):
        R.render_mpi(mpi, DEPTHS, torch.full((3, 2), 5.0), between, FOV, 4, 4)
    w = 8  # the outermost pixel centres' rays meet the far plane at x = +-far * (W/2 - 0.5) / f: make that the edge
    f = C.focal_from_fov(FOV, w)
    edge = 2 * 2.0 * (w / 2 - 0.5) / f
    R.render_mpi(mpi, DEPTHS, torch.tensor([[5.0, 5.0], [5.0, 5.0], [edge, edge]]), torch.eye(4), FOV, w, w)
    with pytest.raises(ValueError, match="rays leave the background plane"):
        R.render_mpi(mpi, DEPTHS, torch.tensor([[5.0, 5.0], [5.0, 5.0], [0.99 * edge, edge]]), torch.eye(4), FOV, w, w)
    bright = mpi.clone()
    bright[0, 0, 0, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        R.render_mpi(bright, DEPTHS, torch.full((3, 2), 5.0), torch.eye(4), FOV, 4, 4)
    with pytest.raises(ValueError, match="needs plane_depths"):
        R.render_mpi(mpi, DEPTHS, torch.ones(3, 3), torch.eye(4), FOV, 4, 4)
    with pytest.raises(ValueError, match=r"c2w must be 4 x 4 or 2 x 4 x 4 for a batch of 2 MPIs, got \(3, 4, 4\)"):
        R.render_mpi(_mpi(b=2), DEPTHS, torch.full((3, 2), 5.0), torch.eye(4).expand(3, 4, 4), FOV, 4, 4)


def test_canonical_depth_follows_the_alpha_dtype_for_any_batch():
    """Texture-space depth of a batch comes back in the alpha's dtype whatever the depths' dtype, per sample. Rules out
    the depths left in float64 and a colour stack expanded for one sample only."""
    alpha = torch.zeros(2, 3, 4, 4)
    alpha[0, 1] = 1.0
    alpha[1, 2] = 1.0
    depth = R.canonical_depth(alpha, DEPTHS.double())
    assert depth.dtype == torch.float32 and depth.shape == (2, 1, 4, 4)
    assert max_err(depth[:, 0, 0, 0], [1.5, 2.0]) < 1e-6


@pytest.mark.parametrize("radius", [0.5, 2.7])
def test_light_directions_are_unit_vectors_towards_the_sphere_centre(radius):
    """For lights on a sphere of any radius, each direction is the unit vector from the light to the centre, per
    light. Rules out an unnormalised direction (invisible at radius 1) and a norm over the whole batch."""
    yaw, pitch = torch.tensor([0.3, -0.1, 0.0]), torch.tensor([0.2, 0.1, -0.3])
    d = R.light_direction(yaw, pitch, radius, radius)
    pos = C.sphere_c2w(yaw, pitch, radius, radius)[:, :3, 3]
    to_centre = torch.tensor([0.0, 0.0, radius]) - pos
    assert d.shape == (3, 3) and max_err(d, to_centre / to_centre.norm(dim=-1, keepdim=True)) < 1e-6


def test_light_prior_stays_in_front_and_above_and_follows_its_generator():
    """Light pitch stays within 0.2 +- 2 x 0.05 and yaw within +-0.4; the same seeded generator gives the same
    lights. Rules out another pitch spread and the generator dropped."""
    yaw, pitch = R.sample_light(2000, generator=torch.Generator().manual_seed(1))
    assert float((pitch - 0.2).abs().max()) <= 0.1 + 1e-6 and float(yaw.abs().max()) <= 0.4 + 1e-6
    again = R.sample_light(2000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(yaw, again[0]) and torch.equal(pitch, again[1])


def _bumpy_alpha(b=2, n=4, res=12):
    """An opaque layer whose plane changes across the texture: a surface with slopes (normals not all (0, 0, -1))."""
    alpha = torch.zeros(b, n, res, res)
    for i in range(b):
        for x in range(res):
            alpha[i, (x // 3 + i) % (n - 1), :, x] = 1.0
    alpha[:, -1] = 1.0
    return alpha


def test_shading_uses_each_mpis_light_its_blur_and_clips_to_one():
    """Each MPI of a batch is shaded by its own light, with the blur size asked for, then clipped to [0, 1] (ka + kd
    above 1 brightens up to white); alpha is kept and the dtype is the MPI's. Rules out one light broadcast to the
    batch, the blur size not passed to the surface, a missing upper clip, and a light in float64 promoting the
    result."""
    alpha = _bumpy_alpha()
    depths = torch.linspace(1.0, 1.3, 4)
    extents = torch.full((4, 2), 0.4)
    mpi = torch.cat([torch.full((2, 4, 3, 12, 12), 0.8), alpha[:, :, None]], dim=2)
    lights = R.light_direction(torch.tensor([0.4, -0.4]), torch.tensor([0.3, 0.0]), 1.0, 1.0).double()
    shaded = R.shade_mpi(mpi, depths, extents, lights, ka=0.5, kd=0.5, blur_ksize=3)
    assert shaded.dtype == torch.float32 and max_err(shaded[:, :, 3], alpha) == 0
    for i in range(2):
        alone = R.shade_mpi(mpi[i:i + 1], depths, extents, lights[i], ka=0.5, kd=0.5, blur_ksize=3)
        assert max_err(shaded[i:i + 1], alone) < 1e-6
    normals = R.point_cloud_normals(R.mpi_point_cloud(alpha[:1], depths, extents, blur_ksize=3))
    diffuse = (-(normals[0] * lights[0].float()).sum(-1)).clamp(min=0)
    assert max_err(shaded[0, :, :3], (0.8 * (0.5 + 0.5 * diffuse))[None, None].expand(4, 3, 12, 12)) < 1e-5
    assert not math.isclose(max_err(R.shade_mpi(mpi[:1], depths, extents, lights[0], 0.5, 0.5), shaded[:1]), 0)
    bright = R.shade_mpi(mpi, depths, extents, lights, ka=1.5, kd=0.5)
    assert float(bright[:, :, :3].max()) == 1.0 and max_err(bright[:, :, :3], torch.ones_like(bright[:, :, :3])) == 0


def test_rays_are_traced_in_float64_whatever_the_cameras_dtype():
    """A float32 camera renders exactly (bit for bit) like the same camera in float64: rays are traced in float64.
    Rules out rays traced in the camera's own float32, which moves the texture coordinates in their last bits."""
    mpi = _mpi(b=2, res=16)
    c2w = C.sphere_c2w([0.3, -0.25], [0.1, 0.2], 1.0, 1.0)
    a = R.render_mpi(mpi, DEPTHS, torch.full((3, 2), 5.0), c2w, FOV, 9, 11)
    b = R.render_mpi(mpi, DEPTHS, torch.full((3, 2), 5.0), c2w.double(), FOV, 9, 11)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_camera_that_requires_grad_gets_a_graph_only_where_grad_is_enabled():
    """A c2w that requires grad (pose refinement) is differentiated through when grad is enabled, and not inside
    no_grad (the inversion's previews): rules out enabling the camera graph whenever either holds."""
    mpi = _mpi(b=1, res=16)
    c2w = C.sphere_c2w([0.2], [0.1], 1.0, 1.0).requires_grad_(True)
    with torch.no_grad():
        out = R.render_mpi(mpi, DEPTHS, torch.full((3, 2), 5.0), c2w, FOV, 9, 11)
    assert not out["rgb"].requires_grad
    out = R.render_mpi(mpi, DEPTHS, torch.full((3, 2), 5.0), c2w, FOV, 9, 11)
    (grad,) = torch.autograd.grad(out["rgb"].sum(), c2w)
    assert float(grad.abs().max()) > 0
