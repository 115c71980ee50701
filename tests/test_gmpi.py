"""GMPI generator, alpha-branch variants, pose-conditioned D and released-checkpoint loading."""

import io
import json
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from gmpi_lightning import cameras as C
from gmpi_lightning import render as R
from gmpi_lightning.errors import InputError
from gmpi_lightning.io import (
    NetworkFormatError,
    UnsafePickleError,
    load_gmpi_checkpoint,
    load_official_gmpi,
    read_official_config,
    save_gmpi_checkpoint,
)
from gmpi_lightning.nn import Discriminator, Generator
from gmpi_lightning.nn.alpha import instance_normalize
from gmpi_lightning.nn.discriminator import PoseConditionedDiscriminator
from gmpi_lightning.nn.gmpi import (
    FlatMPIGenerator,
    GMPIGenerator,
    border_background,
    positional_encoding,
    token_interpolation,
)
from gmpi_lightning.planes import preset_planes
from gmpi_lightning.presets import get_preset
from tests.conftest import max_err

TOL = 1e-4
FIXTURE_G = dict(z_dim=64, c_dim=0, w_dim=64, img_resolution=32, mapping_kwargs=dict(num_layers=2),
                 synthesis_kwargs=dict(channel_base=1024, channel_max=64, num_fp16_res=0, conv_clamp=None))
SMALL = dict(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, mapping_kwargs=dict(num_layers=2),
             synthesis_kwargs=dict(channel_base=256, channel_max=32))


@pytest.fixture(scope="module")
def fx():
    from tests.conftest import fixture_dir

    d = fixture_dir("gmpi")
    return d, np.load(d / "refs.npz")


def _keys(path, prefix):
    return [line.split("\t")[:2] for line in open(path) if line.startswith(prefix)]


def test_generator_parity_and_state_dict_contract(fx):
    d, refs = fx
    G = GMPIGenerator(**FIXTURE_G).eval()
    G.load_state_dict(torch.load(d / "generator.pth", weights_only=True), strict=True)
    ours = [[f"G.{k}", str(list(v.shape))] for k, v in G.state_dict().items()]
    assert [[k, s.replace(" ", "")] for k, s in _keys(d / "state_dict_keys.txt", "G.")] == \
        [[k, s.replace(" ", "")] for k, s in ours]
    z = torch.from_numpy(refs["z"])
    with torch.no_grad():
        assert max_err(G.mapping(z, None), refs["ws"]) <= TOL
        mpi = G(z, None, torch.from_numpy(refs["normalized_plane_depths_L8"]), noise_mode="const")
    assert mpi.shape == (2, 8, 4, 32, 32)
    assert max_err(mpi, refs["mpi_rgba_L8"]) <= TOL
    # alpha is neither saturated nor constant, so the comparison is informative
    a = mpi[:, :-1, 3]
    assert 0.05 < float(a.mean()) < 0.95 and float(a.std()) > 0.01


def test_discriminator_parity_and_contract(fx):
    d, refs = fx
    D = PoseConditionedDiscriminator(img_resolution=32, channel_base=1024, channel_max=64).eval()
    D.load_state_dict(torch.load(d / "discriminator.pth", weights_only=True), strict=True)
    assert [k for k, _ in _keys(d / "state_dict_keys.txt", "D.")] == [f"D.{k}" for k in D.state_dict()]
    with torch.no_grad():
        for k in range(3):
            c = torch.from_numpy(refs["cam_w2c_flat_L8"][k]).expand(2, 16)
            logits = D(torch.from_numpy(refs["render_rgb_L8"][:, k]), c)
            assert max_err(logits[:, 0], refs["d_logits_L8"][:, k]) <= TOL
            # group size 1: each sample's logit is independent of the rest of the batch
            single = D(torch.from_numpy(refs["render_rgb_L8"][:1, k]), c[:1])
            assert max_err(single, logits[:1]) < 1e-5


def test_generate_render_discriminate_pipeline(fx):
    """z -> MPI -> render from the fixture cameras -> D: the whole GMPI forward against the references."""
    d, refs = fx
    G = load_official_gmpi(d / "generator.pth", d / "config.json")
    D = PoseConditionedDiscriminator(img_resolution=32, channel_base=1024, channel_max=64).eval()
    D.load_state_dict(torch.load(d / "discriminator.pth", weights_only=True))
    planes = preset_planes(get_preset("FFHQ256"), 8)
    c2w = C.sphere_c2w([0.0, 0.3, 0.0], [0.0, 0.0, -0.2], 1.0, 1.0)
    with torch.no_grad():
        mpi = G(torch.from_numpy(refs["z"]), None, planes.normalized)
        for k in range(3):
            img = 2 * R.render_mpi(mpi, planes.depths, planes.extents, c2w[k], 12.6, 32, 32)["rgb"] - 1
            assert max_err(img, refs["render_rgb_L8"][:, k]) <= TOL
            logits = D(img, C.flatten_w2c(c2w[k:k + 1]).expand(2, 16))[:, 0]
            assert max_err(logits, refs["d_logits_L8"][:, k]) <= TOL


def test_mpi_structure_any_plane_count():
    torch.manual_seed(0)
    G = GMPIGenerator(**SMALL).eval()
    z = torch.randn(2, 16)
    preset = get_preset("FFHQ256")
    with torch.no_grad():
        for n in (4, 32, 96):
            mpi = G(z, plane_depths=preset.normalized_plane_depths(n))
            assert mpi.shape == (2, n, 4, 16, 16)
            assert float(mpi.min()) >= 0 and float(mpi.max()) <= 1
            assert bool((mpi[:, -1, 3] == 1).all())  # background alpha forced to 1
            assert max_err(mpi[:, 1:-1, :3], mpi[:, :1, :3].expand(-1, n - 2, -1, -1, -1)) == 0  # shared RGB
            assert max_err(mpi[:, -1, :3], mpi[:, 0, :3]) > 1e-3  # the background RGB differs
        # alpha is a function of depth: the same depth code gives the same alpha whatever L
        a32 = G(z, plane_depths=preset.normalized_plane_depths(32))[:, :-1, 3]
        a96 = G(z, plane_depths=preset.normalized_plane_depths(96))[:, :-1, 3]
        assert max_err(a32[:, 0], a96[:, 0]) < 1e-6
        assert max_err(a32[:, 5], a32[:, 6]) > 1e-4


def test_chunked_plane_generation_matches():
    torch.manual_seed(1)
    G = GMPIGenerator(**SMALL).eval()
    z, codes = torch.randn(2, 16), get_preset("FFHQ256").normalized_plane_depths(37)
    with torch.no_grad():
        full = G(z, plane_depths=codes)
        for chunk in (1, 5, 16):
            assert max_err(G(z, plane_depths=codes, plane_chunk=chunk), full) < 1e-6


def test_gradients_reach_the_alpha_branch():
    torch.manual_seed(2)
    G = GMPIGenerator(**SMALL).train()
    planes = preset_planes(get_preset("FFHQ256"), 6)
    mpi = G(torch.randn(2, 16), plane_depths=planes.normalized, noise_mode="random")
    out = R.render_mpi(mpi, planes.depths, planes.extents, C.sphere_c2w([0.2, -0.1], [0, 0.1], 1, 1),
                       12.6, 16, 16)
    (out["rgb"].square().mean() + out["depth"].mean()).backward()
    for name, p in G.named_parameters():
        if "pos_enc_embed" in name or "toalpha" in name:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    assert float(G.synthesis.b16.conv1.weight.grad.abs().sum()) > 0


def test_from_stylegan2_keeps_the_2d_image():
    torch.manual_seed(3)
    sg2 = Generator(img_channels=3, **SMALL).eval()
    with torch.no_grad():
        for p in sg2.parameters():
            p.add_(0.05 * torch.randn_like(p))
    G = GMPIGenerator.from_stylegan2(sg2).eval()
    b16 = G.synthesis.b16
    assert max_err(b16.pos_enc_embed.affine1.bias, torch.ones(1)) == 0 and max_err(b16.toalpha.bias, [0.0]) == 0
    z = torch.randn(3, 16)
    with torch.no_grad():
        img = sg2(z, noise_mode="const")
        mpi = G(z, plane_depths=get_preset("FFHQ256").normalized_plane_depths(8))
    # the foreground RGB is the pretrained image, squashed by GMPI's tanh into [0, 1]
    assert max_err(mpi[:, 0, :3], (torch.tanh(img) + 1) / 2) < 1e-5


def test_pose_conditioned_d_from_pretrained():
    torch.manual_seed(4)
    D0 = Discriminator(c_dim=0, img_resolution=16, img_channels=3, channel_base=256, channel_max=32,
                       epilogue_kwargs=dict(mbstd_group_size=4)).eval()
    D = PoseConditionedDiscriminator.from_stylegan2(D0).eval()
    assert D.b4.mbstd.group_size == 1 and D.b4.out.weight.shape == (16, 32)
    assert max_err(D.b4.out.weight, D0.b4.out.weight.expand(16, 32)) == 0  # pretrained row broadcast
    assert max_err(D.b4.out.bias, D0.b4.out.bias.expand(16)) == 0
    assert max_err(D.b16.conv0.weight, D0.b16.conv0.weight) == 0
    img, c = torch.randn(2, 3, 16, 16), torch.randn(2, 16)
    with torch.no_grad():
        cmap = D.embed_condition(c)
        assert max_err(cmap.square().mean(1), torch.ones(2)) < 1e-5
        # with identical rows the logit is the unconditional output times sum(cmap) / 4
        feats = {}
        D.b4.out.register_forward_hook(lambda m, i, o: feats.setdefault("o", o))
        logits = D(img, c)
        assert max_err(logits[:, 0], feats["o"][:, 0] * cmap.sum(1) / 4) < 1e-5
    with pytest.raises(ValueError, match="pose condition"):
        D(img, torch.randn(2, 9))


def _pose_batch(n: int, seed: int = 0):
    """n poses across the FFHQ prior's yaw range (flattened w2c) and n random images."""
    g = torch.Generator().manual_seed(seed)
    yaw = torch.linspace(-0.58, 0.58, n, dtype=torch.float64)
    pitch = 0.25 * torch.rand(n, generator=g, dtype=torch.float64) - 0.125
    return C.flatten_w2c(C.sphere_c2w(yaw, pitch, 1.0, 1.0)).float(), torch.randn(n, 3, 16, 16, generator=g)


def test_pose_d_official_start_is_the_2d_logit_times_a_random_gain():
    """Rules out: an init that silently changes the official weight copy (the gain must be sum(cmap)/4, random
    in size and sign), and a gain helper that measures something else."""
    from gmpi_lightning.nn.discriminator import pose_gain

    torch.manual_seed(10)
    D0 = Discriminator(c_dim=0, img_resolution=16, img_channels=3, channel_base=256, channel_max=32,
                       epilogue_kwargs=dict(mbstd_group_size=1)).eval()
    c, img = _pose_batch(9)
    signs = set()
    for seed in range(6):
        torch.manual_seed(seed)
        D = PoseConditionedDiscriminator.from_stylegan2(D0).eval()
        with torch.no_grad():
            logits, base, gain = D(img, c)[:, 0], D0(img)[:, 0], pose_gain(D, c)
        assert max_err(logits, base * gain) < 1e-5
        signs.add(bool((gain < 0).all()))
    assert signs == {True, False}  # some official starts call every image by the opposite verdict


def test_pose_d_pretrained_logit_start_keeps_the_verdict_and_can_learn_the_pose():
    """At every pose the start's logit is the pretrained D's (rules out a wrong row scale, e.g. rows not summing to
    sqrt(cmap_dim), or a pose mapping left random), and one Adam step on a pose-dependent target makes the logit
    depend on the pose (rules out identical rows with a constant cmap: the normalisation then passes no gradient to
    the pose mapping, and D stays unconditional forever)."""
    torch.manual_seed(0)
    D0 = Discriminator(c_dim=0, img_resolution=16, img_channels=3, channel_base=256, channel_max=32,
                       epilogue_kwargs=dict(mbstd_group_size=1)).eval()
    D = PoseConditionedDiscriminator.from_stylegan2(D0, pose_init="pretrained_logit").eval()
    c, img = _pose_batch(16)
    with torch.no_grad():
        assert max_err(D(img, c), D0(img)) < 1e-5
        same = img[:1].expand(16, -1, -1, -1)
        assert float(D(same, c).std()) < 1e-6  # pose-independent at the start
    opt = torch.optim.Adam(D.parameters(), lr=0.002, betas=(0.0, 0.9))
    yaw_sign = torch.linspace(-1, 1, 16)
    for _ in range(5):  # D should learn: images seen from the right are real, from the left fake
        opt.zero_grad()
        (torch.nn.functional.softplus(-yaw_sign * D(same, c)[:, 0])).mean().backward()
        assert float(D.mapping.weight.grad.abs().max()) > 0
        opt.step()
    with torch.no_grad():
        logits = D(same, c)[:, 0]
    # the verdict now depends on the pose (identical rows leave this at 0 to rounding)
    assert float(logits[-4:].mean() - logits[:4].mean()) > 0.02 * float(logits.abs().mean())
    with pytest.raises(ValueError, match="pose_init"):
        PoseConditionedDiscriminator.from_stylegan2(D0, pose_init="zero")


def test_alpha_depth_ramp_moves_the_opaque_layer():
    """A steep ramp centred at depth c puts the start's opaque layer at c (rules out a ramp with the wrong sign, which
    would make the near planes opaque, or one not added to every plane), and the default adds nothing."""
    torch.manual_seed(7)
    preset = get_preset("FFHQ256")
    planes = preset_planes(preset, 32)
    z = torch.randn(2, 16)
    for center in (0.1, 0.5):
        G = GMPIGenerator(**SMALL, alpha_init_gain=0.0, alpha_init_logit=0.0, alpha_depth_slope=60.0,
                          alpha_depth_center=center).eval()
        with torch.no_grad():
            mpi = G(z, plane_depths=planes.normalized)
            w = R.render_mpi(mpi, planes.depths, planes.extents, C.sphere_c2w([0.0], [0.0], 1.0, 1.0), 12.6, 16, 16,
                             return_weights=True)["weights"][:, :, 0, 4:-4, 4:-4].mean(dim=(0, 2, 3))
        expected = int(torch.argmin((planes.normalized - center).abs()))
        assert abs(int(torch.argmax(w)) - expected) <= 1 and float(w[expected - 1:expected + 2].sum()) > 0.9
    torch.manual_seed(8)
    base = GMPIGenerator(**SMALL).eval()
    torch.manual_seed(8)
    zero = GMPIGenerator(**SMALL, alpha_depth_slope=0.0, alpha_depth_center=0.3).eval()
    with torch.no_grad():
        assert max_err(base(z, plane_depths=planes.normalized), zero(z, plane_depths=planes.normalized)) == 0
    with pytest.raises(ValueError, match="depth2alpha"):
        GMPIGenerator(**SMALL, alpha_mode="depth2alpha", alpha_depth_slope=1.0)


@pytest.mark.parametrize("mode", ["add_z", "learnable_tokens", "vanilla", "depth2alpha"])
def test_alpha_branch_variants(mode):
    torch.manual_seed(5)
    G = GMPIGenerator(**SMALL, alpha_mode=mode, n_train_planes=8).eval()
    codes = get_preset("FFHQ256").normalized_plane_depths(8)
    z = torch.randn(2, 16)
    with torch.no_grad():
        mpi = G(z, plane_depths=codes)
    assert mpi.shape == (2, 8, 4, 16, 16) and float(mpi.min()) >= 0 and float(mpi.max()) <= 1
    if mode == "vanilla":
        assert not hasattr(G.synthesis.b16, "pos_enc_embed") and G.synthesis.b16.toalpha.out_channels == 8
        assert float((mpi[:, -1, 3] - 1).abs().max()) > 0  # no forced background alpha in this variant
        with pytest.raises(ValueError, match="exactly 8 planes"):
            G(z, plane_depths=get_preset("FFHQ256").normalized_plane_depths(12))
        return
    assert bool((mpi[:, -1, 3] == 1).all())
    with torch.no_grad():
        other = G(z, plane_depths=get_preset("FFHQ256").normalized_plane_depths(20))
    assert other.shape[1] == 20
    if mode == "depth2alpha":  # a soft step in depth: alpha never decreases with depth
        assert bool((mpi[:, 1:, 3] >= mpi[:, :-1, 3] - 1e-6).all())
    if mode == "learnable_tokens":
        w = token_interpolation(G.token_depths, G.token_depths)
        assert max_err(w, torch.eye(8)) < 1e-6  # training depths pick their own token exactly
        mid = token_interpolation(torch.tensor([0.5 * (float(G.token_depths[2]) + float(G.token_depths[3]))]),
                                  G.token_depths)
        assert max_err(mid[0, 2:4], [0.5, 0.5]) < 1e-6 and float(mid.sum()) == pytest.approx(1.0)


def test_token_interpolation_clamps_outside_the_training_depths():
    """Depths before the first or after the last training depth take that end's token alone: rules out extrapolating
    (negative weights) past either end."""
    t = torch.tensor([0.0, 0.25, 0.6, 1.0])
    w = token_interpolation(torch.tensor([-0.3, 1.4, 0.0, 1.0, 0.425]), t)
    want = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0.5, 0.5, 0]], dtype=torch.float32)
    assert max_err(w, want) < 1e-6 and w.dtype == torch.float32


def test_flat_baseline_is_the_2d_image_on_the_nearest_plane():
    """The 2D StyleGAN2 as an MPI: its image in [0, 1] on plane 0, opaque, nothing on the other planes; every
    generation setting reaches the 2D generator. Rules out the image on another plane, [-1, 1] colours, a
    transparent or partly filled stack, and truncation / noise settings dropped."""
    torch.manual_seed(2)
    G2 = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3, mapping_kwargs=dict(num_layers=1),
                   synthesis_kwargs=dict(channel_base=128, channel_max=16)).eval()
    for p in G2.parameters():  # noise strengths start at 0: make the noise visible
        if p.ndim == 0:
            p.data.fill_(0.5)
    flat = FlatMPIGenerator(G2)
    assert (flat.z_dim, flat.c_dim, flat.img_resolution, flat.mapping) == (8, 0, 16, G2.mapping)
    z = torch.randn(2, 8)
    with torch.no_grad():
        mpi = flat(z, None, torch.linspace(0, 1, 5), truncation_psi=0.6, truncation_cutoff=2)
        img = G2(z, None, truncation_psi=0.6, truncation_cutoff=2, noise_mode="const")
        assert mpi.shape == (2, 5, 4, 16, 16)
        assert max_err(mpi[:, 0, :3], ((img + 1) / 2).clamp(0, 1)) == 0 and bool((mpi[:, 0, 3] == 1).all())
        assert bool((mpi[:, 1:] == 0).all())
        assert not torch.equal(flat(z, None, torch.linspace(0, 1, 5)), mpi)  # psi 1 by default
        a = flat(z, None, [0.0, 1.0], noise_mode="random", noise_generator=torch.Generator().manual_seed(1))
        b = flat(z, None, [0.0, 1.0], noise_mode="random", noise_generator=torch.Generator().manual_seed(1))
        c = flat(z, None, [0.0, 1.0], noise_mode="random", noise_generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_final_activations_and_plane_checks():
    """Each final activation maps the network's output as named (tanh and sigmoid to (0, 1), 'none' a clamp of
    [-1, 1] to [0, 1]); plane depths that cannot work get an error saying what is needed. Rules out a swapped or
    mis-scaled activation and a check that lets too few or non-finite depths through."""
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    want = {"tanh": (torch.tanh(x) + 1) / 2, "sigmoid": torch.sigmoid(x), "none": (x.clamp(-1, 1) + 1) / 2}
    for act, y in want.items():
        G = GMPIGenerator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, mapping_kwargs=dict(num_layers=1),
                          synthesis_kwargs=dict(channel_base=128, channel_max=16), final_activation=act)
        assert max_err(G._activation(x), y) == 0, act
    with pytest.raises(InputError, match="final_activation must be one of"):
        GMPIGenerator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, final_activation="relu")
    with pytest.raises(InputError, match="plane_depths .* are required"):
        G._check_planes(None)
    for bad in ([0.5], [0.0, float("nan"), 1.0]):
        with pytest.raises(InputError, match="at least 2 finite values"):
            G._check_planes(bad)
    assert G._check_planes([0.0, float("nan")], values=False).numel() == 2  # values unread when asked not to
    assert G._check_planes([0.0, 0.5, 1.0]).tolist() == [0.0, 0.5, 1.0] and G._check_planes([0, 1]).dtype == \
        torch.float32


def test_forward_is_mapping_then_synthesize_with_every_setting():
    """G(z, ...) equals synthesize(mapping(z, ...), ...) for each setting, and each setting changes the MPI: rules
    out truncation, the noise mode or stream, or the background's opacity dropped between forward and synthesize;
    and, without a separate background, the last plane repeating the foreground image."""
    torch.manual_seed(4)
    G = GMPIGenerator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, mapping_kwargs=dict(num_layers=1),
                      synthesis_kwargs=dict(channel_base=128, channel_max=16)).eval()
    for p in G.parameters():  # noise strengths start at 0: make the noise visible
        if p.ndim == 0:
            p.data.fill_(0.5)
    z, d = torch.randn(2, 8), torch.linspace(0, 1, 5)
    with torch.no_grad():
        base = G(z, None, d)
        ws = G.mapping(z, None, truncation_psi=0.5, truncation_cutoff=1)
        assert torch.equal(G(z, None, d, truncation_psi=0.5, truncation_cutoff=1), G.synthesize(ws, d))
        assert not torch.equal(G(z, None, d, truncation_psi=0.5, truncation_cutoff=1),
                               G(z, None, d, truncation_psi=0.5))  # the cutoff reaches the mapping
        a = G(z, None, d, noise_mode="random", noise_generator=torch.Generator().manual_seed(1))
        b = G(z, None, d, noise_mode="random", noise_generator=torch.Generator().manual_seed(1))
        c = G(z, None, d, noise_mode="random", noise_generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, base)
        assert bool((base[:, -1, 3] == 1).all())
        soft = G(z, None, d, opaque_background=False)
        assert not bool((soft[:, -1, 3] == 1).all()) and torch.equal(soft[:, :-1], base[:, :-1])
        assert not torch.equal(base[:, -1, :3], base[:, 0, :3])  # a background image of its own
        G.separate_background = False
        same = G(z, None, d)
        assert torch.equal(same[:, -1, :3], same[:, 0, :3]) and torch.equal(same[:, 0, :3], base[:, 0, :3])


def test_positional_encoding_and_alpha_resolution_limit():
    pe = positional_encoding(torch.tensor([0.0, 0.5]), 2)
    assert max_err(pe[1], [0.5, np.sin(0.5), np.cos(0.5), np.sin(1.0), np.cos(1.0)]) < 1e-6
    G = GMPIGenerator(**dict(SMALL, img_resolution=32), pos_enc_multires=3, gen_alpha_largest_res=16).eval()
    assert G.synthesis.b16.pos_enc_embed.weight1.shape[1] == 7 and not hasattr(G.synthesis.b32, "toalpha")
    codes = get_preset("FFHQ256").normalized_plane_depths(6)
    z = torch.randn(1, 16)
    with torch.no_grad():
        before = G(z, plane_depths=codes)
        G.synthesis.b32.conv1.weight.mul_(-1.5)  # the 32 px block changes RGB but not alpha
        after = G(z, plane_depths=codes)
    assert max_err(before[:, :, 3], after[:, :, 3]) < 1e-6 and max_err(before[:, 0, :3], after[:, 0, :3]) > 1e-3


def test_background_features_and_instance_norm():
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 1, 64).expand(1, 1, 2, 64).clone()
    bg = border_background(x)  # R = 64 -> pad 3: columns 0-2 and 61-63 kept, interior blends cols 3 and 60
    assert max_err(bg[..., :3], x[..., :3]) == 0 and max_err(bg[..., 61:], x[..., 61:]) == 0
    t = (torch.arange(3, 61) - 3) / (58 + 1e-8)
    assert max_err(bg[0, 0, 0, 3:61], 3 * (1 - t) + 60 * t) < 1e-4
    y = torch.randn(2, 3, 5, 5) * 4 + 2
    n = instance_normalize(y)
    assert max_err(n.mean((2, 3)), torch.zeros(2, 3)) < 1e-5
    assert max_err(n.var((2, 3), unbiased=True), torch.ones(2, 3)) < 1e-4


def test_missing_plane_depths_is_a_clear_error():
    G = GMPIGenerator(**SMALL)
    with pytest.raises(ValueError, match="plane_depths"):
        G(torch.randn(1, 16))


# --------------------------------------------------------------------------------- checkpoints
def test_official_checkpoint_loading_generator_and_ema(fx, tmp_path):
    d, refs = fx
    codes = torch.from_numpy(refs["normalized_plane_depths_L8"])
    z = torch.from_numpy(refs["z"])
    G = load_official_gmpi(d / "generator.pth", json.loads((d / "config.json").read_text()))
    with torch.no_grad():
        assert max_err(G(z, None, codes), refs["mpi_rgba_L8"]) <= TOL
    # torch_ema file: shadow parameters in parameter order, names from the generator.pth beside it
    run = tmp_path / "run"
    run.mkdir()
    sd = torch.load(d / "generator.pth", weights_only=True)
    torch.save(sd, run / "generator.pth")
    shifted = [p.detach() + 0.01 for p in G.parameters()]
    torch.save({"decay": 0.999, "num_updates": 5, "shadow_params": shifted, "collected_params": None},
               run / "ema.pth")
    G_ema = load_official_gmpi(run / "ema.pth")
    assert max_err(G_ema.synthesis.b8.toalpha.weight, G.synthesis.b8.toalpha.weight + 0.01) < 1e-6
    assert max_err(G_ema.mapping.w_avg, G.mapping.w_avg) == 0  # buffers from generator.pth
    faithful = load_official_gmpi(run / "ema.pth", keep_init_buffers=True)
    assert float(faithful.mapping.w_avg.abs().max()) == 0  # the official evaluation's state (docs/METHOD.md §11.18)
    torch.save({"shadow_params": shifted[:-1]}, run / "ema.pth")
    with pytest.raises(NetworkFormatError, match="EMA parameters"):
        load_official_gmpi(run / "ema.pth")


def _fake_yacs_config(tmp_path, payload):
    mod_pkg, mod = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    mod.CfgNode = CfgNode
    sys.modules.update({"yacs": mod_pkg, "yacs.config": mod})
    try:
        def node(d):
            return CfgNode({k: node(v) if isinstance(v, dict) else v for k, v in d.items()})

        path = tmp_path / "config.pth"
        torch.save(node(payload), path)
        return path
    finally:
        sys.modules.pop("yacs"), sys.modules.pop("yacs.config")


def test_config_pth_is_read_without_code(fx, tmp_path):
    d, refs = fx
    tree = {"SEED": 123, "GMPI": {"MPI": {"n_gen_planes": 32}, "MODEL": {"STYLEGAN2": {
        "torgba_cond_on_pos_enc": "normalize_add_z", "torgba_cond_on_pos_enc_embed_func": "modulated_lrelu",
        "pos_enc_multires": 0, "gen_alpha_largest_res": 256, "background_alpha_full": True,
        "G_final_img_act": "tanh", "torgba_sep_background": True, "build_background_from_rgb": True,
        "build_background_from_rgb_ratio": 0.05, "cond_on_pos_enc_only_alpha": True}}}}
    path = _fake_yacs_config(tmp_path, tree)
    assert read_official_config(path)["GMPI"]["MPI"]["n_gen_planes"] == 32
    G = load_official_gmpi(d / "generator.pth", path)
    assert G.alpha_mode == "normalize_add_z" and G.n_train_planes == 32
    with torch.no_grad():
        mpi = G(torch.from_numpy(refs["z"]), None, torch.from_numpy(refs["normalized_plane_depths_L8"]))
    assert max_err(mpi, refs["mpi_rgba_L8"]) <= TOL

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil_config.pth"
    buf = io.BytesIO()
    pickle.dump({"GMPI": Evil()}, buf, protocol=2)
    evil.write_bytes(buf.getvalue())
    with pytest.raises(UnsafePickleError, match="system"):
        read_official_config(evil)
    with pytest.raises(NetworkFormatError, match="not supported"):
        load_official_gmpi(d / "generator.pth", {"torgba_cond_on_pos_enc": "cat_xyz"})


def test_our_checkpoint_round_trip(tmp_path):
    torch.manual_seed(6)
    G = GMPIGenerator(**SMALL, alpha_mode="learnable_tokens", n_train_planes=6).eval()
    D = PoseConditionedDiscriminator(img_resolution=16, channel_base=256, channel_max=32)
    path = save_gmpi_checkpoint(tmp_path / "ckpt.pt", G, preset=get_preset("FFHQ256").to_dict(), D=D)
    blob = torch.load(path, weights_only=True)
    assert blob["preset"]["name"] == "FFHQ256"
    loaded = load_gmpi_checkpoint(path)
    codes = get_preset("FFHQ256").normalized_plane_depths(9)
    z = torch.randn(2, 16)
    with torch.no_grad():
        assert max_err(loaded["G"](z, plane_depths=codes), G(z, plane_depths=codes)) == 0
    assert max_err(loaded["D"].b4.out.weight, D.b4.out.weight) == 0
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        load_gmpi_checkpoint(tmp_path / "nope.pt")


def test_alpha_initialisation_option():
    torch.manual_seed(7)
    codes = get_preset("FFHQ256").normalized_plane_depths(10)
    G = GMPIGenerator(**SMALL, alpha_init_gain=0.0, alpha_init_logit=-1.5).eval()
    with torch.no_grad():
        a = G(torch.randn(2, 16), plane_depths=codes)[:, :-1, 3]
    # every plane starts at the same alpha (away from the border, where the FIR up-sampling of the per-block
    # constant logits sees zero padding)
    inner = a[..., 6:-6, 6:-6]
    assert max_err(inner, torch.full_like(inner, (np.tanh(-1.5) + 1) / 2)) < 1e-3
    assert max_err(a[:, 0], a[:, -1]) == 0  # and it does not depend on the plane
    official = GMPIGenerator(**SMALL).eval()  # defaults keep StyleGAN2's initialisation (bias 0)
    assert float(official.synthesis.b16.toalpha.bias.detach().abs().sum()) == 0


def test_legacy_format_config_cannot_run_code(tmp_path):
    """torch's legacy (non-zip) container unpickles header records too: those must be restricted as well."""

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "config.pth"
    torch.save({"GMPI": Evil()}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafePickleError, match="system"):
        read_official_config(path)
    assert not (tmp_path / "pwned").exists()
