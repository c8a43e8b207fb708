"""What the Triton kernel files share: the layer epilogue, the demodulation coefficients, the rounding.

The epilogue is y = clamp(act(v) * gain, -clamp, clamp) with v = x + b, for the activations StyleGAN2
uses (linear, relu, lrelu). `resolve` fills in its defaults, `epilogue_supported` says whether a fused
layer kernel can apply it, `act_and_mask` computes it inside a kernel, and `act_backward` differentiates
it from the stored output alone. `demod_coefficients` is the modulated convolution's d, `round_to` the
one rounding every kernel's store makes, and `reference_grads` the second-order fallback of every
custom autograd function here (through the reference's graph).

`triton_bias_act`, `triton_modconv` and `triton_upfirdn` import from here; this module imports none of
them. Like them it needs Triton, and TRITON_INTERPRET=1 set before import to run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pti.kernels import ref

ACTS = {"linear": 0, "relu": 1, "lrelu": 2}  # the activations the kernels know, as a constexpr code
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels load and store


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 -> dtype, rounding to nearest even as torch does. Done by hand for bfloat16: Triton's
    interpreter (how CI runs these kernels) truncates there even when asked for "rtne", so without this
    the CPU tests would check another rounding than the GPU's."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(dtype)


@triton.jit
def act_and_mask(v, alpha, gain, clamp, ACT: tl.constexpr, CLAMP: tl.constexpr):
    """act(v) * gain clamped, and the derivative of that with respect to v (without the clamp mask)."""
    if ACT == 1:
        a = tl.where(v > 0, v, 0.0)
        da = tl.where(v > 0, 1.0, 0.0)
    elif ACT == 2:
        a = tl.where(v > 0, v, v * alpha)
        da = tl.where(v > 0, 1.0, alpha)
    else:
        a = v
        da = tl.full(v.shape, 1.0, tl.float32)
    a = a * gain
    keep = tl.full(v.shape, 1, tl.int1)
    if CLAMP:
        keep = (a >= -clamp) & (a <= clamp)
        a = tl.minimum(tl.maximum(a, -clamp), clamp)
    return a, da, keep


def resolve(act, alpha, gain, clamp):
    """(act, alpha, gain, clamp) with the activation's defaults filled in as floats; clamp None when off
    (None or negative, as in the reference)."""
    _, def_alpha, def_gain = ref.ACTIVATIONS[act]
    return (
        act,
        float(alpha if alpha is not None else def_alpha),
        float(gain if gain is not None else def_gain),
        float(clamp) if clamp is not None and clamp >= 0 else None,
    )


def epilogue_supported(bias, channels, act, alpha, gain) -> bool:
    """Whether a fused layer kernel can apply this bias_act: a known activation, a positive gain (the
    backward recovers the activation's input from the output), a per-channel bias."""
    return (
        act in ACTS
        and (gain is None or gain > 0)
        and (alpha is None or alpha >= 0)
        and (bias is None or (bias.ndim == 1 and bias.shape[0] == channels))
    )


def act_backward(grad, y, bias, act, alpha, gain, clamp):
    """From a fused layer's output y alone: dv, the gradient at the activation's input v, and v - b, the
    output before bias and activation (both float32).

    v is recovered from y (lrelu and linear are invertible where the gradient is not zero; relu's negative
    side and clamped values have zero gradient), the rule NVIDIA's bias_act uses:
    dv = g * gain * act'(y) * [|y| < clamp as stored in y's dtype]."""
    y32 = y.float()
    pos = y32 > 0
    if act == "linear":
        da, v = 1.0, y32 / gain
    elif act == "relu":
        da, v = pos.float(), torch.where(pos, y32 / gain, 0.0)
    else:
        da = torch.where(pos, 1.0, alpha)
        v = torch.where(pos, y32 / gain, y32 / (gain * alpha) if alpha != 0 else 0.0)
    dv = grad.float() * gain * da
    if clamp is not None:  # clamped values were stored as float32(clamp) rounded to y's dtype (0.3 -> 0.3008 in bf16)
        dv = dv * (y32.abs() < float(torch.tensor(clamp, dtype=torch.float32).to(y.dtype)))
    return dv, (v if bias is None else v - bias.float()[None, :, None, None])


def demod_coefficients(weight: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    """[N, O] = rsqrt(s^2 @ Wsq^T + 1e-8), in float32: the reference's per-output sum of squared modulated weights."""
    wsq = weight.float().square().sum(dim=[2, 3])  # [O, I]
    return (styles.float().square() @ wsq.t() + 1e-8).rsqrt()


def reference_grads(fn, inputs, needs, grad):
    """Gradients of fn(*inputs) for the inputs that need one (None for the others), with create_graph=True:
    how the custom functions here take second-order gradients, through the reference's own graph built on
    their saved (graph-connected) inputs."""
    with torch.enable_grad():
        y = fn(*inputs)
    wrt = [t for t, need in zip(inputs, needs) if need]
    grads = iter(torch.autograd.grad(y, wrt, grad, create_graph=True)) if wrt else iter(())
    return [next(grads) if need else None for need in needs]
