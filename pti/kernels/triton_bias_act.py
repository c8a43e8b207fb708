"""The layer epilogue as one Triton pass each way: bias, activation, gain and clamp.

    y = clamp(act(x + b) * gain, -clamp, clamp)

for the activations StyleGAN2 uses (linear, relu, lrelu). Forward reads x once and writes y once, in
float32 arithmetic with one rounding to x's dtype at the end (the reference rounds after each of its
three or four ops in fp16/bf16). Backward recomputes v = x + b from the saved input and writes

    dx = g * gain * act'(v) * [-clamp <= act(v) * gain <= clamp]

with PyTorch's conventions at the kinks (relu' (0) = 0, lrelu' (0) = alpha, the clamp passes its
bounds), and db = dx summed over every dimension but `dim`. Its own backward (second order) is the
reference's autograd, re-run: the recipe never needs it, but nothing breaks if someone asks.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 before this
module is imported), which is how CI checks it. Registered as implementation "triton" of `bias_act`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pti.kernels import ref
from pti.kernels._triton_common import ACTS, DTYPES, act_and_mask, reference_grads, resolve, round_to

BLOCK = 1024


@triton.jit
def _biased(x_ptr, b_ptr, offs, ok, C, INNER, HAS_BIAS: tl.constexpr):
    """x + b in float32 at flat offsets of a contiguous x, the bias indexed by the channel (offs // INNER) % C."""
    v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v = v + tl.load(b_ptr + (offs // INNER) % C, mask=ok, other=0.0).to(tl.float32)
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
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    v = _biased(x_ptr, b_ptr, offs, ok, C, INNER, HAS_BIAS)
    y, _, _ = act_and_mask(v, alpha, gain, clamp, ACT, CLAMP)
    tl.store(y_ptr + offs, round_to(y, y_ptr.dtype.element_ty), mask=ok)


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
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    v = _biased(x_ptr, b_ptr, offs, ok, C, INNER, HAS_BIAS)
    _, da, keep = act_and_mask(v, alpha, gain, clamp, ACT, CLAMP)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dx = tl.where(keep, g * gain * da, 0.0)
    tl.store(dx_ptr + offs, round_to(dx, dx_ptr.dtype.element_ty), mask=ok)


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
        return _launch(_forward_kernel, torch.empty_like(x), x, x if b is None else b, params=p)

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
    return act in ACTS and x.dtype in DTYPES and 0 <= dim < x.ndim and (b is None or b.device == x.device)
