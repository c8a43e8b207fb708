"""Reference ops in plain PyTorch: the definition every fast kernel is tested against.

These follow the semantics of stylegan2-ada-pytorch's `torch_utils/ops` reference paths
(`bias_act`, `upfirdn2d`, `conv2d_resample`, and `modulated_conv2d` from
`training/networks.py`) closely enough to reproduce its outputs to float32 rounding for the
same weights. They are pure PyTorch, so they run on any device, differentiate to any order and
export to ONNX.

Shape letters used in comments: N batch, I input channels, O output channels, H/W height and
width, k kernel taps.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

# Leaky ReLU slope and the gain that keeps unit variance through the activation.
# sqrt(2) is He et al.'s gain for (leaky) ReLU; StyleGAN2 uses it for relu and lrelu alike.
ACTIVATIONS = {
    # name: (function(x, alpha), default alpha, default gain)
    "linear": (lambda x, alpha: x, 0.0, 1.0),
    "relu": (lambda x, alpha: F.relu(x), 0.0, math.sqrt(2)),
    "lrelu": (lambda x, alpha: F.leaky_relu(x, alpha), 0.2, math.sqrt(2)),
    "tanh": (lambda x, alpha: torch.tanh(x), 0.0, 1.0),
    "sigmoid": (lambda x, alpha: torch.sigmoid(x), 0.0, 1.0),
}


def activation_gain(act: str) -> float:
    """Default gain of an activation (sqrt(2) for relu/lrelu, 1 otherwise)."""
    return ACTIVATIONS[act][2]


# ----------------------------------------------------------------------------- bias_act


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    dim: int = 1,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """x + b (broadcast along `dim`), then activation, then * gain, then clamp to +-clamp."""
    func, def_alpha, def_gain = ACTIVATIONS[act]
    alpha = float(alpha if alpha is not None else def_alpha)
    gain = float(gain if gain is not None else def_gain)
    if b is not None:
        if b.ndim != 1 or b.shape[0] != x.shape[dim]:
            raise ValueError(f"bias of shape {tuple(b.shape)} does not match dim {dim} of {tuple(x.shape)}")
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = func(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


# ----------------------------------------------------------------------------- upfirdn2d


def setup_filter(f: Sequence[float] | torch.Tensor | None, normalize: bool = True) -> torch.Tensor:
    """A 2D FIR filter from taps: [1,3,3,1] -> its outer product, normalized to unit DC gain.

    Matches `upfirdn2d.setup_filter` for filters under 8 taps (which it keeps non-separable).
    """
    f = torch.as_tensor(1.0 if f is None else f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if f.ndim == 1:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    return f


def _parse_padding(padding) -> tuple[int, int, int, int]:
    if isinstance(padding, int):
        padding = [padding, padding]
    if len(padding) == 2:
        px, py = padding
        padding = [px, px, py, py]
    px0, px1, py0, py1 = (int(p) for p in padding)
    return px0, px1, py0, py1


def filter_size(f: torch.Tensor | None) -> tuple[int, int]:
    """(width, height) of a filter, (1, 1) for None."""
    if f is None:
        return 1, 1
    return int(f.shape[-1]), int(f.shape[0])


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: int = 1,
    down: int = 1,
    padding=0,
    flip_filter: bool = False,
    gain: float = 1,
) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative = crop), FIR filter, downsample by dropping.

    x: [N, C, H, W]; f: [fh, fw] float32 (or None for identity). The filter is convolved
    (flipped) unless `flip_filter`, i.e. correlation with a pre-flipped filter.
    """
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    n, c, h, w = x.shape
    px0, px1, py0, py1 = _parse_padding(padding)

    if up > 1:  # insert up-1 zeros after every sample
        x = x.reshape([n, c, h, 1, w, 1])
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape([n, c, h * up, w * up])

    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]

    # gain applies per dimension: gain ** (ndim / 2) over a 2D filter is just gain.
    f = (f * (gain ** (f.ndim / 2))).to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f[None, None].repeat([c, 1, 1, 1])  # depthwise: [C, 1, fh, fw]
    x = F.conv2d(x, f, groups=c)

    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def upsample_padding(f: torch.Tensor | None, up: int) -> list[int]:
    """[x0, x1, y0, y1] padding after zero insertion that makes filtering with f give exactly up x
    the input size, centred: the filter's taps split around each inserted sample."""
    fw, fh = filter_size(f)
    return [(fw + up - 1) // 2, (fw - up) // 2, (fh + up - 1) // 2, (fh - up) // 2]


# ----------------------------------------------------------------------------- conv2d_resample


def _conv(x, w, stride=1, padding=0, groups=1, transpose=False, flip_weight=True):
    # F.conv2d is correlation; a true convolution (flip_weight=False) flips the kernel first.
    if not flip_weight:
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=groups)
    return F.conv2d(x, w, stride=stride, padding=padding, groups=groups)


def transposed_conv_up(x, w, up, padding, groups=1, flip_weight=True):
    """The first half of an up-sampling `conv2d_resample`: the stride-`up` transposed convolution, and the
    padding [x0, x1, y0, y1] the FIR filter that follows it (gain up^2) must use. `padding` is the total,
    the user's plus `upsample_padding`'s."""
    out_channels, in_per_group, kh, kw = (int(s) for s in w.shape)
    px0, px1, py0, py1 = padding
    # Transposed conv wants [I, O/groups, k, k] per group.
    if groups == 1:
        w = w.transpose(0, 1)
    else:
        w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
        w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
    px0 -= kw - 1
    px1 -= kw - up
    py0 -= kh - 1
    py1 -= kh - up
    pxt = max(min(-px0, -px1), 0)
    pyt = max(min(-py0, -py1), 0)
    x = _conv(x, w, stride=up, padding=[pyt, pxt], groups=groups, transpose=True, flip_weight=not flip_weight)
    return x, [px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt]


def conv2d_resample(
    x: torch.Tensor,
    w: torch.Tensor,
    f: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding=0,
    groups: int = 1,
    flip_weight: bool = True,
    flip_filter: bool = False,
) -> torch.Tensor:
    """2D convolution with optional FIR up/downsampling; padding is w.r.t. the upsampled image.

    Up-sampling uses a stride-`up` transposed convolution followed by the FIR filter, which is
    the same arithmetic as zero insertion + filter + convolution, done in one pass.
    """
    out_channels, in_per_group, kh, kw = (int(s) for s in w.shape)
    fw, fh = filter_size(f)
    px0, px1, py0, py1 = _parse_padding(padding)
    if up > 1:
        ux0, ux1, uy0, uy1 = upsample_padding(f, up)
        px0, px1, py0, py1 = px0 + ux0, px1 + ux1, py0 + uy0, py1 + uy1
    if down > 1:
        px0 += (fw - down + 1) // 2
        px1 += (fw - down) // 2
        py0 += (fh - down + 1) // 2
        py1 += (fh - down) // 2

    if kw == 1 and kh == 1 and down > 1 and up == 1:
        x = upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv(x, w, groups=groups, flip_weight=flip_weight)
    if kw == 1 and kh == 1 and up > 1 and down == 1:
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return upfirdn2d(x, f, up=up, padding=[px0, px1, py0, py1], gain=up**2, flip_filter=flip_filter)
    if down > 1 and up == 1:
        x = upfirdn2d(x, f, padding=[px0, px1, py0, py1], flip_filter=flip_filter)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)
    if up > 1:
        x, fir_padding = transposed_conv_up(x, w, up, [px0, px1, py0, py1], groups, flip_weight)
        x = upfirdn2d(x, f, padding=fir_padding, gain=up**2, flip_filter=flip_filter)
        if down > 1:
            x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
        return x
    if up == 1 and down == 1 and px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv(x, w, padding=[py0, px0], groups=groups, flip_weight=flip_weight)
    x = upfirdn2d(x, f if up > 1 else None, up=up, padding=[px0, px1, py0, py1], gain=up**2, flip_filter=flip_filter)
    x = _conv(x, w, groups=groups, flip_weight=flip_weight)
    if down > 1:
        x = upfirdn2d(x, f, down=down, flip_filter=flip_filter)
    return x


# ----------------------------------------------------------------------------- modulated_conv2d


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    up: int = 1,
    padding: int = 0,
    resample_filter: torch.Tensor | None = None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = True,
) -> torch.Tensor:
    """StyleGAN2's modulated convolution: scale input channels by `styles`, convolve, demodulate.

    x: [N, I, H, W]; weight: [O, I, k, k]; styles: [N, I]; noise broadcastable to the output.
    Fused: one grouped convolution with per-sample weights. Non-fused: x * s, shared-weight
    conv, then * d, the form that keeps the weight constant (used in training and export).
    """
    n = x.shape[0]
    out_channels, in_channels, kh, kw = weight.shape

    # fp16 overflow guard: pre-scale weight and styles by their max-norms. Demodulation
    # divides the scale back out, so the result is unchanged up to rounding.
    if x.dtype == torch.float16 and demodulate:
        w_max = weight.abs().amax(dim=[1, 2, 3], keepdim=True)
        weight = weight * (1 / math.sqrt(in_channels * kh * kw) / w_max)
        styles = styles / styles.abs().amax(dim=1, keepdim=True)

    w = None
    dcoefs = None
    if demodulate or fused_modconv:
        w = weight.unsqueeze(0) * styles.reshape(n, 1, -1, 1, 1)  # [NOIkk]
    if demodulate:
        # rsqrt of the per-output sum of squared modulated weights: keeps unit output variance.
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [NO]
    if demodulate and fused_modconv:
        w = w * dcoefs.reshape(n, -1, 1, 1, 1)

    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(n, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, padding=padding, flip_weight=flip_weight)
        if demodulate and noise is not None:
            x = torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(n, -1, 1, 1))
        elif demodulate:
            x = x * dcoefs.to(x.dtype).reshape(n, -1, 1, 1)
        elif noise is not None:
            x = x + noise.to(x.dtype)
        return x

    # Fused: fold the batch into conv groups, one weight set per sample.
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, padding=padding, groups=n, flip_weight=flip_weight)
    x = x.reshape(n, -1, *x.shape[2:])
    if noise is not None:
        # Add in the promoted precision, then round once to x's dtype (fp16 blocks).
        x = (x + noise).to(x.dtype)
    return x
