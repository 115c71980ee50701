"""Pure-PyTorch StyleGAN2 primitives: bias+activation, FIR up/down-sampling, resampling convolutions.

These reproduce the arithmetic of NVlabs' reference (CPU) kernels so that weights trained with the
CUDA plugins load and run identically here. Conventions worth knowing:

* A FIR filter ``f`` is a 2-D tensor (``fh x fw``); ``upfirdn2d`` applies it as a *true* convolution
  (the filter is flipped before ``F.conv2d``'s correlation) unless ``flip_filter=True``. Loaded
  networks carry their own (possibly non-symmetric) filter buffers, so the flip matters.
* Padding is ``(x0, x1, y0, y1)``; negative values crop.
* ``conv2d_resample(..., flip_weight=True)`` is a correlation (``F.conv2d``); ``flip_weight=False`` is
  a true convolution. NVlabs uses the latter for every up-sampling layer, so a pretrained
  up-sampling kernel must be applied flipped relative to a plain ``F.conv2d``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

# name -> (function of (x, alpha), default alpha, default gain)
ACTIVATIONS = {
    "linear": (lambda x, a: x, 0.0, 1.0),
    "relu": (lambda x, a: F.relu(x), 0.0, math.sqrt(2)),
    "lrelu": (lambda x, a: F.leaky_relu(x, a), 0.2, math.sqrt(2)),
    "tanh": (lambda x, a: torch.tanh(x), 0.0, 1.0),
    "sigmoid": (lambda x, a: torch.sigmoid(x), 0.0, 1.0),
    "elu": (lambda x, a: F.elu(x), 0.0, 1.0),
    "selu": (lambda x, a: F.selu(x), 0.0, 1.0),
    "softplus": (lambda x, a: F.softplus(x), 0.0, 1.0),
    "swish": (lambda x, a: torch.sigmoid(x) * x, 0.0, math.sqrt(2)),
}


def activation_gain(name: str) -> float:
    if name not in ACTIVATIONS:
        raise InputError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name][2]


def bias_act(x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None):
    """``clamp(act(x + b) * gain, -clamp, clamp)`` with ``b`` broadcast along ``dim``."""
    func, def_alpha, def_gain = ACTIVATIONS[act]
    alpha = def_alpha if alpha is None else float(alpha)
    gain = def_gain if gain is None else float(gain)
    if b is not None:
        shape = [-1 if i == dim else 1 for i in range(x.ndim)]
        x = x + b.reshape(shape)
    x = func(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def setup_filter(f: Sequence[float] | torch.Tensor = (1, 3, 3, 1), normalize: bool = True) -> torch.Tensor:
    """1-D taps -> normalised 2-D (outer product) filter, the form stored in network buffers."""
    f = torch.as_tensor(np.asarray(f, dtype=np.float32))
    if f.ndim == 0:
        f = f[None]
    if f.ndim == 1:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    return f


def _pad4(padding) -> list[int]:
    if isinstance(padding, int):
        return [padding] * 4
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        px, py = padding
        return [px, px, py, py]
    assert len(padding) == 4, padding
    return padding


def _filter_size(f) -> tuple[int, int]:
    if f is None:
        return 1, 1
    return int(f.shape[-1]), int(f.shape[0])


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1.0):
    """Upsample (zero insertion), pad/crop, FIR-filter, then downsample (decimate). x: B x C x H x W."""
    assert x.ndim == 4, f"upfirdn2d expects B x C x H x W, got {tuple(x.shape)}"
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    b, c, h, w = x.shape
    px0, px1, py0, py1 = _pad4(padding)
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    pad = (0, 0)
    if px0 == px1 >= 0 and py0 == py1 >= 0:  # zero padding inside the convolution (no padded copy)
        pad = (py0, px0)
    else:
        x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
        x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]
    f = f * (gain ** (f.ndim / 2))
    f = f.to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 2:  # the filter output is only kept at every down-th pixel: compute only those (stride)
        return fir_filter(x, f[None, None].repeat(c, 1, 1, 1), down, pad)
    k = f[None, None].repeat(c, 1, 1)  # separable 1-D taps
    x = fir_filter(x, k.unsqueeze(2), (1, down), (0, pad[1]))
    return fir_filter(x, k.unsqueeze(3), (down, 1), (pad[0], 0))


def fir_filter(x: torch.Tensor, k: torch.Tensor, stride=1, padding=0) -> torch.Tensor:
    """``F.conv2d(x, k, stride=stride, padding=padding, groups=C)`` for a constant depthwise filter ``k``
    (C x 1 x kh x kw). Through :func:`conv2d_twice_differentiable`: left to PyTorch, the second derivative that R1
    needs (the gradient of ||dD/dx||^2) also computes the filter's weight gradient, one convolution per channel
    (128-512 per layer), and throws it away."""
    return conv2d_twice_differentiable(x, k, stride, padding, groups=k.shape[0])


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def upsample2d(x, f, up=2, padding=0, flip_filter=False, gain=1.0):
    """Resolution x ``up`` with an anti-imaging FIR filter; output is exactly ``up`` times larger."""
    p = _resample_padding(f, up, 1, padding)
    return upfirdn2d(x, f, up=up, padding=p, flip_filter=flip_filter, gain=gain * up * up)


def downsample2d(x, f, down=2, padding=0, flip_filter=False, gain=1.0):
    """Resolution / ``down`` after an anti-aliasing FIR filter."""
    p = _resample_padding(f, 1, down, padding)
    return upfirdn2d(x, f, down=down, padding=p, flip_filter=flip_filter, gain=gain)


def _conv(x, w, stride=1, padding=0, groups=1, transpose=False, flip_weight=True, twice=False):
    if not flip_weight:
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    if twice:
        return conv2d_twice_differentiable(x, w, stride, padding, groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


_INPUT_GRADIENTS_ONLY = [False]


@contextlib.contextmanager
def input_gradients_only():
    """Inside, :func:`conv2d_twice_differentiable` layers compute no weight gradient in backward passes: for an
    ``autograd.grad(..., inputs=images)`` that only wants the images' gradient (R1), which a custom autograd function
    cannot tell apart from a pass that wants the weights too."""
    _INPUT_GRADIENTS_ONLY[0] = True
    try:
        yield
    finally:
        _INPUT_GRADIENTS_ONLY[0] = False


class _Conv2dTwice(torch.autograd.Function):
    """``F.conv2d`` whose backward pass is written with differentiable ops (the transposed convolution for the
    input, PyTorch's weight-gradient kernel for the weight). The second derivative R1 needs then runs through
    ordinary convolution backward kernels; through F.conv2d's own backward it runs through the generic double-backward
    formula, whose weight term re-runs the whole layer as a convolution of batch-as-channel tensors (measured: the D
    step with R1 takes 13 % less time at 32 px)."""

    @staticmethod
    def forward(ctx, x, w, stride, padding, groups):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)  # x only for the weight's gradient
        ctx.conf, ctx.in_hw = (stride, padding, groups), x.shape[-2:]
        return F.conv2d(x, w, None, stride, padding, 1, groups)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        (sy, sx), (py, px), groups = ctx.conf
        gx = gw = None
        if ctx.needs_input_grad[0]:
            (h, wd) = ctx.in_hw
            out = (h - ((grad.shape[-2] - 1) * sy - 2 * py + w.shape[-2]),
                   wd - ((grad.shape[-1] - 1) * sx - 2 * px + w.shape[-1]))
            gx = F.conv_transpose2d(grad, w, None, (sy, sx), (py, px), out, groups)
        if ctx.needs_input_grad[1] and not _INPUT_GRADIENTS_ONLY[0]:
            gw = torch.nn.grad.conv2d_weight(x, w.shape, grad, (sy, sx), (py, px), 1, groups)
        return gx, gw, None, None, None


def conv2d_twice_differentiable(x, w, stride=1, padding=0, groups=1) -> torch.Tensor:
    """``F.conv2d(x, w, stride=stride, padding=padding, groups=groups)``, cheaper to differentiate twice."""
    return _Conv2dTwice.apply(x, w, _pair(stride), _pair(padding), groups)


def _resample_padding(f, up, down, padding) -> list[int]:
    """Padding that keeps a 'same' convolution aligned after up-/down-sampling by the FIR filter f."""
    fw, fh = _filter_size(f)
    px0, px1, py0, py1 = _pad4(padding)
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    return [px0, px1, py0, py1]


def conv2d_resample(x, w, f=None, up=1, down=1, padding=0, groups=1, flip_weight=True, flip_filter=False,
                    twice: bool = False):
    """2-D convolution with optional FIR up/down-sampling, the cheapest equivalent order of operations.

    x: B x (groups*Cin) x H x W, w: Cout x Cin x kh x kw. Output resolution is H*up/down for
    ``padding = kernel_size // 2``. ``twice``: layers that R1 differentiates twice (the discriminator's) use
    :func:`conv2d_twice_differentiable` for their non-transposed convolutions.
    """
    assert x.ndim == 4 and w.ndim == 4 and up >= 1 and down >= 1
    out_ch, in_per_group, kh, kw = w.shape
    px0, px1, py0, py1 = _resample_padding(f, up, down, padding)

    if kw == 1 and kh == 1 and down > 1 and up == 1:  # 1x1 conv commutes with filtering: shrink first
        x = upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv(x, w, groups=groups, flip_weight=flip_weight, twice=twice)
    if kw == 1 and kh == 1 and up > 1 and down == 1:  # 1x1 conv at low resolution, then grow
        x = _conv(x, w, groups=groups, flip_weight=flip_weight, twice=twice)
        return upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up * up, flip_filter=flip_filter)
    if down > 1 and up == 1:  # filter, then strided conv
        x = upfirdn2d(x, f, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight, twice=twice)
    if up > 1:  # transposed strided conv (zero insertion for free), then filter
        if groups == 1:
            w = w.transpose(0, 1)
        else:
            w = w.reshape(groups, out_ch // groups, in_per_group, kh, kw).transpose(1, 2)
            w = w.reshape(groups * in_per_group, out_ch // groups, kh, kw)
        px0 -= kw - 1
        px1 -= kw - up
        py0 -= kh - 1
        py1 -= kh - up
        pxt = max(min(-px0, -px1), 0)
        pyt = max(min(-py0, -py1), 0)
        x = _conv(x, w, stride=up, padding=[pyt, pxt], groups=groups, transpose=True, flip_weight=not flip_weight)
        x = upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up * up,
                      flip_filter=flip_filter)
        if down > 1:
            x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
        return x
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:  # plain conv
        return _conv(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight, twice=twice)
    return conv2d_resample_reference(x, w, f, up, down, padding, groups, flip_weight, flip_filter)


def conv2d_resample_reference(x, w, f=None, up=1, down=1, padding=0, groups=1, flip_weight=True,
                              flip_filter=False):
    """The direct definition (upsample+filter, convolve, filter+decimate); the fast paths must equal it."""
    px0, px1, py0, py1 = _resample_padding(f, up, down, padding)
    x = upfirdn2d(x, f if up > 1 else None, up=up, padding=[px0, px1, py0, py1], gain=up * up,
                  flip_filter=flip_filter)
    x = _conv(x, w, groups=groups, flip_weight=flip_weight)
    if down > 1:
        x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
    return x


def modulated_conv2d(x, weight, styles, noise=None, up=1, down=1, padding=0, resample_filter=None,
                     demodulate=True, flip_weight=True, fused_modconv=True):
    """StyleGAN2 weight (de)modulation. x: B x Cin x H x W, weight: Cout x Cin x k x k, styles: B x Cin.

    ``fused_modconv`` builds per-sample weights and runs one grouped convolution; otherwise the
    activations are scaled before and after a shared convolution. Both give the same result.
    """
    batch = x.shape[0]
    out_ch, in_ch, kh, kw = weight.shape
    assert x.shape[1] == in_ch, f"modulated_conv2d: input has {x.shape[1]} channels, weight expects {in_ch}"
    assert styles.shape == (batch, in_ch), f"styles must be {(batch, in_ch)}, got {tuple(styles.shape)}"

    if x.dtype == torch.float16 and demodulate:  # keep fp16 activations in range
        weight = weight * (1 / np.sqrt(in_ch * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)

    w = dcoefs = None
    if fused_modconv:
        w = weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)
        if demodulate:
            dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # B x Cout
    elif demodulate:  # the same sum, sum_i s_i^2 sum_k w_oik^2, without the B x Cout x Cin x k x k weights
        dcoefs = (styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt()
    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding,
                            flip_weight=flip_weight)
        if demodulate:
            x = x * dcoefs.to(x.dtype).reshape(batch, -1, 1, 1)
        if noise is not None:
            x = x + noise.to(x.dtype)
        return x
    if demodulate:
        w = w * dcoefs.reshape(batch, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_ch, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, down=down, padding=padding, groups=batch,
                        flip_weight=flip_weight)
    x = x.reshape(batch, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise
    return x


def assert_shape(tensor: torch.Tensor, shape: Sequence[int | None], name: str = "tensor") -> None:
    """Raise a readable error unless ``tensor`` has ``shape`` (``None`` matches any size)."""
    if tensor.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, tensor.shape)):
        want = "x".join("*" if s is None else str(s) for s in shape)
        raise InputError(f"{name}: expected shape {want}, got {'x'.join(map(str, tensor.shape)) or 'scalar'}")
