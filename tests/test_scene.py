"""The Scene: what it hands the generator and the renderer, and what it forwards to them (scene.py)."""

import numpy as np
import pytest
import torch

from gmpi_lightning.cameras import sphere_c2w
from gmpi_lightning.errors import InputError
from gmpi_lightning.nn.gmpi import GMPIGenerator
from gmpi_lightning.presets import get_preset
from gmpi_lightning.scene import Scene, generated_planes, seed_latents

PRESET = get_preset("FFHQ256", resolution=16)


def _G(mode="normalize_add_z", seed=0):
    torch.manual_seed(seed)
    return GMPIGenerator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, mapping_kwargs=dict(num_layers=1),
                         synthesis_kwargs=dict(channel_base=128, channel_max=16), alpha_mode=mode,
                         n_train_planes=6).eval()


def test_plane_count_is_the_request_except_for_the_vanilla_branch():
    """Rules out the vanilla branch's fixed count applied to every mode, or to none."""
    assert generated_planes(_G(), 11) == 11 and Scene.for_generator(_G(), PRESET, 11).planes.depths.numel() == 11
    vanilla = _G("vanilla")
    assert generated_planes(vanilla, 11) == 6 and Scene.for_generator(vanilla, PRESET, 11).planes.depths.numel() == 6
    assert Scene.for_generator(_G(), PRESET, 5).device == torch.device("cpu")  # the default device


def test_seed_latents_are_nvlabs_float32():
    z = seed_latents([3, 7], 5)
    want = np.stack([np.random.RandomState(s).randn(5) for s in (3, 7)]).astype(np.float32)
    assert z.dtype == torch.float32 and z.device == torch.device("cpu") and np.array_equal(z.numpy(), want)
    assert torch.equal(Scene(PRESET, 4).seed_latents([3, 7], 5), z)


def test_to_keeps_the_scene_or_moves_everything():
    scene = Scene(PRESET, 7)
    assert scene.to("cpu") is scene
    moved = scene.to("meta")
    assert moved is not scene and moved.device.type == "meta" and moved.preset is PRESET
    assert moved.planes.depths.shape == scene.planes.depths.shape and moved.planes.depths.device.type == "meta"


def test_camera_is_the_float64_sphere_camera_and_sampling_uses_the_given_stream():
    """Rules out the yaw cast to float32 before the camera is built, and a sampler that ignores its generator
    (drawing from, and moving, the global stream)."""
    scene = Scene(PRESET, 4)
    pitch = torch.tensor([0.1], dtype=torch.float64)
    want = sphere_c2w(torch.tensor([0.3], dtype=torch.float64), pitch, PRESET.sphere_center_z, PRESET.sphere_r)
    assert torch.equal(scene.camera([0.3], pitch), want)  # a float32 yaw would be 1e-8 off
    torch.manual_seed(1)
    expected_next = torch.rand(3)
    torch.manual_seed(1)
    a = scene.sample_cameras(5, torch.Generator().manual_seed(4))
    assert torch.equal(torch.rand(3), expected_next)  # the global stream did not move
    assert torch.equal(a, scene.sample_cameras(5, torch.Generator().manual_seed(4)))
    assert not torch.equal(a, scene.sample_cameras(5, torch.Generator().manual_seed(5)))


def test_generate_forwards_every_setting_and_the_normalised_depths():
    """Rules out a default truncation other than 1, settings dropped on the way to G (truncation, noise mode, the
    noise stream), or metric depths handed to G."""
    G, scene = _G(), Scene(PRESET, 5)
    for p in G.parameters():  # noise strengths start at 0: make the noise visible
        if p.ndim == 0:
            p.data.fill_(0.5)
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = G(z, None, scene.planes.normalized, truncation_psi=1.0, noise_mode="const")
        assert torch.equal(scene.generate(G, z), ref)
        assert torch.equal(scene.generate(G, z, truncation_psi=0.5),
                           G(z, None, scene.planes.normalized, truncation_psi=0.5, noise_mode="const"))
        assert not torch.equal(scene.generate(G, z, truncation_psi=0.5), ref)
        a = scene.generate(G, z, noise_mode="random", noise_generator=torch.Generator().manual_seed(2))
        b = scene.generate(G, z, noise_mode="random", noise_generator=torch.Generator().manual_seed(2))
        c = scene.generate(G, z, noise_mode="random", noise_generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, ref)


def test_render_forwards_weights_checks_and_validation():
    """Rules out weights returned when not asked (or not when asked), and check_inside / validate not reaching the
    renderer."""
    scene = Scene(PRESET, 4)
    mpi = torch.rand(1, 4, 4, 16, 16)
    cam = scene.camera(torch.tensor([0.1]), torch.tensor([0.0]))
    assert "weights" not in scene.render(mpi, cam)
    assert scene.render(mpi, cam, return_weights=True)["weights"].shape[1] == 4
    far = scene.camera(torch.tensor([1.4]), torch.tensor([0.0]))  # outside the volume the planes cover
    with pytest.raises(InputError):
        scene.render(mpi, far)
    assert scene.render(mpi, far, check_inside=False)["rgb"].shape == (1, 3, 16, 16)
    bad = mpi * 3  # values outside [0, 1]
    with pytest.raises(InputError):
        scene.render(bad, cam)
    assert torch.isfinite(scene.render(bad, cam, validate=False)["rgb"]).all()
