"""The Triton FIR resampling kernel and the up-sampling synthesis layer, against a float64 truth.

Bounds, per element, from what the kernels compute (float32 arithmetic, one rounding to the dtype):

- upfirdn2d: a float32 sum of at most fh * fw products, scaled by the gain:
      |y - y64| <= (fh * fw + 2) eps32 * S + eps(dtype) |y64|,   S = upfirdn2d(|x|, |f|) * gain;
  its gradient is the same op transposed, with S from the transposed op on |g|.
- the up-sampling layer: x * s, a transposed convolution (at most I * k * k products per output), the
  FIR filter (16 taps), the demodulation coefficients ((I + 4) eps32 relative), noise and the epilogue
  (3 operations); no fp16 overflow guard is needed, its convolution being float32 or bfloat16:
      |y - y64| <= ((I k^2 + 16 + I + 8) eps32 + u_fwd) * S_y + eps32 |b| + eps(dtype) |y64|,
  S_y = d * conv2d_resample(|x s|, |W|, f, up=2), u_fwd what rounding the convolution's operands and its
  output adds (`up_roundings`: none in float32 and float16, where it runs in float32; s x and t rounded
  to bfloat16, 2^-8 each, in bfloat16; 2^-10 per operand under TF32). Its gradients: abs-sums of the same
  multilinear map (its gradient evaluated at |x|, |W|, |s| and the absolute incoming gradient), times the
  longest reduction each passes through, plus the demodulation chain as in test_kernels.py, plus the
  roundings of the transposed convolution's backward (its incoming gradient, operands and outputs).

The incoming gradient is zero where the activation's input is within the forward bound of a kink (as
in test_kernels.py): either side is right there, and the backward reads the kink from the stored output.
As in test_kernels.py, the interpreter checks the logic of every precision; the bfloat16 convolution is
oneDNN's here and cuDNN's on a GPU, and TF32 (exact float32 on a CPU) is bounded on CUDA only.
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
from pti.kernels import triton_upfirdn as T  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FIR = [  # (up, down, padding, filter taps, flip_filter): the generator's uses, crops, odd factors
    (2, 1, [2, 1, 2, 1], [1, 3, 3, 1], False),  # upsample2d of the skip image
    (1, 1, [1, 1, 1, 1], [1, 3, 3, 1], False),  # the FIR after a transposed conv
    (1, 2, [1, 1, 1, 1], [1, 3, 3, 1], False),  # downsample
    (2, 1, [-1, 2, 1, -2], [1, 2, 1], True),  # crops, an odd filter, correlation
    (3, 2, [1, 1, 2, 0], [1, 3, 3, 1], False),
]


def _fir_inputs(dtype, taps, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 7, 6, generator=g).to(dtype).to(DEVICE)
    f = kernels.setup_filter(taps)
    f = (f * (1 + 0.1 * torch.randn(f.shape, generator=g))).to(DEVICE)  # not symmetric: flips matter
    return x, f


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "case", FIR, ids=lambda c: f"up{c[0]}-down{c[1]}-pad{'_'.join(map(str, c[2]))}-flip{int(c[4])}"
)
def test_upfirdn2d_forward_and_backward_within_the_bounds(case, dtype):
    up, down, pad, taps, flip = case
    x, f = _fir_inputs(dtype, taps)
    gain = float(up * up)
    xl = x.clone().requires_grad_()
    y = kernels.upfirdn2d(xl, f, up=up, down=down, padding=pad, flip_filter=flip, gain=gain, impl="triton")
    assert kernels.chosen()["upfirdn2d"] == "triton" and y.dtype == dtype
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    (dx,) = torch.autograd.grad(y, [xl], grad)
    x64 = x.cpu().double().requires_grad_()
    f64 = f.cpu().double()
    y64 = ref.upfirdn2d(x64, f64, up=up, down=down, padding=pad, flip_filter=flip, gain=gain)
    (dx64,) = torch.autograd.grad(y64, [x64], grad.cpu().double())
    xa = x.cpu().double().abs().requires_grad_()
    S = ref.upfirdn2d(xa, f64.abs(), up=up, down=down, padding=pad, flip_filter=flip, gain=gain)
    (S_g,) = torch.autograd.grad(S, [xa], grad.cpu().double().abs())
    eps, n_taps = torch.finfo(dtype).eps, f.numel()
    assert y.shape == y64.shape
    assert ((y.detach().cpu().double() - y64).abs() <= (n_taps + 2) * EPS32 * S.detach() + eps * y64.abs()).all()
    assert ((dx.cpu().double() - dx64).abs() <= (n_taps + 2) * EPS32 * S_g + eps * dx64.abs()).all()


def test_a_wrong_fir_is_outside_the_bound():
    """The filter not flipped (correlation where the reference convolves), as a kernel bug would: caught."""
    x, f = _fir_inputs(torch.float32, [1, 3, 3, 1])
    y = kernels.upfirdn2d(x, f, up=2, padding=[2, 1, 2, 1], gain=4, flip_filter=True, impl="triton")
    y64 = ref.upfirdn2d(x.cpu().double(), f.cpu().double(), up=2, padding=[2, 1, 2, 1], gain=4)
    S = ref.upfirdn2d(x.cpu().double().abs(), f.cpu().double(), up=2, padding=[2, 1, 2, 1], gain=4)
    assert ((y.cpu().double() - y64).abs() > 18 * EPS32 * S + EPS32 * y64.abs()).any()


# ----------------------------------------------------------------------------- the up-sampling layer

LAYER = dict(act="lrelu", gain=2**0.5, clamp=1.0)


def _layer_inputs(dtype, noise_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, 5, 5, generator=g).to(dtype)
    w = torch.randn(10, 12, 3, 3, generator=g).to(dtype)
    s = (torch.randn(2, 12, generator=g) * 0.5 + 1).to(dtype)
    b = (torch.randn(10, generator=g) * 0.2).to(dtype)
    noise = {
        "none": None,
        "const": torch.randn(10, 10, generator=g) * 0.1,
        "random": torch.randn(2, 1, 10, 10, generator=g) * 0.1,
    }[noise_kind]
    g_out = torch.randn(2, 10, 10, 10, generator=g).to(dtype)
    f = kernels.setup_filter([1, 3, 3, 1])
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x), to(w), to(s), to(b), None if noise is None else to(noise.to(dtype)), to(g_out), to(f)


def _conv_up(x, w, s, f):
    return ref.conv2d_resample(x * s[:, :, None, None], w, f=f, up=2, padding=1, flip_weight=False)


def up_roundings(dtype, inputs=None, precision="ieee"):
    """What the up-sampling layer's roundings add, relative, to the abs-sums of its convolutions, computing in
    `dtype` on tensors of `inputs` (dtype's; float32 under autocast) with `precision`: "fwd" the transposed
    convolution's (s x and W rounded to its operand dtype, its output t too), "bx" and "bw" its backward's
    (dt rounded, the weight or s x, the output), "epi" the bias and noise rounded to dtype under autocast."""
    inputs = inputs or dtype
    if dtype != torch.bfloat16:  # float32 convolutions (`_triton_common.torch_dtype`): TF32 operands or none
        t = compound(TF32_U, TF32_U) if precision == "tf32" and dtype == torch.float32 else 0.0
        return {"fwd": t, "bx": t, "bw": t, "epi": 0.0}
    u = unit_roundoff(dtype)
    xs = compound(EPS32 if inputs == torch.float32 else 0.0, u)  # 16-bit s * x is exact in float32
    w = u if inputs != dtype else 0.0
    return {
        "fwd": compound(xs, w, u),
        "bx": compound(u, w, u),
        "bw": compound(u, xs, u),
        "epi": u if inputs != dtype else 0.0,
    }


def _layer_truth_and_bounds(x, w, s, b, noise, g_out, f, dtype, precision="ieee"):
    """Truth, bounds and the kink-free incoming gradient of the layer computing in `dtype` (its output's) on
    x's dtype with `precision`."""
    u = up_roundings(dtype, x.dtype, precision)
    x64, w64, s64, b64, f64 = (t.cpu().double() for t in (x, w, s, b, f))
    n64 = None if noise is None else noise.cpu().double()
    I, k = w.shape[1], w.shape[-1]
    d = ((w64[None] * s64[:, None, :, None, None]).square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
    Z = _conv_up(x64.abs(), w64.abs(), s64.abs(), f64)  # |z| bound
    S_y = Z * d[:, :, None, None]
    eps = torch.finfo(dtype).eps
    lead = (I * k * k + 16 + I + 8) * EPS32
    tol_v = (lead + u["fwd"]) * S_y + (EPS32 + u["epi"]) * b64.abs()[:, None, None]
    tol_v = tol_v + (0 if noise is None else u["epi"] * noise.cpu().double().abs())
    z64 = ref.modulated_conv2d(
        x64, w64, s64, noise=n64, up=2, padding=1, resample_filter=f64, flip_weight=False, fused_modconv=False
    )
    v64 = z64 + b64[:, None, None]
    a64 = ref.bias_act(v64, act="lrelu", gain=LAYER["gain"])
    near = (v64.abs() <= tol_v) | (
        (a64.abs() - LAYER["clamp"]).abs() <= LAYER["gain"] * tol_v + 3 * EPS32 * a64.abs() + eps * LAYER["clamp"]
    )
    g64 = g_out.cpu().double() * ~near
    y64 = ref.bias_act(v64, act="lrelu", gain=LAYER["gain"], clamp=LAYER["clamp"])
    tol_y = LAYER["gain"] * tol_v + 3 * EPS32 * a64.abs() + eps * y64.abs()
    # gradients: the truth through the float64 reference, driven by the activation's exact gradient
    v_leaf = v64.clone().requires_grad_()
    (dv64,) = torch.autograd.grad(ref.bias_act(v_leaf, **{**LAYER}), [v_leaf], g64)
    leaves = [t.clone().requires_grad_() for t in (x64, w64, s64)] + (
        [] if n64 is None else [n64.clone().requires_grad_()]
    )
    z = ref.modulated_conv2d(
        *leaves[:3],
        noise=leaves[3] if n64 is not None else None,
        up=2,
        padding=1,
        resample_filter=f64,
        flip_weight=False,
        fused_modconv=False,
    )
    truth = list(torch.autograd.grad(z, leaves, dv64)) + ([None] if n64 is None else []) + [dv64.sum(dim=[0, 2, 3])]
    # abs-sums of the multilinear part: its gradient at |x|, |W|, |s| with |dv| d coming in
    GD = dv64.abs() * d[:, :, None, None]
    abs_leaves = [t.abs().clone().requires_grad_() for t in (x64, w64, s64)]
    Sx, Sw, Ss = torch.autograd.grad(_conv_up(*abs_leaves, f64), abs_leaves, GD)
    N, O = x.shape[0], w.shape[0]
    H, W_ = x.shape[2], x.shape[3]
    OH, OW = 2 * H, 2 * W_
    e_d = (I + 4) * EPS32
    tol_x = ((O * k * k + 16 + 4) * EPS32 + e_d + u["bx"]) * Sx
    tol_w = ((N * OH * OW + 16 + 4) * EPS32 + e_d + u["bw"]) * Sw
    tol_s = ((O * k * k + 16 + H * W_ + 4) * EPS32 + e_d + u["bx"]) * Ss
    # the demodulation chain: dd = sum_p dv (v - b - noise) / d, recovered from the stored y
    Y = Z * d[:, :, None, None] + (0 if n64 is None else n64.abs()) + b64.abs()[:, None, None]
    M_dd = (dv64.abs() * Z).sum(dim=[2, 3])
    E_dd = (OH * OW + I * k * k + 16 + 4) * EPS32 * M_dd + (e_d + u["fwd"]) * M_dd
    E_dd = E_dd + eps * (dv64.abs() * Y).sum(dim=[2, 3]) / d  # y rounded to dtype
    E_q = 0.5 * d.pow(3) * (E_dd + (3 * e_d + 3 * EPS32) * M_dd)
    M_q = 0.5 * d.pow(3) * M_dd
    Wsq = w64.square().sum(dim=[2, 3])
    tol_s = tol_s + 2 * s64.abs() * (E_q @ Wsq + (O + k * k + 3) * EPS32 * (M_q @ Wsq))
    tol_w = (
        tol_w + 2 * w64.abs() * (E_q.t() @ s64.square() + (N + 3) * EPS32 * (M_q.t() @ s64.square()))[:, :, None, None]
    )
    L = OH * OW * N
    tol_n = None if n64 is None else (dv64.numel() // n64.numel() + 1) * EPS32 * dv64.abs().sum_to_size(n64.shape)
    tol_b = (L + 3) * EPS32 * dv64.abs().sum(dim=[0, 2, 3])
    tols = [tol_x, tol_w, tol_s, tol_n, tol_b]
    eps_in = torch.finfo(x.dtype).eps  # each gradient rounded once to its input's dtype
    tols = [None if t is None else t + eps_in * tr.abs() for t, tr in zip(tols, truth)]
    return y64, tol_y, g64.to(g_out.dtype).to(DEVICE), truth, tols, int(near.sum())


def _layer_run(x, w, s, b, noise, g, f):
    leaves = [t.clone().requires_grad_() for t in (x, w, s)] + (
        [] if noise is None else [noise.clone().requires_grad_()]
    )
    bl = b.clone().requires_grad_()
    y = kernels.modulated_conv2d_act(
        *leaves[:3],
        noise=leaves[3] if noise is not None else None,
        up=2,
        padding=1,
        resample_filter=f,
        flip_weight=False,
        bias=bl,
        impl="triton",
        **LAYER,
    )
    grads = list(torch.autograd.grad(y, leaves + [bl], g))
    if noise is None:
        grads.insert(3, None)
    return y, grads


def _outside(got, truth, tols):
    names = ("x", "weight", "styles", "noise", "bias")
    return {
        n: round(((a.cpu().double() - t).abs() / tol).max().item(), 2)
        for n, a, t, tol in zip(names, got, truth, tols)
        if a is not None and ((a.cpu().double() - t).abs() > tol).any()
    }


# At most 1 / NEAR_KINK of the elements may be left out of the gradient comparison as near a kink (test_kernels.py).
NEAR_KINK = {torch.float32: 100, torch.float16: 100, torch.bfloat16: 10}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("noise_kind", ["none", "const", "random"])
def test_up_layer_within_the_bounds(noise_kind, dtype):
    x, w, s, b, noise, g, f = _layer_inputs(dtype, noise_kind)
    y64, tol_y, g, truth, tols, near = _layer_truth_and_bounds(x, w, s, b, noise, g, f, dtype)
    assert near <= y64.numel() // NEAR_KINK[dtype], near  # the gradients are compared on nearly all elements
    y, got = _layer_run(x, w, s, b, noise, g, f)
    assert kernels.chosen()["modulated_conv2d_act"] == "triton" and y.dtype == dtype and y.shape == y64.shape
    assert ((y.detach().cpu().double() - y64).abs() <= tol_y).all()
    assert (y.detach().abs() == torch.tensor(LAYER["clamp"]).to(dtype)).any()  # the clamp bites
    assert _outside(got, truth, tols) == {}


def test_a_wrong_up_layer_backward_is_outside_the_bound(monkeypatch):
    """The FIR gradient sent back through the filter as given instead of its transpose: caught."""
    x, w, s, b, noise, g, f = _layer_inputs(torch.float32, "random")
    f = f * (1 + 0.1 * torch.randn(f.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE))  # asymmetric
    _, _, g, truth, tols, _ = _layer_truth_and_bounds(x, w, s, b, noise, g, f, torch.float32)
    real = T._transpose
    calls = []

    def flip_not_toggled(g_, f_, up, down, padding, flip_filter, gain, x_shape, out_dtype=None):
        calls.append(1)
        return real(g_, f_, up, down, padding, not flip_filter, gain, x_shape, out_dtype)

    monkeypatch.setattr(T, "_transpose", flip_not_toggled)
    _, got = _layer_run(x, w, s, b, noise, g, f)
    assert calls and {"x", "weight", "styles"} <= set(_outside(got, truth, tols))
