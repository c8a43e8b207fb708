"""What the Triton kernel files share: the layer epilogue, the demodulation coefficients, the rounding,
the precision a layer computes in, and the int64 offsets.

The epilogue is y = clamp(act(v) * gain, -clamp, clamp) with v = x + b, for the activations StyleGAN2
uses (linear, relu, lrelu). `resolve` fills in its defaults, `epilogue_supported` says whether a fused
layer kernel can apply it, `act_and_mask` computes it inside a kernel, and `act_backward` differentiates
it from the stored output alone. `demod_coefficients` is the modulated convolution's d (and
`demod_backward` its gradient), `round_to` the one rounding every kernel's store makes, and
`reference_grads` the second-order fallback of every custom autograd function here (through the
reference's graph).

Precision (`pti.kernels.precision` names them): a layer computes in `compute_dtype(x)`, x's dtype or the
autocast dtype where autocast is on for x's device (what the reference's convolutions run in there, so
the output dtype is the reference's). Its GEMM operands are rounded to that dtype and accumulated in
float32; float32 operands go through `tl.dot` as "ieee" or "tf32" (`precision.dot_precision`, read once
per forward and kept for the backward). The custom autograd functions run their bodies with autocast off
(`no_autocast`) and take the dtype and the precision as arguments, so the forward and the backward
compute the same way whatever autocast state either is called under, on CUDA tensors and on CPU ones
under the interpreter alike. (`torch.amp.custom_fwd(device_type="cuda")`/`custom_bwd` would not do
that: they record and restore the CUDA autocast state only, so on CPU tensors the forward would still
run under CPU autocast and the backward under whatever state its caller has.) The torch ops a layer
calls (the weight gradient, the up-sampling layer's transposed convolution) run under `tf32(...)` set to
what its `tl.dot` does, so one layer has one precision whatever PyTorch's defaults (cuDNN's TF32 is on
by default); the demodulation coefficients are always exact float32 (`tf32(False)`).

Offsets: every kernel advances its pointers by the sample (or flat block) in int64 (`.to(tl.int64)`
on the program index before it multiplies a stride), so a batch past 2^31 elements (1024 px from
batch 64) does not wrap; offsets inside one sample stay int32, so `offsets_fit` refuses a sample
whose own extent reaches 2^31 elements.

`triton_bias_act`, `triton_modconv` and `triton_upfirdn` import from here; this module imports none of
them. Like them it needs Triton, and TRITON_INTERPRET=1 set before import to run on CPU tensors.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from pti.kernels import ref
from pti.kernels.precision import no_autocast, tf32  # noqa: F401  (tf32: the modules import it from here)

ACTS = {"linear": 0, "relu": 1, "lrelu": 2}  # the activations the kernels know, as a constexpr code
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels load and store
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
INT32_LIMIT = 2**31  # offsets inside one sample must stay below this (they are int32)


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
def dot_acc(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, the GEMM step of the modulated convolution: a (float32) rounded to nearest even to
    DOT_DTYPE, b already in it; float32 accumulation; float32 operands as PRECISION ("ieee" or "tf32"),
    16-bit ones natively. UPCAST (CPU tensors, bfloat16): Triton's interpreter misreads bfloat16
    operands of `tl.dot` (as their uint16 bits), so there the rounded operands are multiplied as float32,
    the same products (exact in float32) and the same float32 accumulation as a bfloat16 MMA."""
    a = round_to(a, DOT_DTYPE)
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def flat_block(pid, INNER, C, BLOCK: tl.constexpr):
    """Program `pid`'s block of a flat pass over a contiguous tensor: the offset of its first element
    (int64: the tensor may pass 2^31 elements) and each element's channel (offset // INNER) % C, computed
    from that int64 scalar with int32 vectors (no int64 division per element; INNER + BLOCK < 2^31)."""
    start = pid.to(tl.int64) * BLOCK
    row = start // INNER  # the (sample, channel) row the block starts in
    local = (start - row * INNER).to(tl.int32) + tl.arange(0, BLOCK)  # offsets from that row's start
    chan = ((row % C).to(tl.int32) + local // INNER) % C
    return start, chan


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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer on x computes in: the autocast dtype where autocast is on for x's device (the
    reference's convolutions run in it there, and give it as their output), else x's own."""
    kind = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """The operand dtype of the torch convolutions a layer computing in `dtype` calls (their outputs are
    stored in it): bfloat16 for bfloat16 (float32's range); float32 for float16, whose range is why the
    reference guards its fp16 convolutions against overflow (a weight gradient or a transposed
    convolution's output before demodulation can pass 65504)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def upcast(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `dot_acc` multiplies bfloat16 operands as float32: on CPU tensors, under the interpreter."""
    return not x.is_cuda and dtype == torch.bfloat16


def sample_extent(t: torch.Tensor) -> int:
    """The largest element offset inside one sample of a 4-D t (every dimension but the first), as its strides
    give it; of the whole of a tensor with fewer dimensions (one broadcast over the batch: noise [H, W])."""
    dims = range(1, 4) if t.ndim == 4 else range(t.ndim)
    return sum((t.shape[i] - 1) * abs(t.stride(i)) for i in dims if t.shape[i] > 0)


def offsets_fit(*tensors) -> bool:
    """Whether every tensor's offsets inside one sample fit int32 (the kernels add them to an int64 base)."""
    return all(t is None or sample_extent(t) < INT32_LIMIT for t in tensors)


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
    """[N, O] = rsqrt(s^2 @ Wsq^T + 1e-8), in float32: the reference's per-output sum of squared modulated weights.
    Exact float32 whatever the caller's autocast and TF32 flags (the reference's is elementwise), so the forward
    and the backward see the same coefficients."""
    with no_autocast(weight.device.type), tf32(False):
        wsq = weight.float().square().sum(dim=[2, 3])  # [O, I]
        return (styles.float().square() @ wsq.t() + 1e-8).rsqrt()


def demod_backward(dd: torch.Tensor, d: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor):
    """The demodulation's own gradient, float32: from dd [N, O] (the loss's gradient at d) to the weight
    [O, I, k, k] and the styles [N, I]: with dq = -d^3 / 2 * dd,  dW = 2 W * (dq^T @ s^2),  ds = 2 s * (dq @ Wsq)."""
    with no_autocast(weight.device.type), tf32(False):
        dq = -0.5 * d.pow(3) * dd
        s32, w32 = styles.float(), weight.float()
        dw = 2 * w32 * (dq.t() @ s32.square())[:, :, None, None]
        ds = 2 * s32 * (dq @ w32.square().sum(dim=[2, 3]))
    return dw, ds


def reference_grads(fn, inputs, needs, grad):
    """Gradients of fn(*inputs) for the inputs that need one (None for the others), with create_graph=True:
    how the custom functions here take second-order gradients, through the reference's own graph built on
    their saved (graph-connected) inputs."""
    with torch.enable_grad():
        y = fn(*inputs)
    wrt = [t for t, need in zip(inputs, needs) if need]
    grads = iter(torch.autograd.grad(y, wrt, grad, create_graph=True)) if wrt else iter(())
    return [next(grads) if need else None for need in needs]
