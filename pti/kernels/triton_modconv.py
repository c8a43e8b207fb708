"""Modulated convolution as one Triton implicit-GEMM kernel: no per-sample weights are materialized.

    y[n, o, p] = d[n, o] * sum_{i, tap} W[o, i, tap] * (s[n, i] * x[n, i, p + tap]) (+ noise)

for the stride-1 layers of StyleGAN2 (3x3 with padding 1, and the 1x1 toRGB), correlation as
`F.conv2d` (flip_weight=True). The GEMM runs over M = output pixels, N = output channels and
K = input channels x taps: each program loads a tile of the modulated input (scaled by the styles as it
is loaded, zero outside the image) and a tile of the shared weight, accumulates in float32, and applies
the demodulation coefficients and the noise in its epilogue. The coefficients d = rsqrt(s^2 @ Wsq^T + 1e-8),
Wsq[o, i] = sum over taps of W[o, i, tap]^2, are an [N, O] matrix computed beside it (the same sum as the
reference's, in another order).

Backward: `ModulatedConv2d` pairs this forward with the reference's own autograd (it re-runs the
reference forward under autograd and differentiates that), so gradients for the input, the weight, the
styles and the noise are the reference's, by construction. The up-sampling layers keep the reference.

It runs on CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before
this module is imported), which is how CI checks it. Registered as implementation "triton" of
`modulated_conv2d` for CUDA inputs it supports (`pti.kernels.register`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pti.kernels import ref

BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 16


@triton.jit
def _modconv_kernel(
    x_ptr, w_ptr, s_ptr, d_ptr, noise_ptr, y_ptr,
    C_IN, C_OUT, H, W,
    sxn, sxc, sxh, sxw,            # x strides
    swo, swi, swh, sww,            # weight strides
    ssn, ssi,                      # styles strides
    sdn, sdo,                      # dcoefs strides
    snn, snc, snh, snw,            # noise strides (0 where broadcast)
    syn, syc, syh, syw,            # y strides
    KSIZE: tl.constexpr, PAD: tl.constexpr, DEMOD: tl.constexpr, HAS_NOISE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)       # a tile of output pixels
    pid_n = tl.program_id(1)       # a tile of output channels
    n = tl.program_id(2)           # the sample
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
            a = tl.load(x_ptr + n * sxn + offs_k[None, :] * sxc + ih[:, None] * sxh + iw[:, None] * sxw,
                        mask=pix_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            s = tl.load(s_ptr + n * ssn + offs_k * ssi, mask=k_ok, other=0.0).to(tl.float32)
            a = a * s[None, :]                       # modulate the input as it is loaded
            b = tl.load(w_ptr + offs_n[None, :] * swo + offs_k[:, None] * swi + kh * swh + kw * sww,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(a, b, input_precision="ieee")
    if DEMOD:
        d = tl.load(d_ptr + n * sdn + offs_n * sdo, mask=n_ok, other=0.0)
        acc = acc * d[None, :]
    if HAS_NOISE:
        nz = tl.load(noise_ptr + n * snn + offs_n[None, :] * snc + oh[:, None] * snh + ow[:, None] * snw,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc = acc + nz
    tl.store(y_ptr + n * syn + offs_n[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def demod_coefficients(weight: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    """[N, O] = rsqrt(s^2 @ Wsq^T + 1e-8), in float32: the reference's per-output sum of squared modulated weights."""
    wsq = weight.float().square().sum(dim=[2, 3])                   # [O, I]
    return (styles.float().square() @ wsq.t() + 1e-8).rsqrt()


def forward(x, weight, styles, noise=None, demodulate=True):
    """The kernel's forward (no autograd). x [N, I, H, W], weight [O, I, k, k], styles [N, I], noise broadcastable to [N, O, H, W]."""
    n, c_in, h, w = x.shape
    c_out, _, k, _ = weight.shape
    # The reference's fp16 overflow guard scales weight and styles by their max-norms; with demodulation the
    # scale cancels, so float32 accumulation needs no guard. Without demodulation (toRGB) nothing is scaled.
    d = demod_coefficients(weight, styles) if demodulate else x.new_empty([1, 1], dtype=torch.float32)
    y = torch.empty([n, c_out, h, w], device=x.device, dtype=x.dtype)
    if noise is not None:
        noise = noise.to(x.dtype).expand(n, c_out, h, w)  # [H, W] (constant) or [N, 1, H, W] (random)
    nz = noise if noise is not None else y
    grid = (triton.cdiv(h * w, BLOCK_M), triton.cdiv(c_out, BLOCK_N), n)
    _modconv_kernel[grid](
        x, weight, styles, d, nz, y,
        c_in, c_out, h, w,
        *x.stride(), *weight.stride(), *styles.stride(), *d.stride(), *nz.stride(), *y.stride(),
        KSIZE=k, PAD=k // 2, DEMOD=demodulate, HAS_NOISE=noise is not None,
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
    )
    return y


class ModulatedConv2d(torch.autograd.Function):
    """Triton forward, the reference's backward (its autograd, re-run): gradients equal the reference's."""

    @staticmethod
    def forward(ctx, x, weight, styles, noise, demodulate):
        ctx.demodulate = demodulate
        ctx.save_for_backward(x, weight, styles, noise)
        return forward(x, weight, styles, noise, demodulate)

    @staticmethod
    def backward(ctx, grad):
        x, weight, styles, noise = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) for t, need in zip((x, weight, styles), ctx.needs_input_grad[:3])]
        nz = None if noise is None else noise.detach().requires_grad_(ctx.needs_input_grad[3])
        with torch.enable_grad():
            y = ref.modulated_conv2d(*inputs, noise=nz, padding=weight.shape[-1] // 2, demodulate=ctx.demodulate, fused_modconv=False)
        wrt = [t for t in (*inputs, nz) if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wrt, grad)) if wrt else iter(())
        out = [next(grads) if t is not None and t.requires_grad else None for t in (*inputs, nz)]
        return (*out, None)


def modulated_conv2d(x, weight, styles, noise=None, up=1, padding=0, resample_filter=None, demodulate=True,
                     flip_weight=True, fused_modconv=True):
    """Same signature and result as `ref.modulated_conv2d`, for the inputs `supports` accepts."""
    return ModulatedConv2d.apply(x, weight, styles, noise, demodulate)


def supports(x, weight, styles, noise=None, up=1, padding=0, resample_filter=None, demodulate=True,
             flip_weight=True, fused_modconv=True) -> bool:
    """Stride-1 3x3 (padding 1) or 1x1 (padding 0) correlation on 4-D inputs; noise per pixel or broadcast."""
    k = weight.shape[-1]
    return (up == 1 and flip_weight and x.ndim == 4 and weight.shape[-2] == k and k in (1, 3) and padding == k // 2
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and (noise is None or noise.ndim <= 4))
