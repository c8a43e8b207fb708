"""FIR resampling as a Triton kernel, and the up-sampling synthesis layer built on it.

`upfirdn2d`: zero-insert by `up`, pad (negative = crop), filter, keep every `down`-th sample, exactly the
reference's semantics, as one direct kernel: each output pixel sums its filter taps over the input
pixels they land on (taps that land on inserted zeros are skipped by a mask, never computed). Its
backward is the same op with up and down swapped, the filter flipped and the padding mirrored, so it
differentiates to any order. It is no GEMM: float32 arithmetic, one rounding at the store, to x's
dtype or, under autocast, to the autocast dtype (the reference's filter is a convolution, which autocast
runs and returns in that dtype).

The up-sampling layer (`modulated_conv2d_act` with up=2, `ModulatedConv2dUpAct`): the styles scale the
input and the stride-2 transposed convolution runs in PyTorch (cuDNN on a GPU), then one kernel applies
the FIR filter and the whole epilogue: demodulation, noise, bias, activation, gain, clamp. Its backward
works from the layer's output alone (`_triton_common.act_backward`), sends the gradient back through the
FIR kernel, then through the transposed convolution (`aten.convolution_backward`, the op PyTorch's own
autograd would call) and the demodulation (`demod_backward`).

Precision, as in `triton_modconv`: the layer computes in `compute_dtype(x)`; the transposed convolution's
operands (s * x formed in float32 and rounded once, the weight) and its output are `torch_dtype` of it
(bfloat16 under bf16, float32 for float32 and float16: the reference guards fp16 convolutions against
overflow, and this output is not yet demodulated), under cuDNN TF32 exactly when the layer's precision
(`precision.dot_precision`, read at the forward and kept for the backward) is "tf32"; forward and
backward run with autocast off. The kernels index samples and planes in int64 (`supports` refuses a
sample whose own offsets pass 2^31).

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
    INT32_LIMIT,
    act_and_mask,
    act_backward,
    compute_dtype,
    demod_backward,
    demod_coefficients,
    epilogue_supported,
    offsets_fit,
    reference_grads,
    resolve,
    round_to,
    tf32,
    torch_dtype,
)
from pti.kernels.precision import dot_precision, no_autocast

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
    nc = tl.program_id(0).to(tl.int64)  # (sample, channel): int64, n * stride passes 2^31 from 1024 px x batch 64
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


def _transpose(g, f, up, down, padding, flip_filter, gain, x_shape, out_dtype=None):
    """The adjoint of upfirdn2d(x, f, up, down, padding, flip_filter, gain) applied to g (y's gradient)."""
    pad = _adjoint_padding(x_shape, g.shape, f, up, down, padding)
    return Upfirdn2d.apply(g, f, down, up, pad, not flip_filter, gain, out_dtype or g.dtype)


class Upfirdn2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, up, down, padding, flip_filter, gain, out_dtype):
        y = _launch(x, f, up, down, padding, flip_filter, gain, out_dtype=out_dtype)
        ctx.save_for_backward(f)
        ctx.args = (up, down, padding, flip_filter, gain, x.shape, x.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        (f,) = ctx.saved_tensors
        up, down, padding, flip_filter, gain, x_shape, x_dtype = ctx.args
        dx = _transpose(g, f, up, down, padding, flip_filter, gain, x_shape, out_dtype=x_dtype)
        return dx, None, None, None, None, None, None, None


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1):
    """Same signature and result as `ref.upfirdn2d` (to float32 rounding), for the inputs `supports` accepts;
    the output dtype the reference's (`compute_dtype`: the autocast dtype under autocast)."""
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    pad = list(ref._parse_padding(padding))
    return Upfirdn2d.apply(x, f, int(up), int(down), pad, bool(flip_filter), float(gain), compute_dtype(x))


def supports(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1) -> bool:
    """4-D inputs with a 2-D filter that needs no gradient; each sample's offsets (input and output) in int32."""
    if not (
        x.ndim == 4
        and x.dtype in DTYPES
        and up >= 1
        and down >= 1
        and (f is None or (f.ndim == 2 and not f.requires_grad and f.device == x.device))
    ):
        return False
    px0, px1, py0, py1 = ref._parse_padding(padding)
    fw, fh = ref.filter_size(f)
    oh, ow = _out_size(x.shape[2], up, down, py0, py1, fh), _out_size(x.shape[3], up, down, px0, px1, fw)
    return offsets_fit(x) and x.shape[1] * max(oh, 0) * max(ow, 0) <= INT32_LIMIT


# ----------------------------------------------------------------------------- the up-sampling layer


class ModulatedConv2dUpAct(torch.autograd.Function):
    """y = bias_act(d * FIR(t) + noise), t = conv^T_up(s * x, W): the transposed convolution in PyTorch, the FIR
    filter and the layer's whole epilogue in one kernel; only x, the weights and y are kept for the backward.
    Computes in `dtype` with `precision` (the module's docstring), autocast off in forward and backward.
    Second order: the reference's graph (in float32)."""

    @staticmethod
    def forward(
        ctx, x, weight, styles, noise, bias, f, up, padding, flip_weight, demodulate, epilogue, dtype, precision
    ):
        op = torch_dtype(dtype)
        with no_autocast(x.device.type):
            pads = [a + b for a, b in zip(ref._parse_padding(padding), ref.upsample_padding(f, up))]
            xs = (x.float() * styles.float()[:, :, None, None]).to(op)
            with tf32(precision == "tf32"):  # cuDNN at the layer's precision, whatever its TF32 default
                t, fir_padding = ref.transposed_conv_up(xs, weight.to(op), up, pads, 1, flip_weight)
            d = demod_coefficients(weight, styles) if demodulate else None
            b = None if bias is None else bias.to(dtype)  # the bias rounded as the reference's
            y = _launch(t, f, 1, 1, fir_padding, False, up * up, dtype, d=d, noise=noise, epilogue=(b, *epilogue))
        ctx.save_for_backward(x, weight, styles, noise, bias, f, d, y)
        ctx.args = (up, padding, flip_weight, demodulate, epilogue, fir_padding, t.shape, dtype, precision)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, styles, noise, bias, f, d, y = ctx.saved_tensors
        up, padding, flip_weight, demodulate, (act, alpha, gain, clamp) = ctx.args[:5]
        need_x, need_w, need_s, need_noise, need_b = ctx.needs_input_grad[:5]
        rest = (None,) * 8  # f, up, padding, flip_weight, demodulate, epilogue, dtype, precision
        with no_autocast(x.device.type):
            if torch.is_grad_enabled():  # create_graph=True: the reference's graph

                def layer(x, weight, styles, noise, bias):
                    z = ref.modulated_conv2d(
                        x,
                        weight,
                        styles,
                        noise=noise,
                        up=up,
                        padding=padding,
                        resample_filter=f,
                        demodulate=demodulate,
                        flip_weight=flip_weight,
                        fused_modconv=False,
                    )
                    b = None if bias is None else bias.to(z.dtype)
                    return ref.bias_act(z, b, act=act, alpha=alpha, gain=gain, clamp=clamp)

                needs = (need_x, need_w, need_s, need_noise, need_b)
                return (*reference_grads(layer, (x, weight, styles, noise, bias), needs, grad), *rest)
            grads = _up_backward(grad, x, weight, styles, noise, bias, f, d, y, ctx.args, ctx.needs_input_grad[:5])
            return (*grads, *rest)


def _up_backward(grad, x, weight, styles, noise, bias, f, d, y, args, needs):
    """The up-sampling layer's gradients (x, weight, styles, noise, bias; None where not needed), from y alone:
    dv = the epilogue's backward; du = d * dv;  dt = FIR^T(du) (the kernel, rounded to the transposed
    convolution's dtype); (d xs, dW) = that convolution's backward at (s * x, W);  dx = s * d xs;
    ds = sum_p x * d xs;  dd = sum_p dv * (v - b - noise) / d, and the demodulation's own gradient."""
    up, _, flip_weight, demodulate, (act, alpha, gain, clamp), fir_padding, t_shape, dtype, precision = args
    need_x, need_w, need_s, need_noise, need_b = needs
    dv, pre = act_backward(grad, y, bias, act, alpha, gain, clamp)  # float32, [N, C, OH, OW]; pre = d * u + noise
    dx = dw = ds = dnoise = db = None
    if need_x or need_w or need_s:
        op = torch_dtype(dtype)
        du = dv * d[:, :, None, None] if d is not None else dv
        dt = _transpose(du, f, 1, 1, fir_padding, False, float(up * up), t_shape, out_dtype=op)
        s32 = styles.float()
        xs = (x.float() * s32[:, :, None, None]).to(op)  # recomputed: cheaper than keeping it
        w_t = weight.to(op).transpose(0, 1)  # conv_transpose2d's [I, O, k, k], flipped when the layer correlates
        w_t = w_t.flip([2, 3]) if flip_weight else w_t
        kh, kw = weight.shape[2:]
        pad = [((x.shape[2] - 1) * up + kh - t_shape[2]) // 2, ((x.shape[3] - 1) * up + kw - t_shape[3]) // 2]
        with tf32(precision == "tf32"):
            dxs, dw_t, _ = torch.ops.aten.convolution_backward(
                dt, xs, w_t, None, [up, up], pad, [1, 1], True, [0, 0], 1, [need_x or need_s, need_w, False]
            )
        if need_x:
            dx = (dxs.float() * s32[:, :, None, None]).to(x.dtype)
        if need_s:
            ds = (dxs.float() * x.float()).sum(dim=[2, 3])
        if need_w:
            dw = (dw_t.flip([2, 3]) if flip_weight else dw_t).transpose(0, 1).float()
        if demodulate and (need_w or need_s):
            dd = (dv * (pre - (0 if noise is None else noise.float()))).sum(dim=[2, 3]) / d
            dw_d, ds_d = demod_backward(dd, d, weight, styles)
            ds = ds + ds_d if need_s else None
            dw = dw + dw_d if need_w else None
    if noise is not None and need_noise:
        dnoise = dv.sum_to_size(noise.shape).to(noise.dtype)
    if bias is not None and need_b:
        db = dv.sum(dim=[0, 2, 3]).to(bias.dtype)
    return (dx, None if dw is None else dw.to(weight.dtype), None if ds is None else ds.to(styles.dtype), dnoise, db)


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
    # convolution runs in float32 or bfloat16, and with demodulation the scale would cancel anyway.
    dtype = compute_dtype(x)
    epilogue = resolve(act, alpha, gain, clamp)
    return ModulatedConv2dUpAct.apply(
        x,
        weight,
        styles,
        noise,
        bias,
        resample_filter,
        up,
        padding,
        flip_weight,
        demodulate,
        epilogue,
        dtype,
        dot_precision(dtype),
    )


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
        and offsets_fit(x, noise)  # and the transposed convolution's output and y, per sample:
        and weight.shape[0] * (x.shape[2] * up + weight.shape[2]) * (x.shape[3] * up + weight.shape[3]) <= INT32_LIMIT
    )
