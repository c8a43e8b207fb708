"""FIR resampling as a Triton kernel, and the up-sampling synthesis layer built on it.

`upfirdn2d`: zero-insert by `up`, pad (negative = crop), filter, keep every `down`-th sample, exactly the
reference's semantics, as one direct kernel: each output pixel sums its filter taps over the input
pixels they land on (taps that land on inserted zeros are skipped by a mask, never computed). Its
backward is the same op with up and down swapped, the filter flipped and the padding mirrored, so it
differentiates to any order.

The up-sampling layer (`modulated_conv2d_act` with up=2): the styles scale the input and the
stride-2 transposed convolution runs in PyTorch (cuDNN on a GPU; float32, so its result does not depend
on how a backend accumulates in bf16/fp16), then one kernel applies the FIR filter and the whole
epilogue: demodulation, noise, bias, activation, gain, clamp. Its backward works from the layer's output
alone (`_triton_common.act_backward`), sends the gradient back through the FIR kernel, and leaves the
transposed convolution and the demodulation coefficients to PyTorch's autograd.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 before import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pti.kernels import ref
from pti.kernels._triton_common import (
    ACTS,
    DTYPES,
    act_and_mask,
    act_backward,
    demod_coefficients,
    epilogue_supported,
    resolve,
    round_to,
)

BLOCK = 256


@triton.jit
def _fir_kernel(
    x_ptr,
    f_ptr,
    d_ptr,
    noise_ptr,
    b_ptr,
    y_ptr,
    C,
    H,
    W,
    OH,
    OW,
    fir_gain,
    alpha,
    gain,
    clamp,
    sxn,
    sxc,
    sxh,
    sxw,
    sdn,
    sdc,
    snn,
    snc,
    snh,
    snw,
    syn,
    syc,
    syh,
    syw,
    UP: tl.constexpr,
    DOWN: tl.constexpr,
    PX0: tl.constexpr,
    PY0: tl.constexpr,
    FH: tl.constexpr,
    FW: tl.constexpr,
    FLIP: tl.constexpr,
    OUT_SCALE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    CLAMP: tl.constexpr,
    EPILOGUE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    nc = tl.program_id(0)
    n = nc // C
    c = nc % C
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < OH * OW
    oy = offs // OW
    ox = offs % OW
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for ky in tl.static_range(FH):
        jy = oy * DOWN + ky - PY0  # row in the zero-inserted, padded input
        row_ok = ok & (jy >= 0) & (jy % UP == 0) & (jy < H * UP)
        iy = tl.where(row_ok, jy // UP, 0)
        for kx in tl.static_range(FW):
            jx = ox * DOWN + kx - PX0
            valid = row_ok & (jx >= 0) & (jx % UP == 0) & (jx < W * UP)
            ix = tl.where(valid, jx // UP, 0)
            v = tl.load(x_ptr + n * sxn + c * sxc + iy * sxh + ix * sxw, mask=valid, other=0.0).to(tl.float32)
            if FLIP:  # correlation with f as given
                tap = tl.load(f_ptr + ky * FW + kx)
            else:  # convolution: the filter flipped
                tap = tl.load(f_ptr + (FH - 1 - ky) * FW + (FW - 1 - kx))
            acc += v * tap
    acc = acc * fir_gain
    if OUT_SCALE:
        acc = acc * tl.load(d_ptr + n * sdn + c * sdc).to(tl.float32)
    if HAS_NOISE:
        acc += tl.load(noise_ptr + n * snn + c * snc + oy * snh + ox * snw, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    if EPILOGUE:
        acc, _, _ = act_and_mask(acc, alpha, gain, clamp, ACT, CLAMP)
    tl.store(y_ptr + n * syn + c * syc + oy * syh + ox * syw, round_to(acc, y_ptr.dtype.element_ty), mask=ok)


def _out_size(size, up, down, p0, p1, taps):
    return (size * up + p0 + p1 - taps) // down + 1


def _launch(x, f, up, down, padding, flip_filter, gain, out_dtype=None, d=None, noise=None, epilogue=None):
    n, c, h, w = x.shape
    px0, px1, py0, py1 = padding
    fh, fw = f.shape
    oh, ow = _out_size(h, up, down, py0, py1, fh), _out_size(w, up, down, px0, px1, fw)
    y = torch.empty([n, c, max(oh, 0), max(ow, 0)], device=x.device, dtype=out_dtype or x.dtype)
    if y.numel() == 0:
        return y
    bias, act, alpha, act_gain, clamp = epilogue or (None, "linear", 0.0, 1.0, None)
    dd = d if d is not None else y.new_empty([1, 1])
    nz = y if noise is None else noise.to(y.dtype).expand(y.shape)
    _fir_kernel[(n * c, triton.cdiv(oh * ow, BLOCK))](
        x,
        f.float().contiguous(),
        dd,
        nz,
        y if bias is None else bias,
        y,
        c,
        h,
        w,
        oh,
        ow,
        float(gain),
        float(alpha),
        float(act_gain),
        float(clamp) if clamp is not None else 0.0,
        *x.stride(),
        *dd.stride(),
        *nz.stride(),
        *y.stride(),
        UP=up,
        DOWN=down,
        PX0=px0,
        PY0=py0,
        FH=fh,
        FW=fw,
        FLIP=flip_filter,
        OUT_SCALE=d is not None,
        HAS_NOISE=noise is not None,
        HAS_BIAS=bias is not None,
        ACT=ACTS[act],
        CLAMP=clamp is not None,
        EPILOGUE=epilogue is not None,
        BLOCK=BLOCK,
    )
    return y


def _adjoint_padding(x_shape, y_shape, f, up, down, padding):
    """The padding of the transposed op: y's gradient resampled with up/down swapped lands on x's grid."""
    px0, px1, py0, py1 = padding
    fh, fw = f.shape
    h, w = x_shape[2], x_shape[3]
    oh, ow = y_shape[2], y_shape[3]
    return [fw - px0 - 1, w * up - ow * down + px0 - up + 1, fh - py0 - 1, h * up - oh * down + py0 - up + 1]


def _transpose(g, f, up, down, padding, flip_filter, gain, x_shape):
    """The adjoint of upfirdn2d(x, f, up, down, padding, flip_filter, gain) applied to g (y's gradient)."""
    pad = _adjoint_padding(x_shape, g.shape, f, up, down, padding)
    return Upfirdn2d.apply(g, f, down, up, pad, not flip_filter, gain)


class Upfirdn2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, up, down, padding, flip_filter, gain):
        y = _launch(x, f, up, down, padding, flip_filter, gain)
        ctx.save_for_backward(f)
        ctx.args = (up, down, padding, flip_filter, gain, x.shape)
        return y

    @staticmethod
    def backward(ctx, g):
        (f,) = ctx.saved_tensors
        up, down, padding, flip_filter, gain, x_shape = ctx.args
        return _transpose(g, f, up, down, padding, flip_filter, gain, x_shape), None, None, None, None, None, None


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1):
    """Same signature and result as `ref.upfirdn2d` (to float32 rounding), for the inputs `supports` accepts."""
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    return Upfirdn2d.apply(x, f, int(up), int(down), list(ref._parse_padding(padding)), bool(flip_filter), float(gain))


def supports(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1) -> bool:
    return (
        x.ndim == 4
        and x.dtype in DTYPES
        and up >= 1
        and down >= 1
        and (f is None or (f.ndim == 2 and not f.requires_grad and f.device == x.device))
    )


# ----------------------------------------------------------------------------- the up-sampling layer


class FirAct(torch.autograd.Function):
    """y = bias_act(d * FIR(t) + noise): the FIR filter and the layer's whole epilogue in one kernel."""

    @staticmethod
    def forward(ctx, t, f, d, noise, bias, up, padding, flip_filter, epilogue, out_dtype):
        y = _launch(
            t,
            f,
            1,
            1,
            padding,
            flip_filter,
            up * up,
            out_dtype=out_dtype,
            d=d,
            noise=noise,
            epilogue=(None if bias is None else bias.to(out_dtype), *epilogue),
        )
        ctx.save_for_backward(f, d, noise, bias, y)
        ctx.args = (up, padding, flip_filter, epilogue, t.shape, t.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        f, d, noise, bias, y = ctx.saved_tensors
        up, padding, flip_filter, (act, alpha, gain, clamp), t_shape, t_dtype = ctx.args
        dv, pre = act_backward(grad, y, bias, act, alpha, gain, clamp)  # float32, [N, C, OH, OW]
        dd = dnoise = db = None
        if ctx.needs_input_grad[2]:  # pre = d * u + noise
            u_dv = dv * (pre - (0 if noise is None else noise.float()))
            dd = (u_dv.sum(dim=[2, 3]) / d.float()).to(d.dtype)
        du = dv * d.float()[:, :, None, None] if d is not None else dv
        dt = None
        if ctx.needs_input_grad[0]:
            dt = _transpose(du, f, 1, 1, padding, flip_filter, float(up * up), t_shape).to(t_dtype)
        if noise is not None and ctx.needs_input_grad[3]:
            dnoise = dv.sum_to_size(noise.shape).to(noise.dtype)
        if bias is not None and ctx.needs_input_grad[4]:
            db = dv.sum(dim=[0, 2, 3]).to(bias.dtype)
        return dt, None, dd, dnoise, db, None, None, None, None, None


def modulated_conv2d_up_act(
    x,
    weight,
    styles,
    noise=None,
    up=2,
    padding=0,
    resample_filter=None,
    demodulate=True,
    flip_weight=False,
    fused_modconv=True,
    bias=None,
    act="linear",
    alpha=None,
    gain=None,
    clamp=None,
):
    """The up-sampling synthesis layer; the same result as the reference's modulated conv + bias_act."""
    # The reference's fp16 overflow guard (weight and styles rescaled by their max-norms) is not needed: the
    # convolution runs in float32, and with demodulation the scale would cancel anyway.
    f = resample_filter
    pads = [a + b for a, b in zip(ref._parse_padding(padding), ref.upsample_padding(f, up))]
    xs = x.float() * styles.float()[:, :, None, None]
    t, fir_padding = ref.transposed_conv_up(xs, weight.float(), up, pads, 1, flip_weight)
    d = demod_coefficients(weight, styles) if demodulate else None
    return FirAct.apply(t, f, d, noise, bias, up, fir_padding, False, resolve(act, alpha, gain, clamp), x.dtype)


def supports_up_act(
    x,
    weight,
    styles,
    noise=None,
    up=1,
    padding=0,
    resample_filter=None,
    demodulate=True,
    flip_weight=True,
    fused_modconv=True,
    bias=None,
    act="linear",
    alpha=None,
    gain=None,
    clamp=None,
) -> bool:
    return (
        up == 2
        and x.ndim == 4
        and x.dtype in DTYPES
        and resample_filter is not None
        and resample_filter.ndim == 2
        and not resample_filter.requires_grad
        and weight.shape[-1] == weight.shape[-2]
        and (noise is None or noise.ndim <= 4)
        and epilogue_supported(bias, weight.shape[0], act, alpha, gain)
    )
