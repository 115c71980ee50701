"""The GMPI generator's contracts that parity with the official outputs does not reach: the alpha logits' last steps
(depth ramp, depth2alpha's soft step) against closed forms, which w each alpha branch gets, the official defaults,
token weights at the training depths, construction from a StyleGAN2 and its errors. Each docstring names the wrong
implementations it rules out."""

from __future__ import annotations

import pytest
import torch

from gmpi_lightning.errors import InputError
from gmpi_lightning.nn.alpha import ALPHA_MODES
from gmpi_lightning.nn.gmpi import FlatMPIGenerator, GMPIGenerator, token_interpolation
from gmpi_lightning.nn.synthesis import Generator
from tests.conftest import max_err

SMALL = dict(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, mapping_kwargs=dict(num_layers=2),
             synthesis_kwargs=dict(channel_base=256, channel_max=32))


def _with_logits(G, logit: torch.Tensor):
    """Make every block's alpha branch return 0 except the last, which returns ``logit``: the accumulated logit (the
    upsampled sum over the blocks) is then exactly ``logit``."""
    blocks = [b for b in G.synthesis.blocks() if b.gen_alpha]
    for b in blocks:
        b.alpha = type(b.alpha)()
        last = b is blocks[-1]
        b.alpha.logits = (lambda blk, f, code, tw, last=last:
                          logit.expand(-1, code.shape[0] if blk.alpha.per_plane_logits else 1, -1, -1).clone()
                          if last else torch.zeros(1, 1, blk.resolution, blk.resolution))
    return G


def test_depth_ramp_adds_slope_times_depth_offset_to_every_plane_logit():
    """With alpha_depth_slope s and centre c, plane k's alpha is act(logit + s (d_k - c)): rules out dividing by the
    offset, the offset's sign, and the ramp on one plane only."""
    d = torch.tensor([0.0, 0.25, 0.5, 1.0])
    G = _with_logits(GMPIGenerator(**SMALL, alpha_depth_slope=3.0, alpha_depth_center=0.4).eval(),
                     torch.full((2, 1, 16, 16), 0.2))
    with torch.no_grad():
        alpha = G.synthesize(G.mapping(torch.randn(2, 16), None), d, opaque_background=False)[:, :, 3]
    expected = (torch.tanh(0.2 + 3.0 * (d - 0.4)) + 1) / 2
    assert max_err(alpha, expected[None, :, None, None].expand_as(alpha)) < 1e-6


@pytest.mark.parametrize("z_range,bins", [(1.0, 256), (2.0, 64)])
def test_depth2alpha_is_a_soft_step_of_width_two_deltas_at_the_surface(z_range, bins):
    """depth2alpha turns one surface map s into alpha_k = clamp((d_k - s) / (2 delta) + 0.5, 0, 1), delta =
    z_range / n_bins: rules out delta = range * bins, the step facing the camera, and a step centred elsewhere."""
    delta = z_range / bins
    s = 0.5
    d = torch.tensor([0.0, s - delta, s - delta / 2, s, s + delta / 2, s + delta, 1.0])
    G = GMPIGenerator(**SMALL, alpha_mode="depth2alpha", depth2alpha_z_range=z_range,
                      depth2alpha_n_z_bins=bins).eval()
    G = _with_logits(G, torch.full((1, 1, 16, 16), float(torch.atanh(torch.tensor(2 * s - 1)))))
    with torch.no_grad():
        alpha = G.synthesize(G.mapping(torch.randn(1, 16), None), d, opaque_background=False)[0, :, 3, 5, 5]
    assert max_err(alpha, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0])) < 1e-5


def test_each_block_hands_its_alpha_branch_the_w_of_its_conv1_and_of_its_torgb():
    """Block by block, the alpha branch gets the w that the block's second convolution (conv1) uses and the w of its
    ToRGB, with distinct w per layer (style mixing): rules out the first convolution's w, or one w for all."""
    G = GMPIGenerator(**SMALL).eval()
    ws = torch.randn(1, G.num_ws, 16)
    seen = []
    for b in G.synthesis.blocks():
        orig = b.alpha_features
        b.alpha_features = lambda x, w1, wr, orig=orig: seen.append((w1, wr)) or orig(x, w1, wr)
    with torch.no_grad():
        G.synthesize(ws, torch.linspace(0, 1, 3))
    idx, expected = 0, []
    for b in G.synthesis.blocks():
        expected.append((ws[:, idx + b.num_conv - 1], ws[:, idx + b.num_conv]))
        idx += b.num_conv
    assert len(seen) == len(expected)
    for (w1, wr), (e1, er) in zip(seen, expected):
        assert torch.equal(w1, e1) and torch.equal(wr, er)


def test_defaults_are_the_official_settings():
    """A generator built without GMPI settings has the official configuration (a file without a setting loads as the
    official code would build it): 32 training planes, alpha from 256 px down, depth2alpha 256 bins over 1,
    StyleGAN2-default alpha start, no ramp; learnable tokens start evenly spaced over [0, 1]. Rules out a changed
    default."""
    G = GMPIGenerator(**SMALL)
    defaults = {k: v for k, v in G.init_kwargs.items() if k not in SMALL}
    assert defaults == {"img_channels": 3, "alpha_mode": "normalize_add_z", "pos_enc_multires": 0,
                        "n_train_planes": 32, "token_depths": None, "gen_alpha_largest_res": 256,
                        "separate_background": True, "background_ratio": 0.05, "background_alpha_full": True,
                        "final_activation": "tanh", "depth2alpha_z_range": 1.0, "depth2alpha_n_z_bins": 256,
                        "alpha_init_gain": 1.0, "alpha_init_logit": 0.0, "alpha_depth_slope": 0.0,
                        "alpha_depth_center": 0.0}
    assert G.depth2alpha_delta == pytest.approx(1 / 256)
    tokens = GMPIGenerator(**SMALL, alpha_mode="learnable_tokens", n_train_planes=4).token_depths
    assert max_err(tokens, torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])) < 1e-7


def test_background_ratio_sets_the_border_the_background_is_made_from():
    """The separate background is made from the feature maps' left/right borders of width background_ratio: rules out
    the setting ignored (the default ratio always used)."""
    torch.manual_seed(3)
    z, d = torch.randn(1, 16), torch.linspace(0, 1, 3)
    out = {}
    for ratio in (0.05, 0.25):
        torch.manual_seed(3)
        G = GMPIGenerator(**SMALL, background_ratio=ratio).eval()
        with torch.no_grad():
            out[ratio] = G(z, None, d)
    assert torch.equal(out[0.05][:, 0], out[0.25][:, 0])  # the foreground does not depend on it
    assert float((out[0.05][:, -1, :3] - out[0.25][:, -1, :3]).abs().max()) > 1e-3


def test_alpha_layers_share_the_backbones_conv_clamp():
    """The alpha branch's layers clamp like the backbone's (conv_clamp from synthesis_kwargs), in every mode: rules
    out alpha layers built without the clamp."""
    for mode in ALPHA_MODES:
        G = GMPIGenerator(**{**SMALL, "synthesis_kwargs": {**SMALL["synthesis_kwargs"], "conv_clamp": 77}},
                          alpha_mode=mode)
        heads = [getattr(b, n) for b in G.synthesis.blocks() for n in ("toalpha", "todepth") if hasattr(b, n)]
        assert heads and all(h.conv_clamp == 77 for h in heads), mode


def test_token_weights_at_and_between_the_training_depths():
    """Token weights are one-hot at each training depth (the first and last included), linear in between, clamped
    outside: rules out a lower bound that lets the first depth fall off the table."""
    t = torch.tensor([0.0, 0.2, 0.7, 1.0])
    w = token_interpolation(torch.tensor([0.0, 0.2, 0.7, 1.0, 0.45, -0.5, 2.0]), t)
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0.5, 0.5, 0], [1, 0, 0, 0],
                             [0, 0, 0, 1]], dtype=torch.float32)
    assert max_err(w, expected) < 1e-6


def test_custom_token_depths_are_kept_and_bad_ones_named():
    """token_depths given for learnable_tokens are stored as they are; a wrong count or a non-increasing list is an
    InputError that says what is expected: rules out ignoring the argument and a check that lets equal depths by."""
    td = [0.0, 0.1, 0.5, 1.0]
    G = GMPIGenerator(**SMALL, alpha_mode="learnable_tokens", n_train_planes=4, token_depths=td)
    assert G.token_depths.dtype == torch.float32 and G.token_depths.tolist() == pytest.approx(td)
    for bad in ([0.0, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0], [0.0, 0.6, 0.5, 1.0]):
        with pytest.raises(InputError, match=r"^token_depths must be 4 increasing normalised depths$"):
            GMPIGenerator(**SMALL, alpha_mode="learnable_tokens", n_train_planes=4, token_depths=bad)
    with pytest.raises(InputError, match=r"^GMPI generates RGB planes: img_channels must be 3$"):
        GMPIGenerator(**{**SMALL, "img_channels": 4})


def test_from_stylegan2_passes_the_gmpi_settings_and_refuses_weights_that_do_not_fit():
    """from_stylegan2 builds the GMPI generator with the given settings around the StyleGAN2's weights; a state dict
    with an extra or a missing backbone weight is refused, the message naming the offending keys (not the alpha
    branch's new ones). Rules out settings dropped, and a check that passes unexpected keys."""
    torch.manual_seed(0)
    G2 = Generator(**SMALL, img_channels=3)
    for mode in ALPHA_MODES:
        G = GMPIGenerator.from_stylegan2(G2, alpha_mode=mode, n_train_planes=8, alpha_init_gain=0.5)
        assert (G.alpha_mode, G.n_train_planes, G.init_kwargs["alpha_init_gain"]) == (mode, 8, 0.5)
        assert torch.equal(G.synthesis.b16.conv1.weight, G2.synthesis.b16.conv1.weight)
    extra = Generator(**SMALL, img_channels=3)
    for i in range(6):
        extra.register_buffer(f"stray{i}", torch.zeros(1))
    with pytest.raises(InputError, match=r"unexpected \['stray0', 'stray1', 'stray2', 'stray3', 'stray4'\], "
                                         r"missing \[\]$"):  # the first five named
        GMPIGenerator.from_stylegan2(extra)
    missing = Generator(**SMALL, img_channels=3)
    del missing.synthesis.b16.conv1.weight
    missing.synthesis.b16.conv1.weight = None
    with pytest.raises(InputError, match=r"unexpected \[\], missing \['synthesis.b16.conv1.weight'\]$"):
        GMPIGenerator.from_stylegan2(missing)
    for block in ("b4", "b8"):
        for layer in ("conv1", "torgb", "conv0"):
            if hasattr(getattr(missing.synthesis, block), layer):
                del getattr(getattr(missing.synthesis, block), layer).weight
                getattr(getattr(missing.synthesis, block), layer).weight = None
    with pytest.raises(InputError) as err:
        GMPIGenerator.from_stylegan2(missing)
    assert str(err.value).split("missing ")[1].count("weight") == 5  # the first five named


def test_plane_checks_are_on_by_default_in_forward_and_synthesize():
    """forward and synthesize check the plane depths unless told not to; the message says what is needed: rules out
    the checks off by default or not passed through."""
    G = GMPIGenerator(**SMALL).eval()
    z = torch.randn(1, 16)
    for call in (lambda d, **kw: G(z, None, d, **kw), lambda d, **kw: G.synthesize(G.mapping(z, None), d, **kw)):
        with pytest.raises(InputError, match="at least 2 finite values"):
            call(torch.tensor([0.0, float("nan")]))
        call(torch.tensor([0.0, float("nan")]), check_planes=False)  # told not to read the values
        with pytest.raises(InputError, match=r"^plane_depths \(normalised, L values in \[0, 1\], index 0 nearest\) "
                                             r"are required; e.g. get_preset\('FFHQ256'\).normalized_plane_depths"):
            call(None)


def test_conditional_backbone_gets_its_condition():
    """With a class-conditional backbone (c_dim > 0), G(z, c) maps z with c, in GMPI and the flat baseline: rules out
    the condition dropped on the way to the mapping."""
    torch.manual_seed(1)
    G = GMPIGenerator(**{**SMALL, "c_dim": 3}).eval()
    z, c1, c2 = torch.randn(2, 16), torch.eye(3)[:2], torch.eye(3)[1:]
    d = torch.linspace(0, 1, 3)
    with torch.no_grad():
        assert torch.equal(G(z, c1, d), G.synthesize(G.mapping(z, c1), d))
        assert not torch.equal(G(z, c1, d), G(z, c2, d))
        flat = FlatMPIGenerator(Generator(**{**SMALL, "c_dim": 3}, img_channels=3).eval())
        assert not torch.equal(flat(z, c1, d), flat(z, c2, d))
        expected = ((flat.G(z, c1, noise_mode="const") + 1) / 2).clamp(0, 1)  # psi 1 by default
        assert torch.equal(flat(z, c1, d)[:, 0, :3], expected)
