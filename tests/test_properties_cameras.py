"""Property tests of the camera conventions (docs/METHOD.md §1) with Hypothesis.

Every property holds for all inputs in its range; Hypothesis draws a few hundred of them per test, derandomised
(the same examples on every run and in CI) and without an example database.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from gmpi_lightning import cameras as C

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)
F3 = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))

yaws = st.floats(-3.0, 3.0)
pitches = st.floats(-1.4, 1.4)  # away from the poles, where "no roll" has no meaning
radii = st.floats(0.3, 4.0)
angles = st.floats(-1.2, 1.2)


@st.composite
def rigid(draw) -> torch.Tensor:
    """A random rigid 4 x 4 transform (float64): rotation from a random unit quaternion, translation in [-5, 5]^3."""
    q = np.array([draw(st.floats(-1, 1)) for _ in range(4)])
    if np.linalg.norm(q) < 1e-3:
        q = np.array([1.0, 0.0, 0.0, 0.0])
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = torch.from_numpy(Rotation.from_quat(q / np.linalg.norm(q)).as_matrix())
    m[:3, 3] = torch.tensor([draw(st.floats(-5, 5)) for _ in range(3)], dtype=torch.float64)
    return m


def _close(a, b, tol: float) -> bool:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max()) < tol


@PROPERTY
@given(rigid())
def test_invert_rigid_and_the_flattened_condition_round_trip(m):
    """invert_rigid(M) is M's inverse on both sides and flatten_w2c is that inverse row-major. Rules out a rotation
    block left untransposed (R instead of R^T), a translation -R t or +R^T t, and a column-major flatten (the inverse
    of a rigid transform is not symmetric, so the transposed 16 numbers differ)."""
    inv = C.invert_rigid(m)[0]
    eye = torch.eye(4, dtype=torch.float64)
    assert _close(inv @ m, eye, 1e-12) and _close(m @ inv, eye, 1e-12)
    assert _close(C.flatten_w2c(m)[0].reshape(4, 4), inv, 1e-12)


@PROPERTY
@given(yaws, pitches, st.floats(0.3, 4.0), radii)
def test_sphere_cameras_sit_on_the_sphere_and_look_at_its_centre_upright(yaw, pitch, c, r):
    """A sphere camera is a proper rotation (det +1), its centre lies on the sphere around (0, 0, c), its optical
    axis points at that centre, its x axis is horizontal (no roll) and its y axis points down (world +Y). Rules out
    the sphere centre on another axis or sign ((0, c, 0), (0, 0, -c)), right = forward x down (det -1), and a
    camera upside down (y axis up)."""
    m = C.sphere_c2w(yaw, pitch, c, r, dtype=torch.float64)[0]
    rot, eye = m[:3, :3], m[:3, 3]
    centre = torch.tensor([0.0, 0.0, c], dtype=torch.float64)
    assert _close(rot.T @ rot, torch.eye(3), 1e-12) and abs(float(torch.linalg.det(rot)) - 1) < 1e-12
    assert abs(float((eye - centre).norm()) - r) < 1e-12
    assert _close(rot[:, 2], (centre - eye) / (centre - eye).norm(), 1e-12)
    assert abs(float(rot[1, 0])) < 1e-12  # x axis has no world-y component: no roll
    assert float(rot[1, 1]) > 0  # y axis points down the world (+Y is down)
    assert m[3].tolist() == [0, 0, 0, 1]


@PROPERTY
@given(yaws, pitches, radii)
def test_sign_conventions_and_the_angle_round_trip(yaw, pitch, r):
    """Positive yaw moves the camera to +X, positive pitch moves it up (-Y), yaw = pitch = 0 is the canonical camera
    (identity, at the origin when c = r), and yaw_pitch_from_w2c recovers the angles. Rules out a pitch or yaw sign
    flip, yaw and pitch swapped, and an angle reader that is not the sampler's inverse."""
    m = C.sphere_c2w(yaw, pitch, r, r, dtype=torch.float64)[0]
    eye = m[:3, 3]
    if abs(yaw) > 1e-6:
        assert math.copysign(1, float(eye[0])) == math.copysign(1, yaw)
    if abs(pitch) > 1e-6:
        assert math.copysign(1, float(eye[1])) == -math.copysign(1, pitch)
    y, p = C.yaw_pitch_from_w2c(C.invert_rigid(m), r)
    assert abs(float(y) - yaw) < 1e-5 and abs(float(p) - pitch) < 1e-5
    assert _close(C.sphere_c2w(0.0, 0.0, r, r, dtype=torch.float64)[0], torch.eye(4), 1e-12)


@PROPERTY
@given(rigid(), st.floats(5.0, 60.0), st.integers(2, 9), st.integers(2, 9))
def test_pixel_rays_project_back_to_their_pixel_centres(m, fov, h, w):
    """Each world ray, taken back into the camera and projected with f = W / (2 tan(fov / 2)) and the principal point
    (W/2, H/2), lands on its pixel's centre (u + 0.5, v + 0.5); rays are unit length and start at the camera centre.
    Rules out the rotation applied transposed, u and v swapped (H != W), the principal point at (W-1)/2, rays
    through pixel corners, and a focal from the vertical size or from the full fov."""
    rays, origins = C.pixel_rays(m, fov, h, w)
    assert rays.shape == (1, h, w, 3) and _close(origins[0], m[:3, 3], 1e-12)
    assert _close(rays.norm(dim=-1), torch.ones(1, h, w), 1e-12)
    cam = torch.einsum("ij,hwj->hwi", m[:3, :3].T, rays[0])
    f = w / (2 * math.tan(math.radians(fov) / 2))
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    assert _close(f * cam[..., 0] / cam[..., 2] + w / 2, u + 0.5, 1e-9)
    assert _close(f * cam[..., 1] / cam[..., 2] + h / 2, v + 0.5, 1e-9)
    corners, _ = C.pixel_rays(m, fov, h, w, pixel_centres=False)
    cam0 = m[:3, :3].T @ corners[0, 0, 0]
    assert _close(cam0[:2] / cam0[2] * f, [-w / 2, -h / 2], 1e-9)  # corner (0, 0) is the image's corner


@PROPERTY
@given(st.floats(1.0, 120.0), st.integers(1, 64), st.integers(1, 64))
def test_intrinsics_map_the_fov_edge_to_the_image_edge(fov, h, w):
    """K sends the direction at half the horizontal fov to the right image edge x = W and the optical axis to (W/2,
    H/2). Rules out the fov read in radians, tan(fov) for tan(fov / 2), and the principal point at (W-1)/2 or
    (H/2, W/2)."""
    K = C.intrinsics(fov, h, w, dtype=torch.float64)
    edge = K @ torch.tensor([math.tan(math.radians(fov) / 2), 0.0, 1.0], dtype=torch.float64)
    assert _close(edge, [w, h / 2, 1.0], 1e-9 * max(w, 1))
    assert _close(K @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), [w / 2, h / 2, 1.0], 1e-12)
    assert float(K[0, 1]) == 0 and K[2].tolist() == [0, 0, 1] and float(K[0, 0]) == float(K[1, 1])


@PROPERTY
@given(yaws, st.floats(-1.3, 1.3), st.floats(0.5, 4.0), st.floats(0.3, 3.0), st.floats(0.2, 4.0),
       st.lists(st.floats(-5, 5), min_size=9, max_size=9))
def test_eg3d_labels_convert_back_to_the_gmpi_camera(yaw, pitch, c, r, scale, intr):
    """A GMPI sphere camera written in EG3D's frame (y up, world origin at the sphere centre: c2w_E = F T(0, 0, -c)
    c2w) converts back to its own w2c, whatever the 9 intrinsics numbers, and a camera moved along its ray from the
    centre is put back on the sphere. Rules out a missing or misplaced flip F, the translation T(0, 0, +c), and a
    placement on the sphere that changes the rotation or uses another centre or radius."""
    m = C.sphere_c2w(yaw, pitch, c, r, dtype=torch.float64)[0]
    to_eg3d = C._FLIP_YZ @ torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, -c], [0, 0, 0, 1.0]],
                                        dtype=torch.float64)
    far = m.clone()
    far[:3, 3] = torch.tensor([0.0, 0.0, c], dtype=torch.float64) + scale * (m[:3, 3] - torch.tensor([0.0, 0, c]))
    for cam in (m, far):
        label = torch.cat([(to_eg3d @ cam).reshape(16), torch.tensor(intr, dtype=torch.float64)])
        w2c = C.w2c_from_eg3d_label(label[None], c, r)[0]
        assert _close(w2c, C.invert_rigid(m)[0], 2e-5)
    raw = C.w2c_from_eg3d_label((to_eg3d @ far).reshape(1, 16), c, r, normalize_trans=False)[0]
    assert _close(raw, C.invert_rigid(far)[0], 2e-5)


@PROPERTY
@given(st.lists(angles, min_size=3, max_size=3), st.lists(st.floats(-0.5, 0.5), min_size=3, max_size=3),
       st.floats(0.5, 3.0), st.floats(0.3, 3.0))
def test_deep3dface_poses_compose_in_zyx_order_and_land_on_the_sphere(angle, trans, c, r):
    """The face rotation is R = Rz Ry Rx (scipy's extrinsic 'xyz'), seen through the y/z flip, for any angles; the
    normalised camera lies on the sphere, on the ray from the centre through the raw camera, with the raw rotation.
    Rules out the reverse order Rx Ry Rz, a sign flip in one elementary rotation, and a placement that moves the
    camera off that ray or changes its rotation."""
    raw = C.w2c_from_deep3dface(angle, trans, c, r, normalize_trans=False)[0].double()
    placed = C.w2c_from_deep3dface(angle, trans, c, r)[0].double()
    face = torch.from_numpy(Rotation.from_euler("xyz", angle).as_matrix())
    assert _close(raw[:3, :3], F3 @ face @ F3, 1e-6) and _close(placed[:3, :3], raw[:3, :3], 1e-6)
    centre = torch.tensor([0.0, 0.0, c], dtype=torch.float64)
    eye_raw = C.invert_rigid(raw)[0, :3, 3] - centre
    eye = C.invert_rigid(placed)[0, :3, 3] - centre
    assert abs(float(eye.norm()) - r) < 1e-5 * max(1.0, r)
    assert _close(eye / eye.norm(), eye_raw / eye_raw.norm(), 1e-5)


@PROPERTY
@given(angles, st.booleans(), st.floats(0.5, 3.0))
def test_single_axis_face_poses_are_sphere_cameras_with_the_dataset_angles(a, is_yaw, r):
    """A face turned about one axis only, at the origin, is seen from the sphere camera at (yaw, pitch) =
    (-angle_y, angle_x): exactly the bookkeeping angles the datasets report, and yaw_pitch_from_w2c reads them back.
    Rules out a sign flip of either converter's yaw or pitch, and yaw and pitch swapped between them."""
    angle = [0.0, a, 0.0] if is_yaw else [a, 0.0, 0.0]
    w2c = C.w2c_from_deep3dface(angle, [0.0, 0.0, 0.0], r, r)[0]
    yaw, pitch = C.deep3dface_dataset_angles(angle)
    assert _close(w2c, C.invert_rigid(C.sphere_c2w(yaw.double(), pitch.double(), r, r, dtype=torch.float64))[0],
                  2e-6 * max(1.0, r))
    y, p = C.yaw_pitch_from_w2c(w2c, r)
    assert _close(torch.cat([y, p]), torch.cat([yaw, pitch]), 1e-5)


@PROPERTY
@given(st.integers(1, 200), st.floats(-2, 2), st.floats(0.01, 3.0), st.floats(0.05, 3.0), st.integers(0, 2**31 - 1))
def test_pose_samples_stay_inside_the_truncated_range(n, mean, std, n_stds, seed):
    """The truncated and the uniform prior never leave mean +- n_stds * std, for any std (not only std = 1). Rules
    out bounds that forget the std (+- n_stds) or the mean, and a uniform draw over +- std."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = mean - n_stds * std, mean + n_stds * std
    tol = 1e-5 * (1 + abs(mean) + n_stds * std)
    for method in ("truncated_gaussian", "uniform"):
        yaw, pitch = C.sample_sphere_pose(n, mean, std, mean, std, n_stds, method=method, generator=g)
        for x in (yaw, pitch):
            assert x.shape == (n,) and float(x.min()) >= lo - tol and float(x.max()) <= hi + tol
