"""The Triton kernels follow the precision (`pti.kernels.precision`): what `tl.dot` is compiled for, what
bf16 autocast makes of the layers, which TF32 flags their torch ops run under, and their int64 offsets.

- fp32: float32 operands, `input_precision="ieee"`; tf32: "tf32"; bf16 (autocast on float32 tensors):
  bfloat16 operands, float32 accumulation, bfloat16 outputs as the reference gives under autocast, float32
  gradients for the float32 weights. Each variant is a constexpr of its own (seen at the launch).
- The bounds are test_kernels.py's and test_kernels_upfirdn.py's with the operand roundings of each
  precision (`roundings`, `up_roundings`): bfloat16 2^-8 per rounded operand, TF32 2^-10, derived from the
  reduction length and the abs-sum of the products as there. Under bf16 the layer is also held to an
  emulation: the float64 GEMM of exactly the bfloat16-rounded operands, within float32 accumulation and one
  output rounding, which an fp32 GEMM "dressed up" as bf16 misses.
- The forward and the backward compute the same way wherever they are called: the backward gives the same
  bits inside the autocast scope as outside it, and the demodulation coefficients are exact float32.
- Offsets: a batch whose samples lie past 2^31 elements (a view into a buffer of 2^32, which the CPU only
  reserves) runs the real kernels, where int32 arithmetic would wrap (the interpreter wraps as the GPU does);
  `flat_block`, the bias_act kernel's offsets, is probed at a program index past 2^31 / BLOCK; `supports`
  draws the int32 line per sample, on meta tensors.

What only a GPU confirms: the interpreter computes `input_precision="tf32"` as exact float32, so on a CPU
the TF32 bounds hold trivially and check the logic only (`test_tf32_rounds_on_a_gpu` is the GPU's); it
multiplies bfloat16 operands as float32 (`_triton_common.dot_acc`), the same products and float32
accumulation as an MMA but not its summation order. The input-side offsets past 2^31 run here (and on a
GPU, where the buffer is really allocated); the output-side ones (y, the bias_act kernels on a tensor past 2^31
elements) only where that many elements are written: a 1024 px layer at batch 65, beyond the GPU check's batches.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tritonenv import (  # noqa: E402, F401  (first: it sets TRITON_INTERPRET on CPU; the fp32 fixture)
    DEVICE,
    EPS32,
    fp32_unless_asked,
    unit_roundoff,
)

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' on Linux)")
tl = triton.language

from test_kernels import _bound, _grad_bounds, _inputs, roundings  # noqa: E402
from test_kernels import _outside as _outside4  # noqa: E402
from test_kernels_upfirdn import LAYER, _layer_inputs, _layer_run, _layer_truth_and_bounds  # noqa: E402
from test_kernels_upfirdn import _outside as _outside5  # noqa: E402

from pti import kernels  # noqa: E402
from pti.kernels import triton_bias_act as B  # noqa: E402
from pti.kernels import triton_modconv as T  # noqa: E402
from pti.kernels import triton_upfirdn as U  # noqa: E402
from pti.kernels._triton_common import demod_coefficients, flat_block  # noqa: E402
from pti.kernels.precision import precision_scope  # noqa: E402

BF16 = torch.bfloat16
DOT = {"fp32": (tl.float32, "ieee"), "tf32": (tl.float32, "tf32"), "bf16": (tl.bfloat16, "ieee")}


class _Launches:
    """Stands in for a kernel: records the constexprs of every launch, then launches the real one."""

    def __init__(self, kernel):
        self.kernel, self.seen = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen.append((kwargs["DOT_DTYPE"], kwargs["PRECISION"]))
            return launch(*args, **kwargs)

        return run


def _layer(x, w, s, noise, b, **kw):
    return kernels.modulated_conv2d_act(x, w, s, noise=noise, padding=1, bias=b, act="lrelu", clamp=1.0, **kw)


def _leaves(*ts):
    return [t.clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_each_precision_compiles_its_own_dot(monkeypatch, precision):
    """The forward's GEMM and the input gradient's are launched with the precision's operand dtype and
    input_precision, on float32 tensors; the output has the reference's dtype under the same scope."""
    spy = _Launches(T._modconv_kernel)
    monkeypatch.setattr(T, "_modconv_kernel", spy)
    x, w, s, noise = _inputs(2, 16, 24, 6, 3, torch.float32, "random")
    b = torch.zeros(24, device=DEVICE)
    with precision_scope(precision, DEVICE):
        xl, wl, sl = _leaves(x, w, s)
        y = _layer(xl, wl, sl, noise, b, impl="triton")
        torch.autograd.grad(y.float().square().sum(), [xl, wl, sl])
        want = _layer(x, w, s, noise, b, impl="ref")
    assert len(spy.seen) == 2 and set(spy.seen) == {DOT[precision]}, spy.seen
    assert y.dtype == want.dtype == (BF16 if precision == "bf16" else torch.float32)


class _Flags(TorchDispatchMode):
    """Records, for every convolution and matmul PyTorch runs, the TF32 flags in effect and its input's dtype."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in ("convolution", "convolution_backward", "mm", "addmm"):
            flag = torch.backends.cudnn.allow_tf32 if name.startswith("conv") else torch.backends.cuda.matmul.allow_tf32
            self.seen.append((name, flag, args[0].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scope", ["pytorch-defaults", "fp32", "tf32", "bf16"])
def test_the_torch_ops_inside_a_layer_follow_its_precision(scope):
    """The weight gradients (both layers) and the up-sampling layer's transposed convolution run with cuDNN's
    TF32 exactly when the layer's own tl.dot does (PyTorch's default leaves cuDNN's on and cuBLAS's off: the
    layer is then float32 throughout), on bfloat16 operands under bf16; the demodulation's matmuls never TF32."""
    x, w, s, noise = _inputs(2, 8, 8, 5, 3, torch.float32, "none")
    f = kernels.setup_filter([1, 3, 3, 1]).to(DEVICE)
    mode = _Flags()
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if scope == "pytorch-defaults":
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    try:
        with precision_scope(scope, DEVICE) if scope != "pytorch-defaults" else torch.enable_grad(), mode:
            for up in (1, 2):
                xl, wl, sl = _leaves(x, w, s)
                y = kernels.modulated_conv2d_act(
                    xl, wl, sl, up=up, padding=1, resample_filter=f, flip_weight=up == 1, act="lrelu", impl="triton"
                )
                torch.autograd.grad(y.float().square().sum(), [xl, wl, sl])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    convs = [(n, flag, dt) for n, flag, dt in mode.seen if n.startswith("conv")]
    mms = [(n, flag, dt) for n, flag, dt in mode.seen if n.endswith("mm")]
    assert sorted(n for n, _, _ in convs) == ["convolution", "convolution_backward", "convolution_backward"]
    assert {flag for _, flag, _ in convs} == {scope == "tf32"}, convs
    assert {dt for _, _, dt in convs} == {BF16 if scope == "bf16" else torch.float32}, convs
    assert mms and {(flag, dt) for _, flag, dt in mms} == {(False, torch.float32)}, mms


@pytest.mark.slow  # over 5 s under the interpreter
def test_bf16_layers_give_the_references_dtypes():
    """Under bf16 autocast on float32 tensors every kernel gives the dtype the reference gives there (bfloat16
    where a convolution produced it), and float32 gradients for the float32 inputs."""
    x, w, s, noise = _inputs(2, 16, 8, 6, 3, torch.float32, "random")
    x1, w1, s1, _ = _inputs(2, 16, 3, 6, 1, torch.float32, "none")
    f = kernels.setup_filter([1, 3, 3, 1]).to(DEVICE)
    b = torch.zeros(8, device=DEVICE)
    ops = {
        "conv": lambda x, w, s, impl: _layer(x, w, s, noise, b, impl=impl),
        "torgb": lambda x, w, s, impl: kernels.modulated_conv2d_act(
            x, w, s, demodulate=False, bias=b[:3], clamp=256.0, impl=impl
        ),
        "up": lambda x, w, s, impl: kernels.modulated_conv2d_act(
            x, w, s, up=2, padding=1, resample_filter=f, flip_weight=False, bias=b, act="lrelu", impl=impl
        ),
        "upfirdn2d": lambda x, w, s, impl: kernels.upsample2d(x, f, impl=impl),
        "bias_act": lambda x, w, s, impl: kernels.bias_act(x, x.new_zeros(x.shape[1]), act="lrelu", impl=impl),
        "bias_act-mixed": lambda x, w, s, impl: kernels.bias_act(x.to(BF16), x.new_zeros(x.shape[1]), impl=impl),
    }
    with precision_scope("bf16", DEVICE):
        for name, op in ops.items():
            args = (x1, w1, s1) if name == "torgb" else (x, w, s)
            leaves = _leaves(*args)
            got = op(*leaves, impl="triton")
            want = op(*args, impl="ref")
            grads = torch.autograd.grad(got.float().sum(), leaves, allow_unused=True)
            assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
            assert all(g is None or g.dtype == torch.float32 for g in grads), name
    assert len(ops) == 6


def _bf16_case(seed=0):
    """Float32 inputs (stride-1 3x3 layer) and an incoming gradient exactly representable in bfloat16."""
    x, w, s, noise = _inputs(3, 33, 40, 5, 3, torch.float32, "random", seed=seed)
    grad = torch.randn(3, 40, 5, 5, generator=torch.Generator().manual_seed(seed + 1)).to(BF16).float().to(DEVICE)
    return x, w, s, noise, grad


def test_bf16_is_bfloat16_operands_with_float32_accumulation():
    """Under bf16 autocast the forward is the float64 GEMM of the bfloat16-rounded operands (s x formed in
    float32 and rounded once, W rounded) scaled by the exact coefficients, within float32 accumulation and
    one rounding of the output: not float32 operands labelled bfloat16. And within the bf16 bound of the
    float64 truth of the float32 inputs."""
    x, w, s, noise, _ = _bf16_case()
    with precision_scope("bf16", DEVICE):
        y = kernels.modulated_conv2d(x, w, s, noise=noise, padding=1, impl="triton")
    assert y.dtype == BF16
    a = (x * s[:, :, None, None]).to(BF16).cpu().double()  # the operands the kernel multiplies
    wb = w.to(BF16).cpu().double()
    d = ((w.cpu().double()[None] * s.cpu().double()[:, None, :, None, None]).square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
    z = torch.nn.functional.conv2d(a, wb, padding=1)
    S = torch.nn.functional.conv2d(a.abs(), wb.abs(), padding=1) * d[:, :, None, None]
    y_em = z * d[:, :, None, None] + noise.to(BF16).cpu().double()
    K, I = w.shape[1] * 9, w.shape[1]
    e32 = (K + I + 4) * EPS32 * (S + y_em.abs())
    err = (y.cpu().double() - y_em).abs()
    assert (err <= e32 + unit_roundoff(BF16) * (y_em.abs() + e32)).all(), err.max()
    y64, tol = _bound(x, w, s, noise, True, BF16, roundings(BF16, torch.float32)["fwd"])
    assert ((y.cpu().double() - y64).abs() <= tol).all()


@pytest.mark.slow  # over 5 s under the interpreter
def test_bf16_gradients_within_the_bf16_bounds():
    """The stride-1 layer's and the up-sampling layer's gradients under bf16 autocast, for float32 inputs:
    within test_kernels.py's / test_kernels_upfirdn.py's bounds with the bfloat16 operand roundings."""
    x, w, s, noise, grad = _bf16_case(seed=1)
    with precision_scope("bf16", DEVICE):
        leaves = _leaves(x, w, s, noise)
        y = kernels.modulated_conv2d(*leaves[:3], noise=leaves[3], padding=1, impl="triton")
        got = torch.autograd.grad(y, leaves, grad.to(BF16))
    truth, tols = _grad_bounds(x, w, s, noise, grad, True, BF16, u=roundings(BF16, torch.float32))
    assert _outside4(got, truth, tols) == {}

    x, w, s, b, noise, g, f = _layer_inputs(torch.float32, "random", seed=2)
    g = g.to(BF16).float()
    y64, tol_y, g, truth, tols, near = _layer_truth_and_bounds(x, w, s, b, noise, g, f, BF16)
    # Coverage, not a tolerance: autocast rounds the float32 weight too (three 2^-8 roundings of an abs-sum about
    # ten times |y| here), which widens the kink bands to about 13 % of the elements; 80 % are still compared.
    assert near <= y64.numel() // 5, near
    with precision_scope("bf16", DEVICE):
        y, got = _layer_run(x, w, s, b, noise, g.to(BF16), f)
    assert y.dtype == BF16 and ((y.detach().cpu().double() - y64).abs() <= tol_y).all()
    assert (y.detach().abs() == torch.tensor(LAYER["clamp"]).to(BF16)).any()  # the clamp's mask is exercised
    assert _outside5(got, truth, tols) == {}


@pytest.mark.slow  # over 5 s under the interpreter
def test_the_backward_does_not_depend_on_where_it_is_called():
    """Forward under bf16 autocast; the backward called inside the scope and outside it gives the same bits
    (the forward's dtype and precision travel with it), for both layer kinds. On a CPU the autograd engine
    runs the backward under its caller's autocast state, which torch.amp.custom_bwd(device_type="cuda")
    would leave on."""
    x, w, s, _ = _inputs(2, 8, 8, 4, 3, torch.float32, "none", seed=3)  # small: the interpreter runs it 4 times
    f = kernels.setup_filter([1, 3, 3, 1]).to(DEVICE)
    for up in (1, 2):
        grads = []
        for inside in (True, False):
            with precision_scope("bf16", DEVICE):
                leaves = _leaves(x, w, s)
                y = kernels.modulated_conv2d_act(
                    *leaves, up=up, padding=1, resample_filter=f, flip_weight=up == 1, act="lrelu", impl="triton"
                )
                if inside:
                    grads.append(torch.autograd.grad(y.float().square().sum(), leaves))
            if not inside:
                grads.append(torch.autograd.grad(y.float().square().sum(), leaves))
        assert all(torch.equal(a, b) for a, b in zip(*grads)), up


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_demodulation_coefficients_are_exact_float32_in_every_precision(precision):
    _, w, s, _ = _inputs(2, 33, 40, 5, 3, torch.float32, "none")
    want = demod_coefficients(w, s)
    with precision_scope(precision, DEVICE):
        got = demod_coefficients(w, s)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.slow  # over 5 s under the interpreter
def test_tf32_within_the_tf32_bounds():
    """Under tf32 the forward and the gradients of both layer kinds are within the bounds with 2^-10 per TF32
    operand. On a CPU the interpreter computes the "tf32" dot as float32 and the convolutions ignore TF32:
    this checks that the variant runs; on a GPU, that it is within its bound."""
    x, w, s, noise, grad = _bf16_case(seed=4)
    u = roundings(torch.float32, precision="tf32")
    with precision_scope("tf32", DEVICE):
        leaves = _leaves(x, w, s, noise)
        y = kernels.modulated_conv2d(*leaves[:3], noise=leaves[3], padding=1, impl="triton")
        got = torch.autograd.grad(y, leaves, grad)
    y64, tol = _bound(x, w, s, noise, True, torch.float32, u["fwd"])
    assert ((y.detach().cpu().double() - y64).abs() <= tol).all()
    truth, tols = _grad_bounds(x, w, s, noise, grad, True, torch.float32, u=u)
    assert _outside4(got, truth, tols) == {}

    x, w, s, b, noise, g, f = _layer_inputs(torch.float32, "random", seed=5)
    y64, tol_y, g, truth, tols, near = _layer_truth_and_bounds(x, w, s, b, noise, g, f, torch.float32, "tf32")
    assert near <= y64.numel() // 10, near
    with precision_scope("tf32", DEVICE):
        y, got = _layer_run(x, w, s, b, noise, g, f)
    assert ((y.detach().cpu().double() - y64).abs() <= tol_y).all()
    assert _outside5(got, truth, tols) == {}


@pytest.mark.gpu
def test_tf32_rounds_on_a_gpu():
    """On CUDA, tf32 is really TF32 (tensor cores): its error is of TF32's order, not float32's. Per product
    2^-11 against 2^-24, about 2^13 times float32's error; asked for here: at least 2^4 times."""
    x, w, s, noise, _ = _bf16_case(seed=6)
    y64, _ = _bound(x, w, s, noise, True, torch.float32)
    err = {}
    for precision in ("fp32", "tf32"):
        with precision_scope(precision, DEVICE):
            y = kernels.modulated_conv2d(x, w, s, noise=noise, padding=1, impl="triton")
        err[precision] = (y.cpu().double() - y64).abs().max().item()
    assert err["tf32"] > 16 * err["fp32"], err


# ----------------------------------------------------------------------------- int64 offsets


def _past_int32(*shapes, stride_n=2**30 + 2**28, dtype=BF16):
    """[3, ...] views, one per shape, whose samples start 1.25 * 2^30 elements apart inside one buffer of
    2^32 + 2^20 elements: the third sample lies past 2^31, and where int32 offsets wrap (2 * stride - 2^32)
    they still land inside the buffer (on its never-written part), so a wrong kernel reads other values
    rather than crashing. The CPU only reserves the buffer; a GPU allocates its 8 GiB."""
    try:
        big = torch.empty(2**32 + 2**20, dtype=dtype, device=DEVICE)
    except (RuntimeError, MemoryError) as e:  # a machine that will not reserve it
        pytest.skip(f"cannot reserve 2^32 elements: {e}")
    offset, views = 2**32 - 2 * stride_n, []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        view = big.as_strided((3, *shape), (stride_n, *torch.empty(shape).stride()), offset)
        view.copy_(torch.randn((3, *shape), generator=gen).to(dtype))
        views.append(view)
        offset += torch.Size(shape).numel()
    return views


def test_a_batch_past_2_31_elements_does_not_wrap():
    """The modulated conv (input and noise) and the FIR kernel on samples that start past 2^31 elements: the
    same bits as on a compact copy. With int32 offsets the third sample reads elsewhere."""
    x, noise = _past_int32((4, 6, 6), (1, 6, 6))
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 4, 3, 3, generator=g).to(BF16).to(DEVICE)
    s = (torch.randn(3, 4, generator=g) * 0.5 + 1).to(BF16).to(DEVICE)
    assert T.supports(x, w, s, noise, padding=1) and 2 * x.stride(0) >= 2**31
    want = T.forward(x.contiguous(), w, s, noise.contiguous())
    assert torch.equal(T.forward(x, w, s, noise), want)
    f = kernels.setup_filter([1, 3, 3, 1]).to(DEVICE)
    want = U.upfirdn2d(x.contiguous(), f, up=2, padding=[2, 1, 2, 1], gain=4)
    assert torch.equal(U.upfirdn2d(x, f, up=2, padding=[2, 1, 2, 1], gain=4), want)


@triton.jit
def _probe_flat_block(start_ptr, chan_ptr, pid, INNER, C, BLOCK: tl.constexpr):
    start, chan = flat_block(pid, INNER, C, BLOCK)
    tl.store(start_ptr, start)
    tl.store(chan_ptr + tl.arange(0, BLOCK), chan)


@pytest.mark.parametrize("pid", [3, 2**31 // B.BLOCK + 5, 2**32 // B.BLOCK + 7])
def test_the_flat_offsets_of_bias_act_are_int64(pid):
    """`flat_block` (the bias_act kernels' offsets) at program indices whose first element lies past 2^31 and
    2^32: the int64 start and every element's channel as Python's integers give them."""
    inner, c = 4096 * 3 + 5, 7  # a plane that does not divide the block
    start = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    chan = torch.zeros(B.BLOCK, dtype=torch.int32, device=DEVICE)
    _probe_flat_block[(1,)](start, chan, pid, inner, c, BLOCK=B.BLOCK)
    first = pid * B.BLOCK
    assert int(start) == first
    assert chan.tolist() == [((first + i) // inner) % c for i in range(B.BLOCK)]


def test_supports_draws_the_int32_line_per_sample():
    """A batch past 2^31 elements is accepted by every kernel (int64 offsets); a single sample whose own
    offsets reach 2^31 is refused (meta tensors: nothing allocated)."""
    meta = dict(device="meta", dtype=BF16)
    w, s = torch.empty(32, 32, 3, 3, **meta), torch.empty(65, 32, **meta)
    f = torch.empty(4, 4, device="meta")
    big_batch = torch.empty(65, 32, 1024, 1024, **meta)  # 2^31 + 2^25 elements: 1024 px x batch 65
    assert T.supports(big_batch, w, s, padding=1) and U.supports(big_batch, f, up=2, padding=[2, 1, 2, 1])
    assert B.supports(big_batch, torch.empty(32, **meta))
    assert U.supports_up_act(big_batch[:, :, :512, :512], w, s, up=2, resample_filter=f)
    whole = 2**31 // (1024 * 1024)  # channels of one sample at 2^31 elements
    assert T.supports(torch.empty(1, whole, 1024, 1024, **meta), torch.empty(8, whole, 1, 1, **meta), s, padding=0)
    assert not T.supports(torch.empty(1, whole + 1, 1024, 1024, **meta), torch.empty(8, whole + 1, 1, 1, **meta), s)
    assert not U.supports(torch.empty(1, whole // 4 + 1, 1024, 1024, **meta), f, up=2, padding=[2, 1, 2, 1])
    assert not B.supports(torch.empty(1, 1, 2**31, **meta), None)
