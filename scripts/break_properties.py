#!/usr/bin/env python
"""Check that each property and wiring test fails for the wrong implementation it names (docs/TESTING.md).

    python scripts/break_properties.py                  # every break
    python scripts/break_properties.py --only wiring    # the breaks whose test file or label contains "wiring"

Copies the package and the tests to build/property-breaks/, then for each entry of BREAKS puts one plausible wrong
implementation into the copy, runs the property test that names it (without shrinking: the first failing example is
enough), records whether it fails (it must), and restores the copy. Exits non-zero if a break goes unnoticed or the
restored copy does not pass. The working tree is never touched."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]
DST = SRC / "build" / "property-breaks"
PY = sys.executable

BREAKS = [
    # (label, file, old, new, test)
    ("invert_rigid keeps R (no transpose)", "gmpi_lightning/cameras.py",
     "rt = m[:, :3, :3].transpose(1, 2)", "rt = m[:, :3, :3]",
     "tests/test_properties_cameras.py::test_invert_rigid_and_the_flattened_condition_round_trip"),
    ("sphere centre on the y axis", "gmpi_lightning/cameras.py",
     "centre = _axis(2, sphere_center_z, device)", "centre = _axis(1, sphere_center_z, device)",
     "tests/test_properties_cameras.py::test_sphere_cameras_sit_on_the_sphere_and_look_at_its_centre_upright"),
    ("right = forward x down (det -1)", "gmpi_lightning/cameras.py",
     "right = torch.linalg.cross(down_world, forward)", "right = torch.linalg.cross(forward, down_world)",
     "tests/test_properties_cameras.py::test_sphere_cameras_sit_on_the_sphere_and_look_at_its_centre_upright"),
    ("pitch sign flipped", "gmpi_lightning/cameras.py",
     "offset = torch.stack([cp * yaw.sin(), -pitch.sin(), -cp * yaw.cos()], dim=-1)",
     "offset = torch.stack([cp * yaw.sin(), pitch.sin(), -cp * yaw.cos()], dim=-1)",
     "tests/test_properties_cameras.py::test_sign_conventions_and_the_angle_round_trip"),
    ("principal point at (W-1)/2", "gmpi_lightning/cameras.py",
     "dirs = torch.stack([(u - width / 2.0) / f,", "dirs = torch.stack([(u - (width - 1) / 2.0) / f,",
     "tests/test_properties_cameras.py::test_pixel_rays_project_back_to_their_pixel_centres"),
    ("rays rotated by R^T", "gmpi_lightning/cameras.py",
     'world = torch.einsum("bij,hwj->bhwi", c2w[:, :3, :3], dirs)',
     'world = torch.einsum("bji,hwj->bhwi", c2w[:, :3, :3], dirs)',
     "tests/test_properties_cameras.py::test_pixel_rays_project_back_to_their_pixel_centres"),
    ("focal from tan(fov) (full angle)", "gmpi_lightning/cameras.py",
     "return width / (2.0 * math.tan(math.radians(fov_deg) / 2.0))",
     "return width / (2.0 * math.tan(math.radians(fov_deg)))",
     "tests/test_properties_cameras.py::test_intrinsics_map_the_fov_edge_to_the_image_edge"),
    ("EG3D conversion without the y/z flip", "gmpi_lightning/cameras.py",
     "w2c = torch.linalg.inv(c2w) @ _FLIP_YZ @ _translation(-sphere_center_z)",
     "w2c = torch.linalg.inv(c2w) @ _translation(-sphere_center_z)",
     "tests/test_properties_cameras.py::test_eg3d_labels_convert_back_to_the_gmpi_camera"),
    ("Deep3DFace rotation in Rx Ry Rz order", "gmpi_lightning/cameras.py",
     "_rot_z(angle[:, 2]) @ _rot_y(angle[:, 1]) @ _rot_x(angle[:, 0])",
     "_rot_x(angle[:, 0]) @ _rot_y(angle[:, 1]) @ _rot_z(angle[:, 2])",
     "tests/test_properties_cameras.py::test_deep3dface_poses_compose_in_zyx_order_and_land_on_the_sphere"),
    ("dataset yaw = +angle_y", "gmpi_lightning/cameras.py",
     "return -angle[:, 1], angle[:, 0]", "return angle[:, 1], angle[:, 0]",
     "tests/test_properties_cameras.py::test_single_axis_face_poses_are_sphere_cameras_with_the_dataset_angles"),
    ("uniform prior without the std", "gmpi_lightning/cameras.py",
     "yaw = yaw_mean + u[0] * n_truncated_stds * yaw_std", "yaw = yaw_mean + u[0] * n_truncated_stds",
     "tests/test_properties_cameras.py::test_pose_samples_stay_inside_the_truncated_range"),
    ("inverse depths left far-to-near", "gmpi_lightning/planes.py",
     "        d = d.flip(0)\n", "",
     "tests/test_properties_planes_render.py::test_plane_depths_span_near_to_far_with_their_spacing"),
    ("inverse spacing computed in float32", "gmpi_lightning/planes.py",
     "d = 1.0 / torch.linspace(1.0 / far, 1.0 / near, n_planes, dtype=torch.float64)",
     "d = 1.0 / torch.linspace(1.0 / far, 1.0 / near, n_planes, dtype=torch.float32)",
     "tests/test_properties_planes_render.py::test_plane_depths_are_the_exact_spacing_rounded_once_to_float32"),
    ("depth code normalised by far", "gmpi_lightning/planes.py",
     "dtype=torch.float32) - near) / (far - near)", "dtype=torch.float32) - near) / far",
     "tests/test_properties_planes_render.py::test_normalised_depth_is_the_affine_map_of_near_far_to_0_1"),
    ("background height and width swapped", "gmpi_lightning/planes.py",
     "ext[-1, 0] = 2.0 * max_y * spatial_enlarge_factor\n    ext[-1, 1] = 2.0 * max_x * spatial_enlarge_factor",
     "ext[-1, 0] = 2.0 * max_x * spatial_enlarge_factor\n    ext[-1, 1] = 2.0 * max_y * spatial_enlarge_factor",
     "tests/test_properties_planes_render.py::test_background_plane_covers_every_prior_frustum_and_foreground_planes_frame_the_canonical_view"),
    ("one frustum corner's sign wrong", "gmpi_lightning/planes.py",
     "corners = torch.tensor([[-t, -t, 1.0], [t, -t, 1.0]", "corners = torch.tensor([[t, -t, 1.0], [t, -t, 1.0]",
     "tests/test_properties_planes_render.py::test_background_plane_covers_every_prior_frustum_and_foreground_planes_frame_the_canonical_view"),
    ("sizing grid over +-std (n_stds forgotten)", "gmpi_lightning/planes.py",
     "yaws = torch.linspace(yaw_mean - n_stds * yaw_std, yaw_mean + n_stds * yaw_std",
     "yaws = torch.linspace(yaw_mean - yaw_std, yaw_mean + yaw_std",
     "tests/test_properties_planes_render.py::test_pose_grid_spans_the_truncated_prior_plus_its_mean"),
    ("corner directions not normalised", "gmpi_lightning/planes.py",
     "    corners = corners / corners.norm(dim=-1, keepdim=True)\n", "",
     "tests/test_properties_planes_render.py::test_corner_rays_are_unit_directions_through_the_image_corners"),
    ("texel grid x and y swapped", "gmpi_lightning/planes.py",
     'y, x = torch.meshgrid(ys, xs, indexing="ij")', 'x, y = torch.meshgrid(xs, ys, indexing="ij")',
     "tests/test_properties_planes_render.py::test_texel_centres_span_the_plane_rows_along_y_columns_along_x"),
    ("grid_sample align_corners=False", "gmpi_lightning/render.py",
     'padding_mode="zeros", align_corners=True)', 'padding_mode="zeros", align_corners=False)',
     "tests/test_properties_planes_render.py::test_a_single_opaque_plane_renders_as_the_homography_of_its_texture"),
    ("texture x scaled by the plane's height", "gmpi_lightning/render.py",
     "sx = (2 / ext[None, :, 1])", "sx = (2 / ext[None, :, 0])",
     "tests/test_properties_planes_render.py::test_a_single_opaque_plane_renders_as_the_homography_of_its_texture"),
    ("depth along the ray, not the optical axis", "gmpi_lightning/render.py",
     'z_per_s = (torch.einsum("bhwi,bi->bhw", rays, c2w[:, :3, 2]) / rays[..., 2])',
     "z_per_s = (1.0 / rays[..., 2])",
     "tests/test_properties_planes_render.py::test_a_single_opaque_plane_renders_as_the_homography_of_its_texture"),
    ("premultiplied alpha (colour not weighted by alpha)", "gmpi_lightning/render.py",
     "return (w * rgb).sum(1), out_depth", "return (before * rgb).sum(1), out_depth",
     "tests/test_properties_planes_render.py::test_a_fully_transparent_plane_changes_nothing"),
    ("transmittance multiplied by alpha", "gmpi_lightning/render.py",
     "keep = torch.cumprod(1.0 - alpha + TRANSMITTANCE_EPS, dim=1)",
     "keep = torch.cumprod(alpha + TRANSMITTANCE_EPS, dim=1)",
     "tests/test_properties_planes_render.py::test_a_fully_transparent_plane_changes_nothing"),
    ("compositing back to front", "gmpi_lightning/render.py",
     "    keep = torch.cumprod(1.0 - alpha + TRANSMITTANCE_EPS, dim=1)\n",
     "    rgb, alpha = rgb.flip(1), alpha.flip(1)\n    depth = depth.flip(1) if depth is not None else None\n"
     "    keep = torch.cumprod(1.0 - alpha + TRANSMITTANCE_EPS, dim=1)\n",
     "tests/test_properties_planes_render.py::test_planes_behind_an_opaque_plane_do_not_show_in_any_order"),
    ("weight includes the plane's own 1 - alpha", "gmpi_lightning/render.py",
     "    w = alpha * before\n", "    w = alpha * keep\n",
     "tests/test_properties_planes_render.py::test_constant_planes_composite_as_straight_alpha_over_front_to_back"),
    ("colour renormalised by the accumulated alpha", "gmpi_lightning/render.py",
     "return (w * rgb).sum(1), out_depth", "return (w * rgb).sum(1) / (w.sum(1) + 1e-8), out_depth",
     "tests/test_properties_planes_render.py::test_constant_planes_composite_as_straight_alpha_over_front_to_back"),
    # The recipe's wiring: one-line slips that train a worse model without an error (tests/test_wiring.py).
    ("D judges the unshaded render after shading.start", "gmpi_lightning/views.py",
     "return self.render(self.shade(mpi, generator, shade_at), cond)", "return self.render(mpi, cond)",
     "tests/test_wiring.py::test_d_sees_the_shaded_render_of_each_fake_at_its_own_camera"),
    ("add_z normalises its features like normalize_add_z", "gmpi_lightning/nn/alpha.py",
     '    name, normalize = "add_z", False', '    name, normalize = "add_z", True',
     "tests/test_wiring.py::test_every_alpha_mode_matches_a_naive_reference"),
    ("G trains on the best candidate view (argmax)", "gmpi_lightning/views.py",
     "logits.argmin(dim=1)]", "logits.argmax(dim=1)]",
     "tests/test_wiring.py::test_g_step_trains_on_the_worst_candidate_view"),
    ("D loss with real and fake swapped", "gmpi_lightning/module.py",
     "loss = d_logistic_loss(real_logits, fake_logits)", "loss = d_logistic_loss(fake_logits, real_logits)",
     "tests/test_wiring.py::test_losses_move_the_logits_their_way"),
    ("EMA lerp weights swapped", "gmpi_lightning/losses.py",
     "torch._foreach_lerp_(ema_params, live_params, 1.0 - beta)", "torch._foreach_lerp_(ema_params, live_params, beta)",
     "tests/test_wiring.py::test_ema_is_lerp_with_the_logged_beta"),
    ("lazy R1 not scaled by its interval", "gmpi_lightning/module.py",
     "r1_penalty(real_logits, real, hp.r1_gamma) * hp.r1_every", "r1_penalty(real_logits, real, hp.r1_gamma)",
     "tests/test_wiring.py::test_r1_has_the_size_of_gamma_over_2_grad_squared_times_its_interval"),
    ("the alpha branch gets metric depths", "gmpi_lightning/scene.py",
     "return G(z, None, self.planes.normalized,", "return G(z, None, self.planes.depths,",
     "tests/test_wiring.py::test_generator_gets_normalised_depths_and_the_renderer_metric_ones"),
]


def main() -> int:
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    breaks = [b for b in BREAKS if only in b[0] or only in b[4]]
    shutil.rmtree(DST, ignore_errors=True)
    for name in ("gmpi_lightning", "tests", "datamodules", "callbacks"):
        shutil.copytree(SRC / name, DST / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(SRC / "pyproject.toml", DST / "pyproject.toml")
    env = {**os.environ, "PYTHONPATH": str(DST), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "HYPOTHESIS_PROFILE": "mutation"}  # tests/conftest.py: no shrinking
    rows, ok = [], True
    for label, file, old, new, test in breaks:
        path = DST / file
        original = path.read_text()
        assert original.count(old) == 1, (label, old)
        path.write_text(original.replace(old, new))
        start = time.monotonic()
        r = subprocess.run([PY, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test], cwd=DST, env=env,
                           capture_output=True, text=True)
        path.write_text(original)
        failed = r.returncode == 1
        ok &= failed
        last = (r.stdout.strip().splitlines() or ["?"])[-1]
        verdict = "fails" if failed else "**passes**"
        rows.append(f"| {label} | `{file}` | `{test.split('::')[1]}` | {verdict} ({last}) |")
        print(rows[-1], f"{time.monotonic() - start:.0f}s", flush=True)
    files = sorted({b[4].split("::")[0] for b in breaks})
    clean = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=DST, env=env,
                           capture_output=True, text=True)
    print("restored copy:", clean.stdout.strip().splitlines()[-1])
    return 0 if ok and clean.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
