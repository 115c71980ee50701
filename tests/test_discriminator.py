"""The discriminator's wiring beyond the parity fixtures: constructor choices reaching the network, the pose-conditioned
start keeping every choice of the pretrained D, the skip architecture, the condition's checks and the row pattern.
Each test names the slip it rules out."""

import math

import pytest
import torch

from gmpi_lightning.nn import Discriminator
from gmpi_lightning.nn.discriminator import (
    DiscriminatorBlock,
    MinibatchStdLayer,
    PoseConditionedDiscriminator,
    row_pattern,
)
from gmpi_lightning.nn.ops import downsample2d, setup_filter
from tests.conftest import max_err

SMALL = dict(img_resolution=16, channel_base=256, channel_max=32)


def _shapes(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _trainable(module: torch.nn.Module) -> set:
    return {k for k, _ in module.named_parameters()}


def _clamps(module: torch.nn.Module) -> set:
    return {m.conv_clamp for m in module.modules() if hasattr(m, "conv_clamp")}


def test_pose_d_constructor_choices_reach_the_network_and_its_record():
    """Every constructor argument of the pose-conditioned D shows in the network (image channels, channel widths,
    fp16 blocks, conv clamp, architecture, block and epilogue options, cmap size, mbstd group) and in init_kwargs, from
    which the same network is rebuilt; the defaults are the official D's. Rules out an argument dropped on the way to
    the base class (e.g. the architecture, the conv clamp, the epilogue options) and a record that names or stores
    a value wrongly."""
    kw = dict(img_resolution=16, img_channels=4, c_dim=9, cmap_dim=8, mbstd_group_size=2, channel_base=512,
              channel_max=64, num_fp16_res=1, conv_clamp=128.0, architecture="skip",
              block_kwargs=dict(freeze_layers=1), epilogue_kwargs=dict(mbstd_num_channels=2))
    D = PoseConditionedDiscriminator(**kw)
    assert D.init_kwargs == kw
    assert _shapes(PoseConditionedDiscriminator(**D.init_kwargs)) == _shapes(D)
    assert D.b16.fromrgb.weight.shape[1] == 4 and D.b16.conv0.weight.shape[0] == 32 and D.b8.conv0.weight.shape[0] == 64
    assert D.b16.use_fp16 and not D.b8.use_fp16 and hasattr(D.b8, "fromrgb")  # skip: every block reads the image
    assert _clamps(D.b16) == {128.0} and D.b4.conv.conv_clamp == 128.0
    assert "b16.fromrgb.weight" not in _trainable(D) and "b16.conv0.weight" in _trainable(D)  # 1 frozen layer
    assert D.b4.conv.weight.shape[1] == 64 + 2 and D.b4.mbstd.group_size == 2 and D.mapping.weight.shape == (8, 9)
    with torch.no_grad():
        assert D(torch.randn(2, 4, 16, 16), torch.randn(2, 9)).shape == (2, 1)
    default = PoseConditionedDiscriminator(img_resolution=8)
    assert default.init_kwargs == dict(img_resolution=8, img_channels=3, c_dim=16, cmap_dim=16, mbstd_group_size=1,
                                       channel_base=32768, channel_max=512, num_fp16_res=0, conv_clamp=None,
                                       architecture="resnet", block_kwargs={}, epilogue_kwargs={})
    assert default.b8.conv0.weight.shape[0] == 512 and not default.b8.use_fp16


def test_pose_d_from_a_pretrained_d_keeps_every_choice_and_the_verdict():
    """from_stylegan2 builds the pose-conditioned D with the pretrained D's architecture, widths, image channels,
    fp16 blocks, conv clamp, block and epilogue options (its own mbstd group, c_dim and cmap_dim), copies every
    pretrained tensor, and with pose_init='pretrained_logit' its logit is the pretrained logit; the output rows are
    positive multiples of the pretrained row, the pose mapping starts at weight 0 and bias 1. Rules out any of these
    choices dropped or replaced by the class default, the epilogue options filtered the wrong way, another bias (the
    normalised cmap hides it at the start but not in its gradient), and bad inputs that pass silently."""
    torch.manual_seed(0)
    D0 = Discriminator(c_dim=0, img_channels=1, architecture="skip", num_fp16_res=1, conv_clamp=64.0,
                       block_kwargs=dict(freeze_layers=1), epilogue_kwargs=dict(mbstd_group_size=4,
                                                                                 mbstd_num_channels=2), **SMALL).eval()
    D = PoseConditionedDiscriminator.from_stylegan2(D0, c_dim=9, cmap_dim=8, mbstd_group_size=2,
                                                    pose_init="pretrained_logit").eval()
    assert D.init_kwargs == dict(img_resolution=16, img_channels=1, c_dim=9, cmap_dim=8, mbstd_group_size=2,
                                 channel_base=256, channel_max=32, num_fp16_res=1, conv_clamp=64.0, architecture="skip",
                                 block_kwargs=dict(freeze_layers=1), epilogue_kwargs=dict(mbstd_num_channels=2))
    own, pre = D.state_dict(), D0.state_dict()
    for name, t in pre.items():
        if not name.startswith("b4.out."):
            assert torch.equal(own[name], t), name
    assert _trainable(D) - {"mapping.weight", "mapping.bias"} == _trainable(D0) and _clamps(D.b16) == {64.0}
    assert not D.mapping.weight.detach().any() and D.mapping.bias.tolist() == [1.0] * 8  # cmap = 1 at any pose
    rows = (D.b4.out.weight / D0.b4.out.weight).detach()
    assert bool((rows > 0).all()) and float(rows[:, 0].std()) > 0.01
    img = torch.randn(2, 1, 16, 16)  # a batch of 2: both minibatch-std groups (4 and 2) take the 2 samples
    with torch.no_grad():
        assert max_err(D(img, torch.randn(2, 9)), D0(img)) < 1e-5
    with pytest.raises(ValueError, match="expects an unconditional discriminator"):
        PoseConditionedDiscriminator.from_stylegan2(Discriminator(c_dim=3, img_channels=3, **SMALL))
    D0.register_buffer("extra", torch.zeros(1))
    with pytest.raises(ValueError, match="pretrained D tensor extra has no counterpart"):
        PoseConditionedDiscriminator.from_stylegan2(D0)


def test_row_pattern_is_one_cosine_period_of_amplitude_one_half():
    """The rows' spread is 0.5 cos(2 pi (i + 1/2) / n): zero mean, and 1 + delta stays positive. Rules out another
    amplitude (1.5 would flip some rows' sign), another frequency and a division by the cosine."""
    for n in (4, 16):
        i = torch.arange(n, dtype=torch.float64)
        expected = 0.5 * torch.cos(2 * math.pi * (i + 0.5) / n)
        assert row_pattern(n).dtype == torch.float32 and max_err(row_pattern(n), expected) < 1e-7
        assert abs(float(row_pattern(n).sum())) < 1e-6 and float((1 + row_pattern(n)).min()) > 0


def test_pose_condition_is_checked_and_read_in_any_float_dtype():
    """The condition must be B x c_dim: a missing or misshaped one is a ValueError naming what came; a float64
    condition (flatten_w2c of float64 cameras) is read as float32. Rules out a check that crashes on None instead of
    explaining, messages with the wrong shape, and a float64 condition reaching the float32 mapping."""
    torch.manual_seed(1)
    D = PoseConditionedDiscriminator(**SMALL).eval()
    img = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"must be B x 16 \(flattened w2c\), got None"):
        D(img, None)
    with pytest.raises(ValueError, match=r"got \(2, 9\)"):
        D(img, torch.randn(2, 9))
    c = torch.randn(2, 16, dtype=torch.float64)
    with torch.no_grad():
        assert max_err(D(img, c), D(img, c.float())) < 1e-6


def test_skip_blocks_add_the_image_features_to_the_incoming_ones():
    """In the skip architecture a block's input is the incoming features plus FromRGB of the (downsampled) image.
    Rules out the incoming features dropped when the image's are added, and the image path taken only in the first
    block."""
    torch.manual_seed(2)
    D = Discriminator(c_dim=0, img_channels=3, architecture="skip", **SMALL).eval()
    block = D.b8
    x, img = torch.randn(2, block.in_channels, 8, 8), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out, img_out = block(x, img)
        expected = block.conv1(block.conv0(x + block.fromrgb(img)))
    assert max_err(out, expected) < 1e-5 and float(out.abs().mean()) > 0.1
    assert max_err(img_out, downsample2d(img, block.resample_filter)) < 1e-6  # the next block's image: filtered


def test_skip_epilogue_adds_the_image_features_before_the_minibatch_std():
    """The skip architecture's 4x4 head adds FromRGB (with the D's activation) of the last image to the features
    before minibatch-std. Rules out the image ignored by the head, the features subtracted, and a linear FromRGB."""
    torch.manual_seed(3)
    D = Discriminator(c_dim=0, img_channels=3, architecture="skip", **SMALL).eval()
    x, img = torch.randn(2, D.b4.in_channels, 4, 4), torch.randn(2, 3, 4, 4)
    seen = {}
    D.b4.mbstd.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        D.b4(x, img, None)
        expected = x + D.b4.fromrgb(img)
    assert D.b4.fromrgb.activation == "lrelu" and max_err(seen["x"], expected) < 1e-5


def test_freeze_layers_counts_layers_from_the_input_across_blocks():
    """freeze_layers=k freezes the first k layers counted from the image side across blocks (b32: fromrgb, conv0,
    conv1, skip = 0-3; b16: 4-6; b8: 7-9), NVlabs' numbering; every block's resampling layers use the D's filter.
    Rules out a layer that takes no number, a counter that restarts per block or steps by 2, a block that starts
    from the previous block's count instead of the running total, and a layer left with the default filter."""
    D = Discriminator(c_dim=0, img_channels=3, img_resolution=32, channel_base=256, channel_max=32,
                      block_kwargs=dict(freeze_layers=8, resample_filter=[1, 2, 1]))
    frozen = {k.rsplit(".", 1)[0] for k in D.state_dict() if k not in _trainable(D) and k.endswith("weight")}
    assert frozen == {"b32.fromrgb", "b32.conv0", "b32.conv1", "b32.skip", "b16.conv0", "b16.conv1", "b16.skip",
                      "b8.conv0"}
    f = setup_filter([1, 2, 1])
    assert all(torch.equal(layer.resample_filter, f) for layer in (D.b32.conv1, D.b32.skip, D.b16.conv1, D.b8.skip))


def test_minibatch_std_over_the_whole_batch_and_without_it():
    """group_size=None takes the whole batch as one group; mbstd_num_channels=0 builds a head without the layer.
    Rules out a group size that must be a number, and a minibatch-std layer built even with 0 channels."""
    x = torch.zeros(3, 1, 1, 1)
    x[:, 0, 0, 0] = torch.tensor([0.0, 3.0, 6.0])
    std = float(torch.tensor([0.0, 3.0, 6.0]).std(unbiased=False))
    assert max_err(MinibatchStdLayer(group_size=None)(x)[:, 1], torch.full((3, 1, 1), std)) < 1e-5
    D = Discriminator(c_dim=0, img_channels=3, epilogue_kwargs=dict(mbstd_num_channels=0), **SMALL)
    assert D.b4.mbstd is None and D(torch.randn(2, 3, 16, 16)).shape == (2, 1)


def test_block_shape_errors_name_the_block():
    """A block given features or an image of the wrong size says which block and which input. Rules out shape
    checks without a name."""
    D = Discriminator(c_dim=0, img_channels=3, architecture="skip", **SMALL)
    with pytest.raises(ValueError, match="DiscriminatorBlock@8 input"):
        D.b8(torch.randn(2, D.b8.in_channels, 4, 4), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="DiscriminatorBlock@8 img"):
        D.b8(torch.randn(2, D.b8.in_channels, 8, 8), torch.randn(2, 3, 4, 4))


def test_stylegan2_d_constructor_defaults_record_and_edge_sizes():
    """The StyleGAN2 D's defaults are NVlabs' (channel base 32768, max 512, no fp16, minibatch-std groups of 4), its
    init_kwargs rebuild it, num_fp16_res counts blocks from the top down to 8 px, a 1-number label is conditioning,
    and the label mapping takes its options. Rules out other defaults, a record that drops or renames a value, an fp16
    floor of 9 px, conditioning only from 2 numbers up, and the mapping options dropped."""
    kw = dict(c_dim=3, img_resolution=16, img_channels=3, architecture="resnet", channel_base=256, channel_max=32,
              num_fp16_res=4, conv_clamp=256, cmap_dim=5, block_kwargs={}, mapping_kwargs=dict(num_layers=2),
              epilogue_kwargs={})
    D = Discriminator(**kw)
    assert D.init_kwargs == kw and _shapes(Discriminator(**D.init_kwargs)) == _shapes(D)
    assert D.mapping.num_layers == 2 and not hasattr(D.mapping, "fc2")
    assert D.b16.use_fp16 and D.b8.use_fp16  # 4 fp16 resolutions, floored at 8 px
    default = Discriminator(c_dim=0, img_resolution=8, img_channels=3)
    assert {k: default.init_kwargs[k] for k in ("channel_base", "channel_max", "num_fp16_res", "conv_clamp")} == \
        dict(channel_base=32768, channel_max=512, num_fp16_res=0, conv_clamp=None)
    assert default.b8.conv0.weight.shape[0] == 512 and not default.b8.use_fp16 and default.b4.mbstd.group_size == 4
    torch.manual_seed(5)
    one = Discriminator(c_dim=1, img_channels=3, cmap_dim=4, mapping_kwargs=dict(num_layers=1), **SMALL).eval()
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert max_err(one(img, torch.ones(2, 1)), one(img, -torch.ones(2, 1))) > 1e-4


def test_block_and_head_inputs_that_cannot_work_are_clear_errors():
    """A block refuses in_channels other than 0 or its own width and an unknown architecture (orig, skip and resnet
    all build; resnet is the block's default); the head names a wrong feature map or cmap. Rules out checks that
    raise without their message, the 'orig' architecture refused, another default, and unnamed shape errors."""
    with pytest.raises(ValueError, match="in_channels must be 0 or 8, got 5"):
        DiscriminatorBlock(5, 8, 8, resolution=8, img_channels=3, first_layer_idx=0)
    with pytest.raises(ValueError, match="orig|skip|resnet, got 'bogus'"):
        DiscriminatorBlock(0, 8, 8, resolution=8, img_channels=3, first_layer_idx=0, architecture="bogus")
    assert hasattr(DiscriminatorBlock(0, 8, 8, resolution=8, img_channels=3, first_layer_idx=0), "skip")
    D = Discriminator(c_dim=0, img_channels=3, architecture="orig", **SMALL)
    assert D(torch.randn(2, 3, 16, 16)).shape == (2, 1)
    with pytest.raises(ValueError, match="DiscriminatorEpilogue input"):
        D.b4(torch.randn(2, D.b4.in_channels, 8, 8), None, None)
    P = PoseConditionedDiscriminator(cmap_dim=4, **SMALL)
    with pytest.raises(ValueError, match="cmap: expected shape"):
        P.b4(torch.randn(2, P.b4.in_channels, 4, 4), None, torch.randn(2, 3))


def test_a_one_unit_projection_still_conditions():
    """With cmap_dim = 1 the logit is still the projection on the condition's embedding, here a sign: a pose mapping
    that says -1 instead of +1 flips the logit. Rules out projection conditioning only from 2 units up."""
    torch.manual_seed(6)
    D = PoseConditionedDiscriminator(cmap_dim=1, **SMALL).eval()
    img, c = torch.randn(2, 3, 16, 16), torch.randn(2, 16)
    with torch.no_grad():
        D.mapping.weight.zero_()
        D.mapping.bias.fill_(1.0)
        plus = D(img, c)
        D.mapping.bias.fill_(-1.0)
        assert max_err(D(img, c), -plus) < 1e-6 and float(plus.abs().min()) > 0
