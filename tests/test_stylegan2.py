"""StyleGAN2-ADA networks: parity with NVlabs references, architecture rules, and behaviour with numbers."""

import numpy as np
import pytest
import torch

from gmpi_lightning.io import load_stylegan2_pkl
from gmpi_lightning.nn import Discriminator, FullyConnectedLayer, Generator
from gmpi_lightning.nn.discriminator import MinibatchStdLayer
from gmpi_lightning.nn.layers import Conv2dLayer
from gmpi_lightning.nn.ops import normalize_2nd_moment
from tests.conftest import max_err

TOL = 1e-4


def _tiny_g(res=32, c_dim=0, **synth):
    synthesis_kwargs = dict(channel_base=256, channel_max=32, **synth)
    return Generator(z_dim=16, c_dim=c_dim, w_dim=24, img_resolution=res, img_channels=3,
                     mapping_kwargs=dict(num_layers=3), synthesis_kwargs=synthesis_kwargs)


# ---------------------------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def sg2(request):
    from tests.conftest import fixture_dir

    path = fixture_dir("stylegan2_ada")
    return load_stylegan2_pkl(path / "network-snapshot-000000.pkl"), np.load(path / "refs.npz")


def test_parity_mapping_and_truncation(sg2):
    nets, refs = sg2
    z, c = torch.from_numpy(refs["z"]), torch.zeros(4, 0)
    with torch.no_grad():
        assert max_err(nets["G_ema"].mapping(z, c), refs["ws"]) <= TOL
        assert max_err(nets["G_ema"].mapping(z, c, truncation_psi=0.7), refs["ws_trunc0.7"]) <= TOL


def test_parity_images(sg2):
    nets, refs = sg2
    z, c = torch.from_numpy(refs["z"]), torch.zeros(4, 0)
    with torch.no_grad():
        img = nets["G_ema"](z, c, noise_mode="const")
        img_t = nets["G_ema"](z, None, truncation_psi=0.7, noise_mode="const")
    assert max_err(img, refs["img"]) <= TOL
    assert max_err(img_t, refs["img_trunc0.7"]) <= TOL
    assert float(img.std()) > 0.1  # the reference is not a degenerate image


@pytest.mark.parametrize("src,key", [("img", "d_logits_img"), ("img_trunc0.7", "d_logits_img_trunc0.7"),
                                     ("rand_img", "d_logits_rand_img")])
def test_parity_discriminator(sg2, src, key):
    nets, refs = sg2
    with torch.no_grad():
        logits = nets["D"](torch.from_numpy(refs[src]), torch.zeros(4, 0))
    assert logits.shape == (4, 1)
    assert max_err(logits, refs[key]) <= TOL


def test_state_dict_names_shapes_and_order_match_nvlabs(sg2):
    from tests.conftest import fixture_dir

    nets, _ = sg2
    rows = [line.rstrip("\n").split("\t") for line in open(fixture_dir("stylegan2_ada") / "state_dict_keys.txt")
            if not line.startswith("#")]
    ours = []
    for prefix in ("G", "D"):
        module = nets[prefix]
        params = {n for n, _ in module.named_parameters()}
        for name, t in module.state_dict().items():
            ours.append([f"{prefix}.{name}", str(list(t.shape)).replace(" ", ""), "float32",
                         "param" if name in params else "buffer"])
    rows = [[r[0], r[1].replace(" ", ""), r[2], r[3]] for r in rows]
    assert ours == rows
    assert list(nets["G_ema"].state_dict()) == list(nets["G"].state_dict())


# --------------------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("res,num_ws", [(32, 8), (64, 10), (256, 14), (512, 16), (1024, 18)])
def test_num_ws_and_channels_follow_resolution(res, num_ws):
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=res, img_channels=3,
                  synthesis_kwargs=dict(channel_base=8 * res, channel_max=8), mapping_kwargs=dict(num_layers=1))
    assert G.num_ws == num_ws
    assert G.synthesis.block_resolutions[-1] == res
    D = Discriminator(c_dim=0, img_resolution=res, img_channels=3, channel_base=8 * res, channel_max=8)
    assert D.block_resolutions == [2**i for i in range(int(np.log2(res)), 2, -1)]


def test_ffhq256_channel_layout():
    kwargs = dict(channel_base=16384, channel_max=512, num_fp16_res=4, conv_clamp=256)
    syn = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=256, img_channels=3, synthesis_kwargs=kwargs).synthesis
    assert syn.channels == {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64}
    # fp16 on the 4 highest resolutions (from 32 px for a 256 px network), as NVlabs.
    assert [b.use_fp16 for b in syn.blocks()] == [False, False, False, True, True, True, True]


@pytest.mark.parametrize("res", [8, 64])
def test_forward_shapes_other_configurations(res):
    G = _tiny_g(res, c_dim=5, architecture="skip")
    D = Discriminator(c_dim=5, img_resolution=res, img_channels=3, channel_base=256, channel_max=32, cmap_dim=7,
                      epilogue_kwargs=dict(mbstd_group_size=2))
    z, c = torch.randn(4, 16), torch.randn(4, 5)
    img = G(z, c, noise_mode="const")
    assert img.shape == (4, 3, res, res) and torch.isfinite(img).all()
    assert D(img, c).shape == (4, 1)


@pytest.mark.parametrize("arch", ["orig", "resnet"])
def test_other_synthesis_architectures(arch):
    G = _tiny_g(16, architecture=arch).eval()
    img = G(torch.randn(2, 16), noise_mode="const")
    assert img.shape == (2, 3, 16, 16)
    has_torgb = [hasattr(b, "torgb") for b in G.synthesis.blocks()]
    assert has_torgb == ([False, False, True] if arch == "orig" else [False, False, True])


def test_conv_clamp_bounds_activations():
    G = _tiny_g(16, conv_clamp=0.5).eval()
    feats = []
    for blk in G.synthesis.blocks():
        blk.conv1.register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        G(torch.randn(3, 16), noise_mode="const")
    assert all(float(f.abs().max()) <= 0.5 + 1e-6 for f in feats)
    assert max(float(f.abs().max()) for f in feats) > 0.49  # the clamp was actually reached


def test_wrong_shapes_are_clear_errors():
    G = _tiny_g(16)
    with pytest.raises(ValueError, match="z: expected shape"):
        G(torch.randn(2, 15))
    with pytest.raises(ValueError, match="ws: expected shape"):
        G.synthesis(torch.randn(2, G.num_ws + 1, 24))
    Gc = _tiny_g(16, c_dim=3)
    with pytest.raises(ValueError, match="conditional"):
        Gc(torch.randn(2, 16), None)
    D = Discriminator(c_dim=0, img_resolution=16, img_channels=3, channel_base=256, channel_max=16)
    with pytest.raises(ValueError, match="D input image"):
        D(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="power of two"):
        _tiny_g(48)
    with pytest.raises(ValueError, match="channel_base"):
        Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=64, img_channels=3,
                  synthesis_kwargs=dict(channel_base=32))


# ------------------------------------------------------------------------------------------ behaviour
def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    G = _tiny_g(16, c_dim=2).train()
    D = Discriminator(c_dim=2, img_resolution=16, img_channels=3, channel_base=256, channel_max=16).train()
    for layer in G.modules():  # noise_strength starts at 0: give it a value so its gradient is informative
        if hasattr(layer, "noise_strength"):
            layer.noise_strength.data.fill_(0.1)
    c = torch.randn(4, 2)
    D(G(torch.randn(4, 16), c), c).sum().backward()
    for name, p in list(G.named_parameters()) + list(D.named_parameters()):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, f"no gradient for {name}"


def test_equalized_lr_scaling():
    torch.manual_seed(0)
    fc = FullyConnectedLayer(256, 64, lr_multiplier=0.01)
    # Stored weights are N(0, 1/lr^2); the runtime gain lr/sqrt(fan_in) gives unit-variance outputs.
    assert abs(float(fc.weight.std()) - 100.0) < 3.0
    assert fc.weight_gain == pytest.approx(0.01 / 16)
    with torch.no_grad():
        y = fc(torch.randn(4096, 256))
        assert abs(float(y.std()) - 1.0) < 0.1
    fc.bias.data.fill_(5.0)
    with torch.no_grad():
        assert float(fc(torch.zeros(1, 256)).mean()) == pytest.approx(0.05)  # bias_gain = lr_multiplier
    conv = Conv2dLayer(8, 4, kernel_size=3)
    assert conv.weight_gain == pytest.approx(1 / np.sqrt(8 * 9))
    # The gradient w.r.t. the stored weight carries the same gain (equalised learning rate).
    x = torch.randn(2, 256)
    fc(x).sum().backward()
    assert max_err(fc.weight.grad, (x.sum(0) * fc.weight_gain).expand(64, 256)) < 1e-4


def test_noise_modes():
    G = _tiny_g(16).eval()
    z = torch.randn(2, 16)
    with torch.no_grad():
        for layer in G.modules():
            if hasattr(layer, "noise_strength"):
                layer.noise_strength.fill_(0.3)
        const1, const2 = G(z, noise_mode="const"), G(z, noise_mode="const")
        torch.manual_seed(5)
        rand1 = G(z, noise_mode="random")
        torch.manual_seed(5)
        rand1b = G(z, noise_mode="random")
        rand2 = G(z, noise_mode="random")
        none = G(z, noise_mode="none")
        assert max_err(const1, const2) == 0 and max_err(rand1, rand1b) == 0
        assert max_err(rand1, rand2) > 1e-3 and max_err(const1, none) > 1e-3
        for layer in G.modules():
            if hasattr(layer, "noise_strength"):
                layer.noise_strength.zero_()
        assert max_err(G(z, noise_mode="const"), G(z, noise_mode="none")) == 0
        assert max_err(G(z, noise_mode="random"), G(z, noise_mode="none")) == 0
    with pytest.raises(ValueError, match="noise_mode"):
        G(z, noise_mode="fixed")


def test_truncation_and_cutoff():
    G = _tiny_g(16).eval()
    G.mapping.w_avg.copy_(torch.randn(24))
    z = torch.randn(3, 16)
    with torch.no_grad():
        ws = G.mapping(z, None)
        ws0 = G.mapping(z, None, truncation_psi=0.0)
        assert max_err(ws0, G.mapping.w_avg.expand_as(ws0)) < 1e-6
        ws_half = G.mapping(z, None, truncation_psi=0.5)
        assert max_err(ws_half, 0.5 * (ws + G.mapping.w_avg)) < 1e-5
        cut = G.mapping(z, None, truncation_psi=0.5, truncation_cutoff=2)
        assert max_err(cut[:, :2], ws_half[:, :2]) < 1e-6 and max_err(cut[:, 2:], ws[:, 2:]) == 0
        imgs = G(z, truncation_psi=0.0, noise_mode="const")
        assert max_err(imgs[0], imgs[2]) < 1e-5  # psi = 0: every latent gives the mean image


def test_w_avg_tracking_in_training_mode():
    G = _tiny_g(16).train()
    G.mapping.w_avg.fill_(1.0)
    z = torch.randn(8, 16)
    ws = G.mapping(z, None, skip_w_avg_update=True)
    G.mapping(z, None)
    expected = ws[:, 0].mean(0) * (1 - 0.995) + 0.995 * 1.0
    assert max_err(G.mapping.w_avg, expected) < 1e-5
    G.eval()
    before = G.mapping.w_avg.clone()
    G.mapping(z, None)
    assert max_err(G.mapping.w_avg, before) == 0


def test_training_mode_unfused_modconv_matches_eval():
    G = _tiny_g(16).eval()
    z = torch.randn(3, 16)
    with torch.no_grad():
        fused = G(z, noise_mode="const")
        unfused = G(z, noise_mode="const", fused_modconv=False)
    assert max_err(fused, unfused) < 1e-4


def test_minibatch_std_grouping():
    x = torch.zeros(4, 2, 1, 1)
    x[:, 0, 0, 0] = torch.tensor([0.0, 10.0, 2.0, 10.0])  # groups (size 2, strided): {0, 2} and {1, 3}
    y = MinibatchStdLayer(group_size=2)(x)
    extra = y[:, 2, 0, 0]
    std02 = (np.sqrt(1.0 + 1e-8) + np.sqrt(1e-8)) / 2  # channel 0 std 1, channel 1 std 0, averaged
    std13 = np.sqrt(1e-8)
    assert max_err(extra, [std02, std13, std02, std13]) < 1e-6
    one = MinibatchStdLayer(group_size=1)(torch.randn(3, 4, 2, 2))[:, 4]
    assert max_err(one, torch.full_like(one, 1e-4)) < 1e-9  # group size 1: a constant channel
    with pytest.raises(ValueError, match="divisible"):
        MinibatchStdLayer(group_size=4)(torch.randn(6, 4, 2, 2))


def test_projection_conditioning():
    torch.manual_seed(0)
    D = Discriminator(c_dim=3, img_resolution=8, img_channels=3, channel_base=64, channel_max=8, cmap_dim=5,
                      mapping_kwargs=dict(num_layers=2)).eval()
    img, c = torch.randn(2, 3, 8, 8), torch.randn(2, 3)
    captured = {}
    D.b4.out.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    logits = D(img, c)
    cmap = D.mapping(None, c)
    assert cmap.shape == (2, 5)
    assert max_err(logits, (captured["out"] * cmap).sum(1, keepdim=True) / np.sqrt(5)) < 1e-6
    assert max_err(D(img, -c), logits) > 1e-4  # the label changes the logit


def test_normalize_2nd_moment():
    x = torch.randn(5, 64) * 3
    assert max_err(normalize_2nd_moment(x).square().mean(1), torch.ones(5)) < 1e-5
