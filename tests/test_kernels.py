"""The Triton modulated convolution against the reference ops, on CPU under Triton's interpreter.

Forward: compared with the reference computed in float64 from the same (already rounded) inputs, with an
a-priori error bound rather than a tuned tolerance. The kernel accumulates in float32, so per output

    |y - y64| <= (K + I + 4) * eps32 * (S + |y64|) + u_ops * S + 2 * eps(dtype) * (|y64| + |noise|)

where K = I * k * k is the reduction length, S = |d| * sum |W| |s| |x| the sum of the absolute products
(the standard bound for a float32 dot product, gamma_K * S), I + 4 roundings in the demodulation
coefficients (a sum of I squares, a matmul, rsqrt, a product), and one rounding of the output (and of
the noise) to `dtype`. u_ops is what rounding the GEMM's operands adds to each product (`roundings`):
0 for float32 operands ("ieee"); 2^-10 per operand for TF32; for a 16-bit layer s * x (exact in float32)
rounded once, 2^-8 in bfloat16, 2^-11 in float16, and under bf16 autocast the float32 weight rounded as
well. A deliberately wrong variant (the taps flipped) lands far outside it.

Backward: compared with the float64 reference's autograd on the same inputs, with the same kind of
bound, derived per gradient from the operations `triton_modconv.backward` performs: the input gradient
is a float32 reduction over O * k * k (the kernel again), the styles' adds the pixel sum, the weight's is
a reduction over N * H * W; each carries the coefficients' error ((I + 4) eps32, relative) and, with
demodulation, the coefficients' own gradient (a pixel sum of g * (y - noise), where y was rounded to
`dtype`, then products over O and N). Every result is rounded once to its input's dtype; the operand
roundings add their u to each GEMM's abs-sum (the weight gradient's bfloat16 conv also rounds its
output). Two wrong backwards (the demodulation gradient forgotten; the adjoint's taps not flipped) land
outside.

What only a GPU confirms: the 16-bit products here run on the interpreter, which multiplies bfloat16
operands as float32 (`_triton_common.dot_acc`: the same products and float32 accumulation, but not the
MMA's own summation order), and which computes `input_precision="tf32"` as exact float32, so the TF32
bounds (test_kernels_precision.py) are checked on CUDA only.
"""

from __future__ import annotations

import pytest
import torch

from tritonenv import (  # noqa: E402, F401  (first: it sets TRITON_INTERPRET on CPU; the fp32 fixture)
    DEVICE,
    EPS32,
    TF32_U,
    compound,
    fp32_unless_asked,
    unit_roundoff,
)

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' on Linux)")

from pti import kernels  # noqa: E402
from pti.kernels import ref  # noqa: E402
from pti.kernels import triton_modconv as T  # noqa: E402
from pti.kernels import triton_upfirdn  # noqa: E402
from pti.kernels._triton_common import demod_coefficients  # noqa: E402

SHAPES = [  # (batch, in, out, size, kernel)
    (1, 16, 24, 6, 3),
    (3, 33, 40, 5, 3),  # channel counts off the 16/32 tiles: masks
    (2, 48, 3, 8, 1),  # toRGB-like 1x1
]


def _inputs(batch, c_in, c_out, size, k, dtype, noise_kind, seed=0):
    g = torch.Generator().manual_seed(seed)  # fixed inputs on every machine
    x = torch.randn(batch, c_in, size, size, generator=g).to(dtype)
    w = torch.randn(c_out, c_in, k, k, generator=g).to(dtype)
    s = (torch.randn(batch, c_in, generator=g) * 0.5 + 1).to(dtype)
    noise = {
        "none": None,
        "const": torch.randn(size, size, generator=g) * 0.1,
        "random": torch.randn(batch, 1, size, size, generator=g) * 0.1,
    }[noise_kind]
    return x.to(DEVICE), w.to(DEVICE), s.to(DEVICE), (None if noise is None else noise.to(dtype).to(DEVICE))


def roundings(dtype, inputs=None, precision="ieee"):
    """The relative error the operand roundings add to each product of a GEMM, for a layer computing in `dtype`
    on tensors of `inputs` (dtype's; float32 under autocast) with `precision`: "fwd" the forward's (s x, W),
    "bx" the input gradient's (g d, W), "bw" the weight gradient's conv (s x, g d and its output; in float32
    for float16, `_triton_common.torch_dtype`). g d and an autocast s x are formed in float32 first."""
    inputs = inputs or dtype
    if dtype == torch.float32:
        t = compound(TF32_U, TF32_U) if precision == "tf32" else 0.0
        return {"fwd": t, "bx": t, "bw": t}
    u = unit_roundoff(dtype)
    xs = compound(EPS32 if inputs == torch.float32 else 0.0, u)  # 16-bit s * x is exact in float32
    w = u if inputs != dtype else 0.0  # the weight cast to dtype (already in it without autocast)
    gd = compound(EPS32, u)
    bw = compound(xs, gd, u) if dtype == torch.bfloat16 else 0.0
    return {"fwd": compound(xs, w), "bx": compound(gd, w), "bw": bw}


def _bound(x, w, s, noise, demodulate, dtype, u=0.0):
    """The a-priori bound of the module docstring, per output element, in float64 (`u`: the operands' u_ops)."""
    k = w.shape[-1]
    x, w, s = x.cpu(), w.cpu(), s.cpu()
    noise = None if noise is None else noise.cpu()
    x64, w64, s64 = x.double(), w.double(), s.double()
    y64 = ref.modulated_conv2d(
        x64,
        w64,
        s64,
        noise=None if noise is None else noise.double(),
        padding=k // 2,
        demodulate=demodulate,
        fused_modconv=False,
    )
    S = torch.nn.functional.conv2d((x64 * s64[:, :, None, None]).abs(), w64.abs(), padding=k // 2)
    if demodulate:
        d = ((w64[None] * s64[:, None, :, None, None]).square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
        S = S * d[:, :, None, None]
    K, I = w.shape[1] * k * k, w.shape[1]
    nz = 0 if noise is None else noise.double().abs()
    tol = (K + I + 4) * EPS32 * (S + y64.abs()) + u * S + 2 * torch.finfo(dtype).eps * (y64.abs() + nz)
    return y64, tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("noise_kind", ["none", "const", "random"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_within_the_float32_bound(shape, noise_kind, dtype):
    batch, c_in, c_out, size, k = shape
    demodulate = k == 3  # the 3x3 layers demodulate, toRGB does not
    x, w, s, noise = _inputs(*shape, dtype, noise_kind)
    y = kernels.modulated_conv2d(x, w, s, noise=noise, padding=k // 2, demodulate=demodulate, impl="triton")
    assert kernels.chosen()["modulated_conv2d"] == "triton"
    assert y.dtype == dtype and y.shape == (batch, c_out, size, size)
    y64, tol = _bound(x, w, s, noise, demodulate, dtype, roundings(dtype)["fwd"])
    err = (y.cpu().double() - y64).abs()
    assert (err <= tol).all(), f"max error {err.max():.3g}, bound there {tol.flatten()[err.argmax()]:.3g}"


def test_a_wrong_kernel_is_outside_the_bound():
    """The taps flipped (convolution instead of correlation), as a kernel bug would: caught."""
    x, w, s, noise = _inputs(2, 16, 24, 6, 3, torch.float32, "const")
    y = T.forward(x, w.flip([2, 3]).contiguous(), s, noise, demodulate=True)
    y64, tol = _bound(x, w, s, noise, True, torch.float32)
    assert ((y.cpu().double() - y64).abs() > tol).any()


def _grad_bounds(x, w, s, noise, grad, demodulate, dtype, bias=None, u=None):
    """Float64 truth of the four gradients and the a-priori bounds of the module docstring, per element.
    With `bias` (the fused layer), the output the backward works from also carried the bias. `dtype` is
    the output's (y, which the backward reads), `u` the operand roundings (`roundings`, none by default)."""
    u = u or {"fwd": 0.0, "bx": 0.0, "bw": 0.0}
    k = w.shape[-1]
    O, I = w.shape[0], w.shape[1]
    N, _, H, W_ = x.shape
    x64, w64, s64, g64 = (t.detach().cpu().double() for t in (x, w, s, grad))
    n64 = None if noise is None else noise.detach().cpu().double()
    leaves = [t.clone().requires_grad_() for t in (x64, w64, s64)] + (
        [] if n64 is None else [n64.clone().requires_grad_()]
    )
    y64 = ref.modulated_conv2d(
        *leaves[:3],
        noise=leaves[3] if n64 is not None else None,
        padding=k // 2,
        demodulate=demodulate,
        fused_modconv=False,
    )
    truth = list(torch.autograd.grad(y64, leaves, g64)) + ([None] if n64 is None else [])
    conv, conv_t = torch.nn.functional.conv2d, torch.nn.functional.conv_transpose2d
    A, Sa, Wa, G = x64.abs(), s64.abs(), w64.abs(), g64.abs()
    d = (
        ((w64[None] * s64[:, None, :, None, None]).square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
        if demodulate
        else torch.ones(N, O, dtype=torch.float64)
    )
    GD = G * d[:, :, None, None]
    e_d = (I + 4) * EPS32 if demodulate else 0.0  # relative error of the coefficients
    eps = torch.finfo(dtype).eps
    back = conv_t(GD, Wa, padding=k // 2)  # |conv^T(d g, W)|, [N, I, H, W]
    tol_x = (O * k * k + 3) * EPS32 * Sa[:, :, None, None] * back + (e_d + u["bx"]) * Sa[:, :, None, None] * back
    tol_s = (O * k * k + H * W_ + 3) * EPS32 * (A * back).sum(dim=[2, 3]) + (e_d + u["bx"]) * (A * back).sum(dim=[2, 3])
    S_w = torch.nn.grad.conv2d_weight(A * Sa[:, :, None, None], w.shape, GD, padding=k // 2)
    tol_w = (N * H * W_ + 3) * EPS32 * S_w + (e_d + u["bw"]) * S_w
    if demodulate:  # the coefficients' own gradient: dd = sum_p g (y - noise) / d, dq = -d^3 / 2 dd
        Z = conv(A * Sa[:, :, None, None], Wa, padding=k // 2)  # |z| bound
        Y = (
            Z * d[:, :, None, None]
            + (0 if n64 is None else n64.abs())
            + (0 if bias is None else bias.cpu().double().abs()[:, None, None])
        )
        M_dd = (G * Z).sum(dim=[2, 3])
        E_dd = (H * W_ + I * k * k + 3) * EPS32 * M_dd + (e_d + u["fwd"]) * M_dd + eps * (G * Y).sum(dim=[2, 3]) / d
        E_q = 0.5 * d.pow(3) * (E_dd + (3 * e_d + 3 * EPS32) * M_dd)
        M_q = 0.5 * d.pow(3) * M_dd
        Wsq = w64.square().sum(dim=[2, 3])
        tol_s = tol_s + 2 * Sa * (E_q @ Wsq + (O + k * k + 3) * EPS32 * (M_q @ Wsq))
        tol_w = tol_w + 2 * Wa * (E_q.t() @ s64.square() + (N + 3) * EPS32 * (M_q.t() @ s64.square()))[:, :, None, None]
    tols = [tol_x, tol_w, tol_s]
    if n64 is not None:
        tols.append((G.numel() // n64.numel() + 1) * EPS32 * G.sum_to_size(n64.shape))
    else:
        tols.append(None)
    eps_in = torch.finfo(x.dtype).eps  # each gradient rounded once to its input's dtype
    return truth, [None if t is None else t + eps_in * tr.abs() for t, tr in zip(tols, truth)]


def _gradients(x, w, s, noise, grad, demodulate):
    leaves = [t.clone().requires_grad_() for t in (x, w, s)] + (
        [] if noise is None else [noise.clone().requires_grad_()]
    )
    y = kernels.modulated_conv2d(
        *leaves[:3],
        noise=leaves[3] if noise is not None else None,
        padding=w.shape[-1] // 2,
        demodulate=demodulate,
        impl="triton",
    )
    return list(torch.autograd.grad(y, leaves, grad)) + ([None] if noise is None else [])


def _outside(got, truth, tols):
    """Names of the gradients outside their bound, with the worst error / bound ratio."""
    bad = {}
    for name, a, t, tol in zip(("x", "weight", "styles", "noise"), got, truth, tols):
        if a is None:
            continue
        ratio = ((a.detach().cpu().double() - t).abs() / tol).max().item()
        if ratio > 1:
            bad[name] = round(ratio, 2)
    return bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("noise_kind", ["none", "const", "random"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_within_the_float32_bound(shape, noise_kind, dtype):
    batch, c_in, c_out, size, k = shape
    demodulate = k == 3
    x, w, s, noise = _inputs(*shape, dtype, noise_kind, seed=1)
    grad = torch.randn(batch, c_out, size, size, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    got = _gradients(x, w, s, noise, grad, demodulate)
    assert [a is None for a in got] == [False, False, False, noise is None]
    assert all(a.dtype == t.dtype for a, t in zip(got, (x, w, s, noise)) if a is not None)
    truth, tols = _grad_bounds(x, w, s, noise, grad, demodulate, dtype, u=roundings(dtype))
    assert _outside(got, truth, tols) == {}


def test_wrong_backwards_are_outside_the_bound(monkeypatch):
    """A forgotten demodulation gradient, and an input gradient with the taps not flipped: both caught."""
    x, w, s, noise = _inputs(2, 16, 24, 6, 3, torch.float32, "random", seed=1)
    grad = torch.randn(2, 24, 6, 6, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    truth, tols = _grad_bounds(x, w, s, noise, grad, True, torch.float32)
    right = T.backward

    def no_demod_gradient(grad, x, weight, styles, noise, y, demodulate, needs, **compute):
        dx, _, _, dn = right(grad, x, weight, styles, noise, y, demodulate, needs, **compute)
        dw = torch.nn.grad.conv2d_weight(
            x * styles[:, :, None, None],
            weight.shape,
            grad * demod_coefficients(weight, styles)[:, :, None, None],
            padding=1,
        )
        dxs = T._launch(
            grad,
            weight.transpose(0, 1).flip([2, 3]).contiguous(),
            demod_coefficients(weight, styles),
            out_dtype=torch.float32,
        )
        return dx, dw, (dxs * x).sum(dim=[2, 3]), dn

    monkeypatch.setattr(T, "backward", no_demod_gradient)
    assert set(_outside(_gradients(x, w, s, noise, grad, True), truth, tols)) == {"weight", "styles"}

    real_launch = T._launch

    def unflipped(x_, weight, *args, **kwargs):  # the adjoint without its flip
        return real_launch(x_, weight.flip([2, 3]).contiguous() if weight.shape[0] == 16 else weight, *args, **kwargs)

    monkeypatch.setattr(T, "backward", right)
    monkeypatch.setattr(T, "_launch", unflipped)
    assert "x" in _outside(_gradients(x, w, s, noise, grad, True), truth, tols)


def test_second_order_gradients_are_the_references():
    """create_graph=True differentiates the reference's graph: the same numbers as the reference's."""
    x, w, s, noise = _inputs(2, 16, 8, 5, 3, torch.float32, "const", seed=3)
    c = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(4)).to(DEVICE)  # a fixed incoming gradient
    outs = []
    for impl in ("triton", "ref"):
        xl, wl, sl = x.clone().requires_grad_(), w.clone().requires_grad_(), s.clone().requires_grad_()
        y = kernels.modulated_conv2d(xl, wl, sl, noise=noise, padding=1, fused_modconv=False, impl=impl)
        (gx,) = torch.autograd.grad((y * c).sum(), [xl], create_graph=True)  # linear in x: depends on W and s
        outs.append(torch.autograd.grad(gx.square().sum(), [wl, sl]))
    for a, b in zip(*outs):
        assert torch.equal(a, b) and a.abs().max() > 0


def test_not_in_auto_until_measured_and_unsupported_inputs_refused():
    x, w, s, _ = _inputs(1, 16, 8, 6, 3, torch.float32, "none")
    kernels.modulated_conv2d(x, w, s, padding=1)
    assert kernels.chosen()["modulated_conv2d"] == "ref"  # auto: the reference
    assert "triton" in kernels.available("modulated_conv2d")
    with pytest.raises(ValueError, match="cannot run these inputs"):  # the up-sampling layers stay on the reference
        kernels.modulated_conv2d(
            x,
            w,
            s,
            up=2,
            padding=1,
            resample_filter=kernels.setup_filter([1, 3, 3, 1]),
            flip_weight=False,
            impl="triton",
        )


LAYERS = [  # (shape, act, gain, clamp): a synthesis layer (conv_clamp scaled so that it bites) and toRGB
    ((2, 16, 24, 6, 3), "lrelu", 2**0.5, 1.0),
    ((2, 48, 3, 8, 1), "linear", 1.0, 0.3),
]


def _layer_case(shape, act, gain, clamp, dtype, noise_kind="random"):
    """Inputs, the float64 truth of the fused layer, its forward bound, and the incoming gradient with the
    elements whose activation input lies within the forward bound of a kink set to zero (either side of a
    kink is right there, and the gradient cannot tell which: no incoming gradient, no ambiguity). The
    backward reads the clamp from the stored output, so that kink is one rounding to `dtype` wide."""
    batch, c_in, c_out, size, k = shape
    x, w, s, noise = _inputs(*shape, dtype, noise_kind, seed=5)
    gen = torch.Generator().manual_seed(6)
    b = (torch.randn(c_out, generator=gen) * 0.2).to(dtype).to(DEVICE)
    g = torch.randn(batch, c_out, size, size, generator=gen).to(dtype).to(DEVICE)
    z64, tol_z = _bound(x, w, s, noise, k == 3, torch.float32, roundings(dtype)["fwd"])  # the fused kernel: z unrounded
    v64 = z64 + b.cpu().double()[:, None, None]
    tol_v = tol_z + EPS32 * v64.abs()
    alpha = 0.2 if act == "lrelu" else 1.0
    a64 = ref.bias_act(v64, act=act, gain=gain)
    near = (v64.abs() <= tol_v) if act != "linear" else torch.zeros_like(v64, dtype=torch.bool)
    # the backward sees the clamp in the stored y: a kink as wide as one rounding to dtype there
    near |= (a64.abs() - clamp).abs() <= gain * tol_v + 3 * EPS32 * a64.abs() + torch.finfo(dtype).eps * clamp
    g = g * (~near).to(DEVICE)
    y64 = ref.bias_act(v64, act=act, gain=gain, clamp=clamp)
    tol_y = gain * tol_v + 3 * EPS32 * a64.abs() + torch.finfo(dtype).eps * y64.abs()
    v_leaf = v64.clone().requires_grad_()
    (dv64,) = torch.autograd.grad(ref.bias_act(v_leaf, act=act, gain=gain, clamp=clamp), [v_leaf], g.cpu().double())
    return (x, w, s, noise, b, g), y64, tol_y, dv64, int(near.sum()), alpha


# At most 1 / NEAR_KINK of the elements may be left out of a gradient comparison as within the forward bound of a
# kink: bfloat16's operand rounding (2^-8 of the abs-sum) makes those bands wider, about 3 % of the elements here.
NEAR_KINK = {torch.float32: 100, torch.float16: 100, torch.bfloat16: 10}


def _fused_gradients(x, w, s, noise, b, g, act, gain, clamp):
    leaves = [t.clone().requires_grad_() for t in (x, w, s, noise, b)]
    y = kernels.modulated_conv2d_act(
        *leaves[:3],
        noise=leaves[3],
        padding=w.shape[-1] // 2,
        demodulate=w.shape[-1] == 3,
        bias=leaves[4],
        act=act,
        gain=gain,
        clamp=clamp,
        impl="triton",
    )
    return y, torch.autograd.grad(y, leaves, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layer", LAYERS, ids=["conv-lrelu", "torgb"])
def test_fused_layer_within_the_bounds(layer, dtype):
    """One kernel for modulated conv + noise + bias + activation + gain + clamp, its backward from y alone:
    forward within the modulated conv's bound carried through the (1-Lipschitz) epilogue plus its three
    float32 operations and one rounding; gradients within the backward bounds above, driven by the
    activation's exact gradient, with the bias's pixel sum bounded like the noise's."""
    shape, act, gain, clamp = layer
    (x, w, s, noise, b, g), y64, tol_y, dv64, near, _ = _layer_case(shape, act, gain, clamp, dtype)
    assert near <= y64.numel() // NEAR_KINK[dtype], near  # the gradients are compared on nearly all elements
    y, got = _fused_gradients(x, w, s, noise, b, g, act, gain, clamp)
    assert kernels.chosen()["modulated_conv2d_act"] == "triton" and y.dtype == dtype
    assert (y.detach().cpu().double() - y64).abs().le(tol_y).all()
    assert (y.detach().abs() == torch.tensor(clamp).to(dtype)).any()  # the clamp bites: its mask is exercised
    truth, tols = _grad_bounds(x, w, s, noise, dv64, shape[4] == 3, dtype, bias=b, u=roundings(dtype))
    assert _outside(got[:4], truth, tols) == {}
    L = dv64.numel() // dv64.shape[1]
    db64 = dv64.sum(dim=[0, 2, 3])
    tol_b = (L + 3) * EPS32 * dv64.abs().sum(dim=[0, 2, 3]) + torch.finfo(dtype).eps * db64.abs()
    assert (got[4].cpu().double() - db64).abs().le(tol_b).all()


def test_a_wrong_fused_backward_is_outside_the_bound(monkeypatch):
    """The activation input recovered from y without undoing lrelu's slope: the demodulation gradient
    (weight and styles) goes wrong, and the bounds say so."""
    shape, act, gain, clamp = LAYERS[0]
    (x, w, s, noise, b, g), _, _, dv64, _, _ = _layer_case(shape, act, gain, clamp, torch.float32)
    truth, tols = _grad_bounds(x, w, s, noise, dv64, True, torch.float32, bias=b)

    def slope_forgotten(grad, x, weight, styles, noise, bias, y, demodulate, act, alpha, gain, clamp, needs, **compute):
        y32 = y.float()
        dv = grad.float() * gain * torch.where(y32 > 0, 1.0, alpha) * (y32.abs() < clamp)
        pre = y32 / gain - bias.float()[None, :, None, None]  # wrong for the negative values
        return (*T.backward(dv, x, weight, styles, noise, pre, demodulate, needs[:4], **compute), dv.sum(dim=[0, 2, 3]))

    monkeypatch.setattr(T, "backward_act", slope_forgotten)
    _, got = _fused_gradients(x, w, s, noise, b, g, act, gain, clamp)
    assert {"weight", "styles"} <= set(_outside(got[:4], truth, tols))


def test_the_layer_op_splits_where_no_fused_kernel_applies():
    x, w, s, noise = _inputs(1, 16, 8, 6, 3, torch.float32, "none")
    b = torch.zeros(8).to(DEVICE)
    want = ref.bias_act(ref.modulated_conv2d(x, w, s, padding=1), b, act="lrelu")
    got = kernels.modulated_conv2d_act(x, w, s, padding=1, bias=b, act="lrelu")  # auto: the reference, split
    assert kernels.chosen()["modulated_conv2d_act"] == "split" and torch.equal(got, want)
    # tanh has no fused kernel: under prefer:triton the conv still takes the Triton kernel, the epilogue the reference
    kernels.modulated_conv2d_act(x, w, s, padding=1, bias=b, act="tanh", impl="prefer:triton")
    used = kernels.chosen()
    assert (used["modulated_conv2d_act"], used["modulated_conv2d"], used["bias_act"]) == ("split", "triton", "ref")
    with pytest.raises(ValueError, match="cannot run these inputs"):  # named outright: no silent fallback
        kernels.modulated_conv2d_act(x, w, s, padding=1, bias=b, act="tanh", impl="triton")
    f = kernels.setup_filter([1, 3, 3, 1]).to(DEVICE)
    kernels.modulated_conv2d_act(
        x, w, s, up=2, padding=1, resample_filter=f, flip_weight=False, bias=b, act="lrelu", impl="prefer:triton"
    )
    assert kernels.chosen()["modulated_conv2d_act"] == "triton"  # the up-sampling layer has its fused kernel


# The smallest generator with every kind of synthesis layer: the first block (the constant, conv1, toRGB) and
# one up-sampling block (conv0: transposed conv + FIR; conv1; toRGB; the skip image's up-sampling), with noise
# and conv_clamp. 8 px and 32 / 16 channels: under Triton's interpreter it runs in seconds where the built-in
# tiny generator (64 px, 128 channels, the same layer kinds at more resolutions) took minutes.
WHOLE = dict(
    z_dim=32,
    c_dim=0,
    w_dim=32,
    img_resolution=8,
    img_channels=3,
    mapping_kwargs=dict(num_layers=2),
    synthesis_kwargs=dict(channel_base=128, channel_max=32, num_fp16_res=0, conv_clamp=256),
)


def test_a_whole_generator_prefers_the_kernel_where_it_applies(monkeypatch):
    """G.impl = "prefer:triton": every synthesis layer as one fused kernel (the up-sampling ones: PyTorch's
    transposed convolution, then the FIR filter and the epilogue in one kernel) and the skip image's
    up-sampling on the FIR kernel. Image and gradients (for ws and every weight, what inversion and tuning
    use) within the float32 bound's order of magnitude of the reference's: a few layers of ~1e-6 relative
    each forward (5 here, about 20 in a 64 px generator: the bound holds for either), and the backward's
    longer reductions (pixels x batch)."""
    from helpers import small_generator

    G = small_generator(0, WHOLE).to(DEVICE).requires_grad_(True)
    assert {type(m).__name__ for m in G.synthesis.modules()} >= {"SynthesisBlock", "SynthesisLayer", "ToRGBLayer"}
    assert G.synthesis.b8.conv0.up == 2 and G.synthesis.b4.in_channels == 0  # an up-sampling block, the first block
    ws = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(0)).to(DEVICE), truncation_psi=0.7)
    c = None
    results = {}
    up_layers = []
    real_up = triton_upfirdn.modulated_conv2d_up_act
    monkeypatch.setattr(
        triton_upfirdn, "modulated_conv2d_up_act", lambda *a, **k: up_layers.append(1) or real_up(*a, **k)
    )
    for impl in ("ref", "prefer:triton"):
        leaf = ws.detach().clone().requires_grad_()
        img = G.synthesis(leaf, noise_mode="const", force_fp32=True, impl=impl)
        if c is None:
            c = torch.randn(img.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        params = [p for p in G.synthesis.parameters()]
        grads = torch.autograd.grad((img * c).sum(), [leaf, *params], allow_unused=True, materialize_grads=True)
        results[impl] = (img.detach(), grads)
        used = kernels.chosen()
    assert used["modulated_conv2d_act"] == "triton" and used["upfirdn2d"] == "triton"
    assert up_layers  # the up-sampling layers ran fused
    (want, want_g), (got, got_g) = results["ref"], results["prefer:triton"]
    assert 0 < (got - want).abs().max() <= 1e-4
    rel = [((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got_g, want_g) if b.abs().max() > 0]
    print(f"image max diff {(got - want).abs().max():.3g}, gradients max relative {max(rel):.3g}")
    assert 0 < max(rel) <= 1e-4, max(rel)
