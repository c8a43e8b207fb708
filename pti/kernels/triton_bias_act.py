"""The layer epilogue as one Triton pass each way: bias, activation, gain and clamp.

    y = clamp(act(x + b) * gain, -clamp, clamp)

for the activations StyleGAN2 uses (linear, relu, lrelu). Forward reads x once and writes y once, in
float32 arithmetic with one rounding to x's dtype at the end (the reference rounds after each of its
three or four ops in fp16/bf16). Backward recomputes v = x + b from the saved input and writes

    dx = g * gain * act'(v) * [-clamp <= act(v) * gain <= clamp]

with PyTorch's conventions at the kinks (relu' (0) = 0, lrelu' (0) = alpha, the clamp passes its
bounds), and db = dx summed over every dimension but `dim`. Its own backward (second order) is the
reference's autograd, re-run: the recipe never needs it, but nothing breaks if someone asks.

Precision: no GEMM here, nothing autocast touches (the reference is elementwise too), so every
precision computes the same: float32 arithmetic, the output in the dtype the reference's `x + b`
promotes to. Offsets: each program's first element is int64 (`_triton_common.flat_block`), so a
tensor past 2^31 elements does not wrap; only one channel's plane must stay under 2^31 (`supports`).

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 before this
module is imported), which is how CI checks it. Registered as implementation "triton" of `bias_act`.
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
    flat_block,
    reference_grads,
    resolve,
    round_to,
)

BLOCK = 1024


@triton.jit
def _biased(x_ptr, b_ptr, ok, chan, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """x + b in float32 for a block of a contiguous x (x_ptr at its first element), the bias by channel."""
    v = tl.load(x_ptr + tl.arange(0, BLOCK), mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v = v + tl.load(b_ptr + chan, mask=ok, other=0.0).to(tl.float32)
    return v


@triton.jit
def _forward_kernel(
    x_ptr,
    b_ptr,
    y_ptr,
    numel,
    C,
    INNER,
    alpha,
    gain,
    clamp,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, chan = flat_block(tl.program_id(0), INNER, C, BLOCK)  # int64 start: numel may pass 2^31
    ok = tl.arange(0, BLOCK) < numel - start
    v = _biased(x_ptr + start, b_ptr, ok, chan, HAS_BIAS, BLOCK)
    y, _, _ = act_and_mask(v, alpha, gain, clamp, ACT, CLAMP)
    tl.store(y_ptr + start + tl.arange(0, BLOCK), round_to(y, y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_kernel(
    g_ptr,
    x_ptr,
    b_ptr,
    dx_ptr,
    numel,
    C,
    INNER,
    alpha,
    gain,
    clamp,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start, chan = flat_block(tl.program_id(0), INNER, C, BLOCK)
    ok = tl.arange(0, BLOCK) < numel - start
    v = _biased(x_ptr + start, b_ptr, ok, chan, HAS_BIAS, BLOCK)
    _, da, keep = act_and_mask(v, alpha, gain, clamp, ACT, CLAMP)
    g = tl.load(g_ptr + start + tl.arange(0, BLOCK), mask=ok, other=0.0).to(tl.float32)
    dx = tl.where(keep, g * gain * da, 0.0)
    tl.store(dx_ptr + start + tl.arange(0, BLOCK), round_to(dx, dx_ptr.dtype.element_ty), mask=ok)


def _params(x, b, dim, act, alpha, gain, clamp):
    act, alpha, gain, clamp = resolve(act, alpha, gain, clamp)
    inner = 1
    for s in x.shape[dim + 1 :]:
        inner *= int(s)
    return dict(
        C=int(x.shape[dim]),
        INNER=inner,
        alpha=alpha,
        gain=gain,
        clamp=0.0 if clamp is None else clamp,
        HAS_BIAS=b is not None,
        ACT=ACTS[act],
        CLAMP=clamp is not None,
        BLOCK=BLOCK,
    )


def _launch(kernel, out, *tensors, params):
    numel = out.numel()
    if numel:
        kernel[(triton.cdiv(numel, BLOCK),)](*tensors, out, numel, **params)
    return out


class BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, dim, act, alpha, gain, clamp):
        x = x.contiguous()
        b = None if b is None else b.contiguous()
        p = _params(x, b, dim, act, alpha, gain, clamp)
        ctx.save_for_backward(x, b)
        ctx.args = (dim, act, alpha, gain, clamp)
        out = torch.empty_like(x, dtype=x.dtype if b is None else torch.promote_types(x.dtype, b.dtype))
        return _launch(_forward_kernel, out, x, x if b is None else b, params=p)

    @staticmethod
    def backward(ctx, g):
        x, b = ctx.saved_tensors
        dim = ctx.args[0]
        if torch.is_grad_enabled():  # create_graph=True
            dx, db = reference_grads(
                lambda x_, b_: ref.bias_act(x_, b_, *ctx.args), (x, b), ctx.needs_input_grad[:2], g
            )
            return dx, db, None, None, None, None, None
        p = _params(x, b, *ctx.args)
        dx = _launch(_backward_kernel, torch.empty_like(x), g.contiguous(), x, x if b is None else b, params=p)
        db = None
        if b is not None and ctx.needs_input_grad[1]:
            db = dx.float().sum(dim=[i for i in range(dx.ndim) if i != dim]).to(b.dtype)
        return dx if ctx.needs_input_grad[0] else None, db, None, None, None, None, None


def bias_act(x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None):
    """Same signature and result as `ref.bias_act` (to one rounding), for the inputs `supports` accepts."""
    if b is not None and (b.ndim != 1 or b.shape[0] != x.shape[dim]):
        raise ValueError(f"bias of shape {tuple(b.shape)} does not match dim {dim} of {tuple(x.shape)}")
    return BiasAct.apply(x, b, dim, act, alpha, gain, clamp)


def supports(x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None) -> bool:
    """A known activation on a kernel dtype; one channel's plane (the dimensions after `dim`) under 2^31 elements."""
    if not (
        act in ACTS
        and x.dtype in DTYPES
        and 0 <= dim < x.ndim
        and (b is None or (b.device == x.device and b.dtype in DTYPES))
    ):
        return False
    inner = 1
    for s in x.shape[dim + 1 :]:
        inner *= int(s)
    return inner + BLOCK <= INT32_LIMIT
