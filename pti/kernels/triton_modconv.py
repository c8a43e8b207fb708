"""Modulated convolution as one Triton implicit-GEMM kernel: no per-sample weights are materialized.

    y[n, o, p] = d[n, o] * sum_{i, tap} W[o, i, tap] * (s[n, i] * x[n, i, p + tap]) (+ noise)

for the stride-1 layers of StyleGAN2 (3x3 with padding 1, and the 1x1 toRGB), correlation as
`F.conv2d` (flip_weight=True). The GEMM runs over M = output pixels, N = output channels and
K = input channels x taps: each program loads a tile of the modulated input (scaled by the styles as it
is loaded, zero outside the image) and a tile of the shared weight, accumulates in float32, and applies
the demodulation coefficients, the noise and the layer's bias_act (bias, activation, gain, clamp) in its
epilogue (`ModulatedConv2dAct`; the plain modulated conv is the same with a linear, unit-gain one). The
coefficients d = rsqrt(s^2 @ Wsq^T + 1e-8),
Wsq[o, i] = sum over taps of W[o, i, tap]^2, are an [N, O] matrix computed beside it (the same sum as the
reference's, in another order).

Backward (`backward`): the input gradient is this kernel again (input scaled by d, the weight transposed
and flipped, output scaled by s); the weight gradient's reduction over batch and pixels is
`torch.nn.grad.conv2d_weight` (cuDNN on a GPU); the demodulation's own gradient (through d to the weight
and the styles) is a few [N, O] x [O, I] products. No per-sample weights anywhere, and no second
forward pass. The layer's backward starts from its output alone (`_triton_common.act_backward`).
Second-order gradients, which the recipe never takes, go through the reference's autograd. The
up-sampling layers are in `triton_upfirdn`.

Precision (`_triton_common`'s docstring has the rule): the layer computes in `compute_dtype(x)` (x's
dtype, or bfloat16 under bf16 autocast, where its output is bfloat16 as the reference's is). The GEMM's
operands are that dtype: s * x is formed in float32 and rounded once to it as it is loaded, the weight is
cast to it; `tl.dot` accumulates in float32, with "ieee" or "tf32" for float32 operands as the TF32 flag
says when the forward runs (`precision.dot_precision`, a constexpr: each variant compiles on its own).
The backward's input gradient is the same kernel in the same dtype and precision; its weight gradient
takes bfloat16 operands for bfloat16 and float32 otherwise (`torch_dtype`), with cuDNN's TF32 set to
the layer's precision. The demodulation coefficients and their gradient are exact float32 in both.

Offsets: the sample index is int64 before it multiplies a stride, so N x C x H x W past 2^31 elements
does not wrap; `supports` refuses a single sample whose own offsets would pass 2^31.

It runs on CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before
this module is imported), which is how CI checks it. Registered as implementation "triton" of
`modulated_conv2d` and `modulated_conv2d_act` (`pti.kernels.register`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pti.kernels import ref, triton_upfirdn
from pti.kernels._triton_common import (
    ACTS,
    DTYPES,
    INT32_LIMIT,
    TL_DTYPES,
    act_and_mask,
    act_backward,
    compute_dtype,
    demod_backward,
    demod_coefficients,
    dot_acc,
    epilogue_supported,
    offsets_fit,
    reference_grads,
    resolve,
    round_to,
    tf32,
    torch_dtype,
    upcast,
)
from pti.kernels.precision import dot_precision, no_autocast

BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 16


@triton.jit
def _modconv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    d_ptr,
    noise_ptr,
    b_ptr,
    y_ptr,
    C_IN,
    C_OUT,
    H,
    W,
    alpha,
    gain,
    clamp,
    sxn,
    sxc,
    sxh,
    sxw,  # x strides
    swo,
    swi,
    swh,
    sww,  # weight strides
    ssn,
    ssi,  # input scale (styles) strides
    sdn,
    sdo,  # output scale (demodulation) strides
    snn,
    snc,
    snh,
    snw,  # noise strides (0 where broadcast)
    syn,
    syc,
    syh,
    syw,  # y strides
    KSIZE: tl.constexpr,
    PAD: tl.constexpr,
    OUT_SCALE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    CLAMP: tl.constexpr,
    EPILOGUE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # the GEMM operands' dtype: the weight's (`dot_acc`)
    PRECISION: tl.constexpr,  # tl.dot's input_precision for float32 operands: "ieee" or "tf32"
    UPCAST: tl.constexpr,  # bfloat16 operands multiplied as float32 (the interpreter, `dot_acc`)
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0)  # a tile of output pixels
    pid_n = tl.program_id(1)  # a tile of output channels
    n = tl.program_id(2).to(tl.int64)  # the sample: int64, n * stride passes 2^31 from 1024 px x batch 64
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    oh = offs_m // W
    ow = offs_m % W
    m_ok = offs_m < H * W
    n_ok = offs_n < C_OUT
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for tap in range(0, KSIZE * KSIZE):
        kh = tap // KSIZE
        kw = tap % KSIZE
        ih = oh + kh - PAD
        iw = ow + kw - PAD
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        for k0 in range(0, C_IN, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < C_IN
            a = tl.load(
                x_ptr + n * sxn + offs_k[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw,
                mask=pix_ok[:, None] & k_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            s = tl.load(s_ptr + n * ssn + offs_k * ssi, mask=k_ok, other=0.0).to(tl.float32)
            a = a * s[None, :]  # modulate the input as it is loaded (float32, rounded once to DOT_DTYPE)
            b = tl.load(
                w_ptr + offs_n[None, :] * swo + offs_k[:, None] * swi + kh * swh + kw * sww,
                mask=k_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            acc = dot_acc(a, b, acc, DOT_DTYPE, PRECISION, UPCAST)
    if OUT_SCALE:
        d = tl.load(d_ptr + n * sdn + offs_n * sdo, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc * d[None, :]
    if HAS_NOISE:
        nz = tl.load(
            noise_ptr + n * snn + offs_n[None, :] * snc + oh[:, None] * snh + ow[:, None] * snw,
            mask=m_ok[:, None] & n_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = acc + nz
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE:  # the layer's activation, gain and clamp (pti.kernels._triton_common)
        acc, _, _ = act_and_mask(acc, alpha, gain, clamp, ACT, CLAMP)
    tl.store(
        y_ptr + n * syn + offs_n[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw,
        round_to(acc, y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


def _launch(x, weight, in_scale, out_scale=None, noise=None, out_dtype=None, epilogue=None, precision="ieee"):
    """y[n, o] = out_scale[n, o] * sum_{i, tap} weight[o, i, tap] * in_scale[n, i] * x[n, i, p + tap] (+ noise),
    correlation with padding k // 2. Scales are [N, C] (any float dtype), noise broadcastable to the output.
    The GEMM's operands are the weight's dtype (in_scale * x rounded to it), `precision` its input_precision
    for float32; the output is the weight's dtype unless `out_dtype` says otherwise.
    `epilogue` = (bias or None, act, alpha, gain, clamp) applies the layer's bias_act before the store."""
    n, c_in, h, w = x.shape
    c_out, _, k, _ = weight.shape
    y = torch.empty([n, c_out, h, w], device=x.device, dtype=out_dtype or weight.dtype)
    d = out_scale if out_scale is not None else y.new_empty([1, 1])
    nz = y if noise is None else noise.to(y.dtype).expand(y.shape)  # [H, W] (constant) or [N, 1, H, W] (random)
    bias, act, alpha, gain, clamp = epilogue or (None, "linear", 0.0, 1.0, None)
    grid = (triton.cdiv(h * w, BLOCK_M), triton.cdiv(c_out, BLOCK_N), n)
    _modconv_kernel[grid](
        x,
        weight,
        in_scale,
        d,
        nz,
        y if bias is None else bias,
        y,
        c_in,
        c_out,
        h,
        w,
        float(alpha),
        float(gain),
        float(clamp) if clamp is not None else 0.0,
        *x.stride(),
        *weight.stride(),
        *in_scale.stride(),
        *d.stride(),
        *nz.stride(),
        *y.stride(),
        KSIZE=k,
        PAD=k // 2,
        OUT_SCALE=out_scale is not None,
        HAS_NOISE=noise is not None,
        HAS_BIAS=bias is not None,
        ACT=ACTS[act],
        CLAMP=clamp is not None,
        EPILOGUE=epilogue is not None,
        DOT_DTYPE=TL_DTYPES[weight.dtype],
        PRECISION=precision if weight.dtype == torch.float32 else "ieee",
        UPCAST=upcast(x, weight.dtype),
        BM=BLOCK_M,
        BN=BLOCK_N,
        BK=BLOCK_K,
    )
    return y


def forward(x, weight, styles, noise=None, demodulate=True, epilogue=None, dtype=None, precision=None):
    """The kernel's forward (no autograd). x [N, I, H, W], weight [O, I, k, k], styles [N, I], noise broadcastable
    to [N, O, H, W]; `epilogue` as in `_launch`. Computes in `dtype` (x's by default: the GEMM operands and the
    output) with `precision` (by default what the flags say now, `precision.dot_precision`)."""
    # The reference's fp16 overflow guard scales weight and styles by their max-norms; with demodulation the
    # scale cancels, so float32 accumulation needs no guard. Without demodulation (toRGB) nothing is scaled.
    dtype = dtype or x.dtype
    d = demod_coefficients(weight, styles) if demodulate else None
    precision = precision or dot_precision(dtype)
    return _launch(x, weight.to(dtype), styles, d, noise, epilogue=epilogue, precision=precision)


def backward(grad, x, weight, styles, noise, y, demodulate, needs=(True, True, True, True), dtype=None, precision=None):
    """Gradients of `forward` for x, weight, styles and noise (None where not needed), from its output y.

    With z = conv(s * x, W) and y = d * z + noise, d = rsqrt(s^2 @ Wsq^T + 1e-8):
      dz = d * g;  dx = s * conv^T(dz, W)  (this kernel again: in-scale d, the weight transposed and flipped);
      ds = sum_p x * conv^T(dz, W) + 2 s * (dq @ Wsq);  dW = conv_weight(s * x, dz) + 2 W * (dq^T @ s^2);
      dq = -d^3 / 2 * dd,  dd = sum_p g * z = sum_p g * (y - noise) / d;  dnoise = g summed to noise's shape.
    The two GEMMs in the forward's `dtype` and `precision` (the weight gradient's operands `torch_dtype(dtype)`),
    float32 accumulation and everything else float32, each result rounded once to its input's dtype; the weight
    gradient's reduction over batch and pixels is cuDNN's / oneDNN's (torch.nn.grad.conv2d_weight)."""
    dtype = dtype or x.dtype
    precision = precision or dot_precision(dtype)
    need_x, need_w, need_s, need_noise = needs
    k = weight.shape[-1]
    s32 = styles.float()
    d = demod_coefficients(weight, styles) if demodulate else None
    dx = dw = ds = dnoise = None
    if need_x or need_s:
        w_t = weight.transpose(0, 1).flip([2, 3]).to(dtype).contiguous()  # the adjoint of a stride-1 correlation
        ones = torch.ones(1, 1, device=x.device, dtype=torch.float32).expand(x.shape[0], weight.shape[0])
        dxs = _launch(grad, w_t, d if demodulate else ones, out_dtype=torch.float32, precision=precision)
        if need_x:
            dx = (dxs * s32[:, :, None, None]).to(x.dtype)
        if need_s:
            ds = (dxs * x.float()).sum(dim=[2, 3])
    if need_w:
        dz = grad.float() * d[:, :, None, None] if demodulate else grad.float()
        op = torch_dtype(dtype)
        with tf32(precision == "tf32"):  # cuDNN at the layer's precision, whatever its TF32 default
            xs = (x.float() * s32[:, :, None, None]).to(op)
            dw = torch.nn.grad.conv2d_weight(xs, weight.shape, dz.to(op), padding=k // 2).float()
    if demodulate and (need_w or need_s):
        dd = (grad.float() * (y.float() - (0 if noise is None else noise.float()))).sum(dim=[2, 3]) / d  # [N, O]
        dw_d, ds_d = demod_backward(dd, d, weight, styles)
        ds = ds + ds_d if need_s else None
        dw = dw + dw_d if need_w else None
    if need_noise and noise is not None:
        dnoise = grad.float().sum_to_size(noise.shape).to(noise.dtype)
    return (dx, None if dw is None else dw.to(weight.dtype), None if ds is None else ds.to(styles.dtype), dnoise)


def backward_act(grad, x, weight, styles, noise, bias, y, demodulate, act, alpha, gain, clamp, needs, **compute):
    """Gradients of the fused layer (x, weight, styles, noise, bias) from its output y alone: `act_backward`,
    then the modulated convolution's backward with v - b in place of its own output, and db = dv summed
    over batch and pixels. `compute`: the forward's dtype and precision."""
    dv, pre = act_backward(grad, y, bias, act, alpha, gain, clamp)
    grads = backward(dv, x, weight, styles, noise, pre, demodulate, needs[:4], **compute)
    db = dv.sum(dim=[0, 2, 3]).to(bias.dtype) if bias is not None and needs[4] else None
    return (*grads, db)


class ModulatedConv2dAct(torch.autograd.Function):
    """A whole synthesis layer in one kernel: modulated conv, noise, bias, activation, gain, clamp. Only y
    is kept for the backward (not the convolution's output as well). Computes in `dtype` with `precision`,
    decided by the caller (`modulated_conv2d_act`) from its autocast state and flags; forward and backward
    run with autocast off, so both compute the same way wherever they are called. Second order: the
    reference's graph (in float32)."""

    @staticmethod
    def forward(ctx, x, weight, styles, noise, bias, demodulate, act, alpha, gain, clamp, dtype, precision):
        ctx.args = (demodulate, *resolve(act, alpha, gain, clamp))
        ctx.compute = dict(dtype=dtype, precision=precision)
        with no_autocast(x.device.type):
            epilogue = (None if bias is None else bias.to(dtype), *ctx.args[1:])  # the bias rounded as the reference's
            y = forward(x, weight, styles, noise, demodulate, epilogue=epilogue, **ctx.compute)
        ctx.save_for_backward(x, weight, styles, noise, bias, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, styles, noise, bias, y = ctx.saved_tensors
        demodulate, act, alpha, gain, clamp = ctx.args
        needs = ctx.needs_input_grad[:5]
        rest = (None,) * 7  # demodulate, act, alpha, gain, clamp, dtype, precision
        with no_autocast(x.device.type):
            if not torch.is_grad_enabled():
                grads = backward_act(
                    grad, x, weight, styles, noise, bias, y, demodulate, act, alpha, gain, clamp, needs, **ctx.compute
                )
                return (*grads, *rest)

            def layer(x, weight, styles, noise, bias):  # create_graph=True: the reference's graph
                z = ref.modulated_conv2d(
                    x,
                    weight,
                    styles,
                    noise=noise,
                    padding=weight.shape[-1] // 2,
                    demodulate=demodulate,
                    fused_modconv=False,
                )
                return ref.bias_act(
                    z, None if bias is None else bias.to(z.dtype), act=act, alpha=alpha, gain=gain, clamp=clamp
                )

            return (*reference_grads(layer, (x, weight, styles, noise, bias), needs, grad), *rest)


def _apply(x, weight, styles, noise, bias, demodulate, act, alpha, gain, clamp):
    """The fused layer in the dtype and precision the caller's autocast state and flags give (`_triton_common`)."""
    dtype = compute_dtype(x)
    return ModulatedConv2dAct.apply(
        x, weight, styles, noise, bias, demodulate, act, alpha, gain, clamp, dtype, dot_precision(dtype)
    )


def modulated_conv2d_act(
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
):
    """Same signature and result as `pti.kernels.modulated_conv2d_act`'s reference, for the inputs `supports_act`
    accepts: the stride-1 layers here, the up-sampling ones in `triton_upfirdn`."""
    if up > 1:
        return triton_upfirdn.modulated_conv2d_up_act(
            x,
            weight,
            styles,
            noise,
            up,
            padding,
            resample_filter,
            demodulate,
            flip_weight,
            fused_modconv,
            bias,
            act,
            alpha,
            gain,
            clamp,
        )
    return _apply(x, weight, styles, noise, bias, demodulate, act, alpha, gain, clamp)


def supports_act(
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
    if up > 1:
        return triton_upfirdn.supports_up_act(
            x,
            weight,
            styles,
            noise,
            up,
            padding,
            resample_filter,
            demodulate,
            flip_weight,
            fused_modconv,
            bias,
            act,
            alpha,
            gain,
            clamp,
        )
    return supports(
        x, weight, styles, noise, up, padding, resample_filter, demodulate, flip_weight, fused_modconv
    ) and epilogue_supported(bias, weight.shape[0], act, alpha, gain)


def modulated_conv2d(
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
):
    """Same signature and result as `ref.modulated_conv2d`, for the inputs `supports` accepts: the fused layer
    with no bias and a linear, unit-gain epilogue (the same bits as no epilogue)."""
    return _apply(x, weight, styles, noise, None, demodulate, "linear", None, 1.0, None)


def supports(
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
) -> bool:
    """Stride-1 3x3 (padding 1) or 1x1 (padding 0) correlation on 4-D inputs; noise per pixel or broadcast;
    each sample's offsets (x's, the noise's, the output's) within int32 (the batch may pass it)."""
    k = weight.shape[-1]
    return (
        up == 1
        and flip_weight
        and x.ndim == 4
        and weight.shape[-2] == k
        and k in (1, 3)
        and padding == k // 2
        and x.dtype in DTYPES
        and (noise is None or noise.ndim <= 4)
        and offsets_fit(x, noise)
        and max(weight.shape[0], weight.shape[1]) * x.shape[2] * x.shape[3] <= INT32_LIMIT
    )
