"""FIR resampling, bias/activation and modulated convolution against direct reference computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gmpi_lightning.nn import ops
from tests.conftest import max_err


def _direct_upfirdn(x: np.ndarray, f: np.ndarray, up: int, down: int, pad: tuple[int, int, int, int]) -> np.ndarray:
    """Textbook definition with explicit loops: zero-stuff, pad, true 2-D convolution, decimate."""
    b, c, h, w = x.shape
    up_x = np.zeros((b, c, h * up, w * up))
    up_x[:, :, ::up, ::up] = x
    px0, px1, py0, py1 = pad
    padded = np.pad(up_x, ((0, 0), (0, 0), (max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))))
    padded = padded[:, :, max(-py0, 0): padded.shape[2] - max(-py1, 0), max(-px0, 0): padded.shape[3] - max(-px1, 0)]
    fh, fw = f.shape
    oh, ow = padded.shape[2] - fh + 1, padded.shape[3] - fw + 1
    out = np.zeros((b, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = padded[:, :, i:i + fh, j:j + fw]
            out[:, :, i, j] = (win * f[::-1, ::-1]).sum(axis=(2, 3))  # convolution = correlation with flipped f
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 2, 2, 1)), (2, 1, (2, 1, 2, 1)), (1, 2, (1, 1, 1, 1)),
                                         (2, 2, (0, -1, 1, 0))])
def test_upfirdn2d_matches_direct_definition(up, down, pad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64)
    f = torch.rand(4, 3, generator=g, dtype=torch.float64)  # non-square, non-symmetric: catches flips/axes
    ours = ops.upfirdn2d(x, f, up=up, down=down, padding=pad)
    ref = _direct_upfirdn(x.numpy(), f.numpy(), up, down, pad)
    assert ours.shape == ref.shape
    assert max_err(ours, ref) < 1e-12


def test_upsample_downsample_preserve_constants_and_sizes():
    f = ops.setup_filter([1, 3, 3, 1])
    assert max_err(f, np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64) < 1e-7
    x = torch.full((1, 2, 8, 8), 3.0)
    up = ops.upsample2d(x, f)
    down = ops.downsample2d(x, f)
    assert up.shape == (1, 2, 16, 16) and down.shape == (1, 2, 4, 4)
    # Gains are right: a constant stays constant away from the zero-padded border.
    assert max_err(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 3.0)) < 1e-6
    assert max_err(down[..., 1:-1, 1:-1], torch.full_like(down[..., 1:-1, 1:-1], 3.0)) < 1e-6


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("up,down", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("flip_weight", [True, False])
def test_conv2d_resample_fast_paths_equal_reference(k, up, down, groups, flip_weight):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4 * groups, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(6 * groups, 4, k, k, generator=g, dtype=torch.float64)
    f = torch.rand(4, 4, generator=g, dtype=torch.float64)
    kwargs = dict(f=f, up=up, down=down, padding=k // 2, groups=groups, flip_weight=flip_weight)
    fast = ops.conv2d_resample(x, w, **kwargs)
    ref = ops.conv2d_resample_reference(x, w, **kwargs)
    assert fast.shape == (2, 6 * groups, 8 * up // down, 8 * up // down)
    assert max_err(fast, ref) < 1e-10


def test_flip_weight_false_is_a_true_convolution():
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    w = torch.arange(9, dtype=torch.float64).reshape(1, 1, 3, 3)
    corr = ops.conv2d_resample(x, w, padding=1, flip_weight=True)
    conv = ops.conv2d_resample(x, w, padding=1, flip_weight=False)
    assert max_err(corr, F.conv2d(x, w, padding=1)) < 1e-12
    assert max_err(conv, F.conv2d(x, w.flip([2, 3]), padding=1)) < 1e-12


def test_bias_act_lrelu_gain_and_clamp():
    x = torch.tensor([[-2.0, 0.5, 300.0]]).reshape(1, 3, 1, 1)
    b = torch.tensor([1.0, 0.0, 0.0])
    y = ops.bias_act(x, b, act="lrelu", clamp=256).flatten()
    s = np.sqrt(2)
    assert max_err(y, [-1.0 * 0.2 * s, 0.5 * s, 256.0]) < 1e-6
    assert max_err(ops.bias_act(x, act="linear").flatten(), [-2.0, 0.5, 300.0]) == 0
    with pytest.raises(ValueError, match="unknown activation"):
        ops.activation_gain("gelu2")


def test_modulated_conv_fused_equals_unfused_and_demod_is_scale_invariant():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 8, 8, generator=g)
    w = torch.randn(4, 5, 3, 3, generator=g)
    s = torch.randn(3, 5, generator=g)
    noise = torch.randn(1, 1, 16, 16, generator=g)
    f = ops.setup_filter([1, 3, 3, 1])
    for up in (1, 2):
        n = noise if up == 2 else noise[..., :8, :8]
        kw = dict(noise=n, up=up, padding=1, resample_filter=f, flip_weight=(up == 1))
        fused = ops.modulated_conv2d(x, w, s, fused_modconv=True, **kw)
        unfused = ops.modulated_conv2d(x, w, s, fused_modconv=False, **kw)
        assert max_err(fused, unfused) < 1e-5
        # Demodulation divides out any per-sample scale of the styles.
        scaled = ops.modulated_conv2d(x, w, s * torch.tensor([[2.0], [0.1], [7.0]]), fused_modconv=True, **kw)
        assert max_err(scaled, fused) < 1e-4
    # Without demodulation the output is linear in the style.
    a = ops.modulated_conv2d(x, w[:, :, :1, :1], s, demodulate=False)
    b = ops.modulated_conv2d(x, w[:, :, :1, :1], 3 * s, demodulate=False)
    assert max_err(b, 3 * a) < 1e-4


def test_assert_shape_message():
    with pytest.raises(ValueError, match=r"ws: expected shape \*x8x64, got 2x7x64"):
        ops.assert_shape(torch.zeros(2, 7, 64), [None, 8, 64], "ws")


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 0), ((1, 2), 0), ((2, 1), (1, 2)), (2, 1)])
def test_fir_filter_matches_conv2d_and_its_derivatives(stride, padding):
    """The constant-filter depthwise FIR (custom backward, used so that R1's second derivative skips the filter's
    weight gradient) equals F.conv2d with groups=C in value, gradient and gradient of the gradient."""
    from gmpi_lightning.nn.ops import fir_filter

    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    k = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    s = (stride, stride) if isinstance(stride, int) else stride
    ref = F.conv2d(x, k, stride=s, padding=padding, groups=3)
    out = fir_filter(x, k, stride, padding)
    assert out.shape == ref.shape and float((out - ref).abs().max()) < 1e-12

    def both(fn):
        y = fn(x)
        (g,) = torch.autograd.grad((y.square() * torch.linspace(0, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum(),
                                   x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sin().sum(), x)
        return g.detach(), gg

    (g1, gg1), (g2, gg2) = both(lambda t: fir_filter(t, k, stride, padding)), \
        both(lambda t: F.conv2d(t, k, stride=s, padding=padding, groups=3))
    assert float((g1 - g2).abs().max()) < 1e-10 and float((gg1 - gg2).abs().max()) < 1e-10
    assert torch.autograd.gradcheck(lambda t: fir_filter(t, k, stride, padding), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fir_filter(t, k, stride, padding), (x,))


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 0, 1), (1, 0, 2), ((2, 1), (1, 0), 1)])
def test_conv2d_twice_differentiable_matches_conv2d(stride, padding, groups):
    """Same value, gradients and second derivatives as F.conv2d (for input and weight); inside
    input_gradients_only() the weight's gradient is not computed, the input's is unchanged."""
    from gmpi_lightning.nn.ops import conv2d_twice_differentiable, input_gradients_only

    torch.manual_seed(1)
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    ours = lambda a, b: conv2d_twice_differentiable(a, b, stride, padding, groups)  # noqa: E731
    ref = lambda a, b: F.conv2d(a, b, stride=stride, padding=padding, groups=groups)  # noqa: E731
    assert float((ours(x, w) - ref(x, w)).abs().max()) < 1e-12
    assert torch.autograd.gradcheck(ours, (x, w)) and torch.autograd.gradgradcheck(ours, (x, w))

    def r1_like(fn, only_inputs=False):  # ||d sum(fn)/dx||^2 differentiated w.r.t. the weight, as R1 does
        y = fn(x, w).tanh().sum()
        if only_inputs:
            with input_gradients_only():
                (g,) = torch.autograd.grad(y, x, create_graph=True)
        else:
            (g,) = torch.autograd.grad(y, x, create_graph=True)
        return g, torch.autograd.grad(g.square().sum(), w)[0]

    (g1, gw1), (g2, gw2) = r1_like(ours, only_inputs=True), r1_like(ref)
    assert float((g1 - g2).abs().max()) < 1e-12 and float((gw1 - gw2).abs().max()) < 1e-10
    with input_gradients_only():
        y = ours(x, w).sum()
        y.backward()
    assert w.grad is None and x.grad is not None
