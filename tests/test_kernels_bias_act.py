"""The Triton layer epilogue (bias, activation, gain, clamp) against the reference, forward and backward.

Truth is the reference evaluated in float64 on the same (already rounded) inputs. The kernel works in
float32 and rounds once to the input dtype, so with v = x + b:

    forward   |y - y64|   <= 3 eps32 * gain * (|x| + |b|) + eps(dtype) * |y64|
              (the add, the alpha product and the gain product in float32; one final rounding)
    input     |dx - dx64| <= (2 eps32 + eps(dtype)) * |dx64|
              (g * gain * act' in float32; one final rounding)
    bias      |db - db64| <= (eps(dtype) + (L + 3) eps32) * sum |dx64| + eps(dtype) * |db64|
              (dx's own error, then a float32 sum of L = numel / C terms, then one rounding)

The derivative jumps at the kinks (v = 0, |act(v) * gain| = clamp). An element within the kernel's
float32 error (the forward bound before its final rounding) of a kink may legitimately take either
side; those (3 of about 9000 elements with these seeded inputs) are left out of the gradient
comparison, counted and capped.

Every precision computes the same here: the op is elementwise, with no GEMM for TF32 or bf16 operands to
change (test_kernels_precision.py checks its output dtype under bf16 autocast and its int64 offsets).
"""

from __future__ import annotations

import pytest
import torch

from tritonenv import DEVICE, EPS32, fp32_unless_asked  # noqa: E402, F401  (first: sets TRITON_INTERPRET on CPU)

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' on Linux)")

from pti import kernels  # noqa: E402
from pti.kernels import ref  # noqa: E402
from pti.kernels import triton_bias_act as T  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [  # (shape, act, gain, clamp): the generator's uses and the odd ones
    ((2, 24, 5, 7), "lrelu", 2**0.5, 256.0 * 0.01),  # a synthesis layer, conv_clamp scaled so it bites
    ((2, 24, 5, 7), "lrelu", 2**0.5, None),
    ((3, 40), "lrelu", None, None),  # a mapping layer (2-D, default gain)
    ((2, 3, 4, 4), "linear", None, 0.5),  # toRGB: bias and clamp only
    ((2, 10, 3, 3), "relu", 1.5, None),
]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)  # fixed inputs on every machine
    x = torch.randn(shape, generator=g).to(dtype)
    b = (torch.randn(shape[1], generator=g) * 0.5).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    return x.to(DEVICE), b.to(DEVICE), grad.to(DEVICE)


def _truth(x, b, grad, act, gain, clamp):
    leaves = [x.detach().cpu().double().requires_grad_(), b.detach().cpu().double().requires_grad_()]
    y = ref.bias_act(*leaves, act=act, gain=gain, clamp=clamp)
    dx, db = torch.autograd.grad(y, leaves, grad.cpu().double())
    return y.detach(), dx, db


def _check(x, b, grad, act, gain, clamp, dtype, forward=None, backward=None):
    """Errors of the kernel (or of `forward`/`backward` overrides) against the bounds; returns the worst ratios."""
    xl, bl = x.clone().requires_grad_(), b.clone().requires_grad_()
    y = (forward or kernels.bias_act)(xl, bl, act=act, gain=gain, clamp=clamp, impl="triton")
    dx, db = backward(x, b, grad) if backward else torch.autograd.grad(y, [xl, bl], grad)
    y64, dx64, db64 = _truth(x, b, grad, act, gain, clamp)
    g = float(gain if gain is not None else ref.activation_gain(act))
    x64, b64 = x.cpu().double(), b.cpu().double().reshape([-1 if i == 1 else 1 for i in range(x.ndim)])
    eps = torch.finfo(dtype).eps
    tol_f32 = 3 * EPS32 * g * (x64.abs() + b64.abs())  # the kernel decides the kinks before its final rounding
    tol_y = tol_f32 + eps * y64.abs()
    v64 = x64 + b64
    near_kink = v64.abs() <= tol_f32 if act != "linear" else torch.zeros_like(v64, dtype=torch.bool)
    if clamp is not None:
        near_kink |= (ref.bias_act(x64, b64.flatten(), act=act, gain=gain).abs() - clamp).abs() <= tol_f32
    tol_dx = (2 * EPS32 + eps) * dx64.abs()
    L = x.numel() // x.shape[1]
    sum_abs = dx64.abs().sum(dim=[i for i in range(x.ndim) if i != 1])
    tol_db = (eps + (L + 3) * EPS32) * sum_abs + eps * db64.abs()
    err_y = (y.detach().cpu().double() - y64).abs()
    far = ~near_kink
    err_dx = (dx.cpu().double() - dx64).abs()[far]
    err_db = (db.cpu().double() - db64).abs()
    if near_kink.any():  # db sums over them too: either side of a kink differs by at most |g| * gain
        tol_db = tol_db + (grad.cpu().double().abs() * g * near_kink).sum(dim=[i for i in range(x.ndim) if i != 1])
    return (err_y <= tol_y).all(), (err_dx <= tol_dx[far]).all(), (err_db <= tol_db).all(), int(near_kink.sum()), y


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}-{'x'.join(map(str, c[0]))}-clamp{c[3]}")
def test_forward_and_backward_within_the_bounds(case, dtype):
    shape, act, gain, clamp = case
    x, b, grad = _inputs(shape, dtype)
    ok_y, ok_dx, ok_db, near, y = _check(x, b, grad, act, gain, clamp, dtype)
    assert kernels.chosen()["bias_act"] == "triton" and y.dtype == dtype and y.shape == x.shape
    assert ok_y and ok_dx and ok_db, (ok_y, ok_dx, ok_db)
    assert near <= max(2, x.numel() // 100), near


def test_clamp_really_bites_in_the_clamped_case():
    x, b, _ = _inputs(CASES[0][0], torch.float32)
    y = kernels.bias_act(x, b, act="lrelu", gain=2**0.5, clamp=2.56, impl="triton")
    assert (y.abs() == 2.56).float().mean() > 0.05  # so the mask in the backward is exercised


def _wrong_forward(alpha):
    def run(x, b, act, gain, clamp, impl):
        return T.bias_act(x, b, act=act, alpha=alpha, gain=gain, clamp=clamp)

    return run


def _backward_without_clamp_mask(x, b, grad):
    p = T._params(x, b, 1, "lrelu", None, 2**0.5, None)  # the mask forgotten
    dx = T._launch(T._backward_kernel, torch.empty_like(x), grad.contiguous(), x.contiguous(), b, params=p)
    return dx, dx.float().sum(dim=[0, 2, 3]).to(b.dtype)


def test_deliberately_wrong_kernels_are_caught():
    shape, act, gain, clamp = CASES[0]
    x, b, grad = _inputs(shape, torch.float32)
    ok_y, *_ = _check(x, b, grad, act, gain, clamp, torch.float32, forward=_wrong_forward(0.21))  # alpha 0.21
    assert not ok_y
    _, ok_dx, ok_db, _, _ = _check(x, b, grad, act, gain, clamp, torch.float32, backward=_backward_without_clamp_mask)
    assert not ok_dx and not ok_db


def test_second_order_gradients_are_the_references():
    """create_graph=True (a gradient penalty) differentiates the reference's graph: the same numbers. The
    activations are piecewise linear, so what is nonzero is the derivative through the incoming gradient."""
    x, b, grad = _inputs((2, 6, 3, 3), torch.float32)
    outs = []
    for impl in ("triton", "ref"):
        xl, bl, gl = x.clone().requires_grad_(), b.clone().requires_grad_(), grad.clone().requires_grad_()
        y = kernels.bias_act(xl, bl, act="lrelu", gain=1.4, clamp=1.0, impl=impl)
        (gx,) = torch.autograd.grad(y, [xl], gl, create_graph=True)
        outs.append(torch.autograd.grad(gx.square().sum(), [gl, xl, bl], allow_unused=True, materialize_grads=True))
    for a, w in zip(*outs):  # the same autograd graph: the same numbers
        assert torch.equal(a, w)
    assert outs[0][0].abs().max() > 0


def test_unsupported_activations_stay_on_the_reference():
    x, b, _ = _inputs((2, 4, 3, 3), torch.float32)
    kernels.bias_act(x, b, act="tanh", impl="prefer:triton")
    assert kernels.chosen()["bias_act"] == "ref"
    kernels.bias_act(x, b, act="lrelu")
    assert kernels.chosen()["bias_act"] == "ref"  # not in auto until measured faster on a GPU


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's numpy, on 3.4e38
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kernels_round_to_nearest_even_as_torch_does(dtype):
    """Every store rounds float32 to the output dtype like torch's `.to(dtype)`, bit for bit, NaN and
    infinities included. Triton's interpreter truncates to bfloat16 by itself (0.3 -> 0.2988 instead of
    0.3008), which would make the CPU tests check another rounding than the GPU's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 10.0 ** torch.randint(-30, 30, (4096,), generator=g)
    x = torch.cat([x, torch.tensor([0.3, float("inf"), -float("inf"), float("nan"), 3.3895e38, 0.0, -0.0])]).to(DEVICE)
    p = T._params(x[None], None, 1, "linear", None, 1.0, None)  # y = x: only the rounding
    y = T._launch(T._forward_kernel, torch.empty(x.numel(), dtype=dtype, device=DEVICE), x, x, params=p)
    want = x.to(dtype)
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y[~y.isnan()], want[~want.isnan()])
