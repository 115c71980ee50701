"""Property tests of the plane geometry and the renderer's invariants (docs/METHOD.md §2, §4) with Hypothesis.

The renderer's properties hold for any MPI and any camera in front of its planes: a single opaque plane renders as
the homography of its texture, a fully transparent plane changes nothing, planes behind an opaque one do not show,
and constant planes composite as straight-alpha "over", front to back. Derandomised: the same examples every run.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gmpi_lightning import cameras as C
from gmpi_lightning import planes as P
from gmpi_lightning import render as R

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
seeds = st.integers(0, 2**31 - 1)


def _err(a, b) -> float:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())


def _camera(yaw: float, pitch: float) -> torch.Tensor:
    """A camera on the unit sphere around (0, 0, 1): its centre has z <= 0.42 for |yaw|, |pitch| <= 0.7, in front of
    every plane used here (depths >= 0.5)."""
    return C.sphere_c2w(yaw, pitch, 1.0, 1.0, dtype=torch.float64)


cam_angles = st.floats(-0.7, 0.7)


# ------------------------------------------------------------------------------------------------ plane geometry
@PROPERTY
@given(st.floats(0.1, 5.0), st.floats(0.01, 5.0), st.integers(2, 64))
def test_plane_depths_span_near_to_far_with_their_spacing(near, span, n):
    """Every spacing starts at near (index 0), ends at far, increases strictly, and has its defining regularity:
    equal steps in disparity (inverse), in depth (uniform) or in log depth (log-uniform). Rules out the list left
    far-to-near, linear spacing passed off as inverse, and the methods mixed up."""
    far = near + span
    steps = {"inverse": lambda d: 1 / d, "uniform": lambda d: d, "log-uniform": torch.log}
    for method, fn in steps.items():
        d = P.make_plane_depths(near, far, n, method)
        assert d.dtype == torch.float32 and d.shape == (n,)
        assert _err(d[[0, -1]], [near, far]) <= 1e-6 * far and bool((d[1:] > d[:-1]).all())
        g = fn(d.double())
        diffs = g[1:] - g[:-1]
        assert _err(diffs, diffs.mean().expand_as(diffs)) <= 1e-5 * float(g.abs().max())


@PROPERTY
@given(st.floats(0.1, 5.0), st.floats(0.01, 5.0), st.integers(2, 64))
def test_plane_depths_are_the_exact_spacing_rounded_once_to_float32(near, span, n):
    """Depth k is the exact spacing's value (inverse: 1 / lerp(1/far, 1/near); uniform: lerp(near, far); log-uniform:
    near (far/near)^(k/(L-1))) rounded once to float32, as the official float64 numpy makes it: within half a float32
    ulp. Rules out the spacing computed in float32, which is off by an ulp or more."""
    far = near + span
    exact = {
        "inverse": [1 / (1 / far + (n - 1 - k) / (n - 1) * (1 / near - 1 / far)) for k in range(n)],
        "uniform": [near + k / (n - 1) * span for k in range(n)],
        "log-uniform": [near * (far / near) ** (k / (n - 1)) for k in range(n)],
    }
    for method, values in exact.items():
        d = P.make_plane_depths(near, far, n, method).double()
        ref = torch.tensor(values, dtype=torch.float64)
        half_ulp = torch.tensor([2.0 ** (math.frexp(v)[1] - 25) for v in values], dtype=torch.float64)
        assert bool(((d - ref).abs() <= half_ulp * (1 + 1e-9)).all()), method


@PROPERTY
@given(st.floats(-0.5, 0.5), st.floats(0.0, 0.4), st.floats(-0.3, 0.3), st.floats(0.0, 0.3), st.floats(0.5, 3.0),
       st.integers(2, 12))
def test_pose_grid_spans_the_truncated_prior_plus_its_mean(yaw_mean, yaw_std, pitch_mean, pitch_std, n_stds, n):
    """The sizing grid is n x n poses from mean - n_stds std to mean + n_stds std on each axis (every yaw with every
    pitch), then the mean pose itself, exactly. Rules out a range of +- std or one-sided, an n + 1 grid, and the
    mean pose rounded to float32."""
    yaw, pitch = P.pose_grid(yaw_mean, yaw_std, pitch_mean, pitch_std, n_stds, n)
    assert yaw.shape == pitch.shape == (n * n + 1,) and yaw.dtype == pitch.dtype == torch.float64
    assert float(yaw[-1]) == yaw_mean and float(pitch[-1]) == pitch_mean
    ys, ps = yaw[:-1].reshape(n, n), pitch[:-1].reshape(n, n)
    lin = torch.linspace(-1, 1, n, dtype=torch.float64)
    assert _err(ys, (yaw_mean + lin * n_stds * yaw_std)[:, None].expand(n, n)) < 1e-12
    assert _err(ps, (pitch_mean + lin * n_stds * pitch_std)[None, :].expand(n, n)) < 1e-12
    assert P.pose_grid(0.0, 0.1, 0.0, 0.1, 2.0)[0].shape == (100 * 100 + 1,)


@PROPERTY
@given(cam_angles, cam_angles, st.floats(5.0, 90.0))
def test_corner_rays_are_unit_directions_through_the_image_corners(yaw, pitch, fov):
    """corner_rays gives, per camera, the 4 unit world directions through the exact image corners (+-tan(fov/2),
    +-tan(fov/2), 1) in the order (-,-), (+,-), (-,+), (+,+), and the camera centres. Rules out an unnormalised or
    batch-normalised direction, a corner's sign, and the 4th (homogeneous) row taken along."""
    c2w = torch.cat([_camera(yaw, pitch), _camera(-pitch, yaw)])
    dirs, origins = P.corner_rays(c2w, fov)
    assert dirs.shape == (2, 4, 3) and origins.shape == (2, 3) and _err(origins, c2w[:, :3, 3]) < 1e-15
    t = math.tan(math.radians(fov) / 2)
    cam = torch.tensor([[-t, -t, 1.0], [t, -t, 1.0], [-t, t, 1.0], [t, t, 1.0]], dtype=torch.float64)
    cam = cam / cam.norm(dim=-1, keepdim=True)
    assert _err(torch.einsum("bji,bkj->bki", c2w[:, :3, :3], dirs), cam.expand(2, 4, 3)) < 1e-12


@PROPERTY
@given(st.floats(0.1, 5.0), st.floats(0.01, 5.0), st.floats(0, 1))
def test_normalised_depth_is_the_affine_map_of_near_far_to_0_1(near, span, t):
    """The generator's depth code sends near to 0, far to 1 and a depth a fraction t of the way to t. Rules out a
    code normalised by far alone, or reversed (far -> 0)."""
    far = near + span
    codes = P.normalize_depths(torch.tensor([near, far, near + t * span], dtype=torch.float64), near, far)
    assert codes.dtype == torch.float32 and _err(codes, [0.0, 1.0, t]) <= 1e-5 * (1 + far / span)


@st.composite
def priors(draw):
    """(fov, sphere centre z = radius, yaw mean, yaw std, pitch mean, pitch std, n stds): priors whose frusta stay
    within the MPI bound. The means are not 0, so the prior is not mirror-symmetric."""
    return (draw(st.floats(8.0, 30.0)), draw(st.floats(0.8, 3.0)), draw(st.floats(-0.3, 0.3)),
            draw(st.floats(0.0, 0.3)), draw(st.floats(-0.2, 0.2)), draw(st.floats(0.0, 0.2)), draw(st.floats(0.5, 2.0)))


def _far_plane_hits(c2w: torch.Tensor, fov: float, far: float) -> torch.Tensor:
    """World (x, y) where the 4 exact image corners' rays of each camera meet z = far: B x 4 x 2."""
    t = math.tan(math.radians(fov) / 2)
    corners = torch.tensor([[sx * t, sy * t, 1.0] for sx in (-1, 1) for sy in (-1, 1)], dtype=torch.float64)
    dirs = torch.einsum("bij,kj->bki", c2w[:, :3, :3], corners)
    s = (far - c2w[:, None, 2, 3]) / dirs[..., 2]
    return c2w[:, None, :2, 3] + s[..., None] * dirs[..., :2]


@PROPERTY
@given(priors(), st.integers(2, 12), st.booleans(), seeds)
def test_background_plane_covers_every_prior_frustum_and_foreground_planes_frame_the_canonical_view(
        prior, n, confined, seed):
    """The background plane (height, width) covers the far-plane footprint of every camera of the prior (sampled at
    random, not on the sizing grid), with at most the 1.001 margin to spare; the other planes are the canonical
    frustum's cross-section at the far depth (confined) or at their own depth. Rules out height and width swapped
    (the footprint is not square), a missing factor 2 (half extents), the margin applied to every plane, and the
    unconfined planes scaled by the far depth, and one frustum corner wrong (the prior's means are not 0, so no
    mirror symmetry hides it)."""
    fov, c, yaw_mean, yaw_std, pitch_mean, pitch_std, n_stds = prior
    depths = P.make_plane_depths(0.9 * c, 1.2 * c, n)
    prior_args = (depths, fov, c, c, yaw_mean, yaw_std, pitch_mean, pitch_std, n_stds)
    if confined:  # the defaults: confined volume, margin 1.001
        ext = P.plane_extents(*prior_args, grid_size=9)
    else:
        ext = P.plane_extents(*prior_args, 1.001, False, 9)
    assert ext.dtype == torch.float32 and ext.shape == (n, 2)
    ext = ext.double()
    far, half_fov = float(depths[-1]), math.tan(math.radians(fov) / 2)
    g = torch.Generator().manual_seed(seed)
    yaw = yaw_mean + (torch.rand(64, generator=g, dtype=torch.float64) * 2 - 1) * n_stds * yaw_std
    pitch = pitch_mean + (torch.rand(64, generator=g, dtype=torch.float64) * 2 - 1) * n_stds * pitch_std
    corners = torch.tensor([[sx, sy] for sx in (-1, 1) for sy in (-1, 1)], dtype=torch.float64)
    yaw = torch.cat([yaw, yaw_mean + corners[:, 0] * n_stds * yaw_std])  # the prior's extreme poses: on the grid
    pitch = torch.cat([pitch, pitch_mean + corners[:, 1] * n_stds * pitch_std])
    hits = _far_plane_hits(C.sphere_c2w(yaw, pitch, c, c, dtype=torch.float64), fov, far)
    half_h, half_w = float(ext[-1, 0]) / 2, float(ext[-1, 1]) / 2
    assert float(hits[..., 1].abs().max()) <= half_h * (1 + 1e-6)
    assert float(hits[..., 0].abs().max()) <= half_w * (1 + 1e-6)
    extreme = hits[-4:].abs().amax(dim=(0, 1))  # the widest footprint is an extreme pose's, up to the margin
    assert _err(extreme * 2 * 1.001, [float(ext[-1, 1]), float(ext[-1, 0])]) <= 1e-5 * float(ext[-1].max())
    own = depths[:-1].double() if not confined else torch.full((n - 1,), far, dtype=torch.float64)
    assert _err(ext[:-1], (2 * own * half_fov)[:, None].expand(n - 1, 2)) <= 1e-6 * far


@PROPERTY
@given(st.floats(0.1, 5.0), st.floats(0.01, 3.0), st.floats(0.01, 3.0), st.integers(2, 12))
def test_texel_centres_span_the_plane_rows_along_y_columns_along_x(depth, h, w, res):
    """Texel (row i, column j) sits at (-W/2 + j W/(R-1), -H/2 + i H/(R-1), depth): the border texels' centres are the
    plane's edges (align_corners=True). Rules out x and y swapped (H != W), rows running up, and texels at cell centres
    (a half-texel inset)."""
    xyz = P.texel_xyz(depth, torch.tensor([h, w]), res)
    assert xyz.shape == (res, res, 3) and xyz.dtype == torch.float32
    xyz = xyz.double()
    lin = torch.linspace(0, 1, res, dtype=torch.float64)
    assert _err(xyz[..., 0], (-w / 2 + lin * w)[None, :].expand(res, res)) <= 1e-6 * (1 + w)
    assert _err(xyz[..., 1], (-h / 2 + lin * h)[:, None].expand(res, res)) <= 1e-6 * (1 + h)
    assert _err(xyz[..., 2], torch.full((res, res), depth)) <= 1e-6 * depth


# ------------------------------------------------------------------------------------------------ the renderer
def _homography_view(texture: np.ndarray, depth: float, extent_hw, c2w: np.ndarray, fov: float, h: int, w: int):
    """Independent reference: the plane z = depth seen by the camera is the homography H = K [r1 r2 depth*r3 + t]
    (w2c = [R|t]) of its (x, y); every pixel centre is mapped back through H^-1, the texture sampled bilinearly
    (texel centres on the plane's edges, zero outside) together with its coverage. Returns (colour x coverage
    C x h x w, camera z-depth of the hit h x w, coverage h x w)."""
    w2c = np.linalg.inv(c2w)
    f = w / (2 * np.tan(np.radians(fov) / 2))
    K = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]])
    H = K @ np.stack([w2c[:3, 0], w2c[:3, 1], depth * w2c[:3, 2] + w2c[:3, 3]], axis=1)
    v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    X = np.linalg.inv(H) @ np.stack([u.ravel(), v.ravel(), np.ones(u.size)])
    x, y = X[0] / X[2], X[1] / X[2]
    z_cam = (w2c[2, 0] * x + w2c[2, 1] * y + w2c[2, 2] * depth + w2c[2, 3]).reshape(h, w)
    th, tw = texture.shape[1:]
    fx, fy = (x / extent_hw[1] + 0.5) * (tw - 1), (y / extent_hw[0] + 0.5) * (th - 1)
    x0, y0 = np.floor(fx).astype(int), np.floor(fy).astype(int)
    colour, cover = np.zeros((texture.shape[0], u.size)), np.zeros(u.size)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - np.abs(fx - xi)) * (1 - np.abs(fy - yi))
            ok = (xi >= 0) & (xi < tw) & (yi >= 0) & (yi < th)
            colour[:, ok] += wgt[ok] * texture[:, yi[ok], xi[ok]]
            cover[ok] += wgt[ok]
    return (colour * cover).reshape(-1, h, w), z_cam, cover.reshape(h, w)


@PROPERTY
@given(cam_angles, cam_angles, st.floats(8.0, 40.0), st.integers(3, 9), st.integers(3, 9), st.integers(2, 7),
       st.integers(2, 7), st.integers(0, 3), seeds)
def test_a_single_opaque_plane_renders_as_the_homography_of_its_texture(yaw, pitch, fov, h, w, th, tw, k, seed):
    """One opaque plane among transparent ones, any camera in front, any image and texture size (not square): the
    render is the plane's homography (colour, coverage and z-depth). Rules out a transposed rotation, the texture's
    x and y (or the extent's height and width) swapped, align_corners=False, rays through pixel corners, and depth
    measured along the ray instead of the optical axis."""
    g = torch.Generator().manual_seed(seed)
    depths = torch.tensor([0.9, 1.0, 1.1, 1.3])
    extents = torch.tensor([[0.3, 0.45], [0.5, 0.35], [0.4, 0.4], [0.9, 1.2]])
    mpi = torch.zeros(1, 4, 4, th, tw)
    mpi[0, :, :3] = torch.rand(4, 3, th, tw, generator=g)  # transparent planes' colours must not show
    mpi[0, k, 3] = 1.0
    c2w = _camera(yaw, pitch)
    out = R.render_mpi(mpi, depths, extents, c2w, fov, h, w, check_inside=False)
    colour, z_cam, cover = _homography_view(mpi[0, k, :3].double().numpy(), float(depths[k]), extents[k].numpy(),
                                            c2w[0].numpy(), fov, h, w)
    assert _err(out["rgb"][0], colour) < 2e-5 and _err(out["alpha"][0, 0], cover) < 2e-5
    assert _err(out["depth"][0, 0], z_cam * cover) < 2e-5


@st.composite
def mpis(draw, min_planes=2, max_planes=5):
    """(mpi 1 x L x 4 x th x tw in [0, 1], ascending depths in [0.5, 3], extents L x 2 in [0.2, 3])."""
    n = draw(st.integers(min_planes, max_planes))
    g = torch.Generator().manual_seed(draw(seeds))
    th, tw = draw(st.integers(2, 6)), draw(st.integers(2, 6))
    depths = torch.sort(0.5 + 2.5 * torch.rand(n, generator=g)).values + torch.arange(n) * 1e-3
    extents = 0.2 + 2.8 * torch.rand(n, 2, generator=g)
    return torch.rand(1, n, 4, th, tw, generator=g), depths, extents


@PROPERTY
@given(mpis(), st.data(), cam_angles, cam_angles, st.integers(3, 8), st.integers(3, 8))
def test_a_fully_transparent_plane_changes_nothing(mpi_planes, data, yaw, pitch, h, w):
    """Inserting a plane of alpha 0 (and arbitrary colour, extent) anywhere in the stack leaves colour, depth and
    accumulated alpha unchanged. Rules out premultiplied instead of straight alpha (the colour would add), a
    transmittance that multiplies by alpha instead of 1 - alpha, and a weight normalised by the planes' count."""
    mpi, depths, extents = mpi_planes
    n = len(depths)
    j = data.draw(st.integers(0, n), label="insert at")
    lo = float(depths[j - 1]) if j > 0 else 0.45
    hi = float(depths[j]) if j < n else 3.5
    new_depth = torch.tensor([data.draw(st.floats(lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo)), label="depth")])
    g = torch.Generator().manual_seed(data.draw(seeds, label="seed"))
    clear = torch.rand(1, 1, 4, *mpi.shape[-2:], generator=g)
    clear[:, :, 3] = 0
    mpi2 = torch.cat([mpi[:, :j], clear, mpi[:, j:]], dim=1)
    depths2 = torch.cat([depths[:j], new_depth, depths[j:]])
    extents2 = torch.cat([extents[:j], 0.2 + torch.rand(1, 2, generator=g), extents[j:]])
    c2w = _camera(yaw, pitch)
    a = R.render_mpi(mpi, depths, extents, c2w, 20.0, h, w, check_inside=False)
    b = R.render_mpi(mpi2, depths2, extents2, c2w, 20.0, h, w, check_inside=False)
    for key in ("rgb", "depth", "alpha"):
        assert _err(a[key], b[key]) < 1e-6


@PROPERTY
@given(mpis(min_planes=3, max_planes=6), st.data(), cam_angles, cam_angles, st.integers(3, 8), st.integers(3, 8))
def test_planes_behind_an_opaque_plane_do_not_show_in_any_order(mpi_planes, data, yaw, pitch, h, w):
    """With plane k opaque and large enough to fill the view, shuffling the textures (and extents) of the planes
    behind it changes neither colour, depth nor alpha. Rules out compositing back to front (plane L-1 taken as the
    nearest), and weights that ignore the transmittance of nearer planes."""
    mpi, depths, extents = mpi_planes
    n = len(depths)
    k = data.draw(st.integers(0, n - 2), label="opaque plane")
    order = data.draw(st.permutations(list(range(k + 1, n))), label="order behind")
    mpi = mpi.clone()
    mpi[0, k, 3] = 1.0
    extents = extents.clone()
    extents[k] = 50.0  # covers every ray of these cameras
    shuffled, ext2 = mpi.clone(), extents.clone()
    shuffled[0, k + 1:] = mpi[0, order]
    ext2[k + 1:] = extents[order]
    c2w = _camera(yaw, pitch)
    a = R.render_mpi(mpi, depths, extents, c2w, 20.0, h, w, check_inside=False)
    b = R.render_mpi(shuffled, depths, ext2, c2w, 20.0, h, w, check_inside=False)
    for key in ("rgb", "depth", "alpha"):
        assert _err(a[key], b[key]) < 1e-6
    assert _err(a["alpha"], torch.ones_like(a["alpha"])) < 1e-6


@PROPERTY
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)), min_size=1,
                max_size=6), st.floats(-0.4, 0.4), st.integers(1, 6))
def test_constant_planes_composite_as_straight_alpha_over_front_to_back(planes, z_cam, chunk):
    """Constant planes (colour c_i, alpha a_i), plane 0 nearest, seen by a camera on the axis: the colour is
    sum_i c_i a_i prod_{j<i} (1 - a_j), the accumulated alpha 1 - prod (1 - a_i), the depth sum_i w_i (d_i - z_cam),
    in one pass or plane_chunk planes at a time. Rules out premultiplied alpha (no a_i factor), the plane's own
    1 - a_i in its weight, back-to-front order, and a colour renormalised by the accumulated alpha."""
    n = len(planes)
    vals = torch.tensor(planes, dtype=torch.float32)  # n x (r, g, b, a)
    depths = torch.linspace(0.5, 2.0, n) if n > 1 else torch.tensor([0.5])
    mpi = vals[None, :, :, None, None].expand(1, n, 4, 3, 3).contiguous()
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[2, 3] = z_cam
    out = R.render_mpi(mpi, depths, torch.full((n, 2), 50.0), c2w, 20.0, 4, 5, check_inside=False,
                       plane_chunk=chunk)
    a = vals[:, 3].double()
    before = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - a, 0)[:-1]])
    wts = a * before
    colour = (wts[:, None] * vals[:, :3].double()).sum(0)
    assert _err(out["rgb"][0], colour[:, None, None].expand(3, 4, 5)) < 1e-5
    assert _err(out["alpha"][0, 0], torch.full((4, 5), 1 - float(torch.prod(1 - a)))) < 1e-5
    assert _err(out["depth"][0, 0], torch.full((4, 5), float((wts * (depths.double() - z_cam)).sum()))) < 1e-5
