"""The Triton modulated convolution against the reference ops, on CPU under Triton's interpreter.

Forward: compared with the reference computed in float64 from the same (already rounded) inputs, with an
a-priori error bound rather than a tuned tolerance. The kernel accumulates in float32, so per output

    |y - y64| <= (K + I + 4) * eps32 * (S + |y64|) + 2 * eps(dtype) * (|y64| + |noise|)

where K = I * k * k is the reduction length, S = |d| * sum |W| |s| |x| the sum of the absolute products
(the standard bound for a float32 dot product, gamma_K * S), I + 4 roundings in the demodulation
coefficients (a sum of I squares, a matmul, rsqrt, a product), and one rounding of the output (and of
the noise) to `dtype`. A deliberately wrong variant (the taps flipped) lands far outside it.

Backward: the kernel's autograd is the reference's, re-run; its gradients must equal the reference's
bit for bit at the same dtype.
"""

from __future__ import annotations

import os

import pytest
import torch

# On a GPU the kernel runs on CUDA tensors; elsewhere under Triton's interpreter on CPU tensors. The variable
# must be set before the kernel module is imported: triton.jit reads it then.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]' on Linux)")

from pti import kernels  # noqa: E402
from pti.kernels import ref  # noqa: E402
from pti.kernels import triton_modconv as T  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
SHAPES = [  # (batch, in, out, size, kernel)
    (1, 16, 24, 6, 3),
    (3, 33, 40, 5, 3),     # channel counts off the 16/32 tiles: masks
    (2, 48, 3, 8, 1),      # toRGB-like 1x1
]


def _inputs(batch, c_in, c_out, size, k, dtype, noise_kind, seed=0):
    g = torch.Generator().manual_seed(seed)  # fixed inputs on every machine
    x = torch.randn(batch, c_in, size, size, generator=g).to(dtype)
    w = torch.randn(c_out, c_in, k, k, generator=g).to(dtype)
    s = (torch.randn(batch, c_in, generator=g) * 0.5 + 1).to(dtype)
    noise = {"none": None, "const": torch.randn(size, size, generator=g) * 0.1,
             "random": torch.randn(batch, 1, size, size, generator=g) * 0.1}[noise_kind]
    return x.to(DEVICE), w.to(DEVICE), s.to(DEVICE), (None if noise is None else noise.to(dtype).to(DEVICE))


def _bound(x, w, s, noise, demodulate, dtype):
    """The a-priori bound of the module docstring, per output element, in float64."""
    k = w.shape[-1]
    x, w, s = x.cpu(), w.cpu(), s.cpu()
    noise = None if noise is None else noise.cpu()
    x64, w64, s64 = x.double(), w.double(), s.double()
    y64 = ref.modulated_conv2d(x64, w64, s64, noise=None if noise is None else noise.double(), padding=k // 2,
                               demodulate=demodulate, fused_modconv=False)
    S = torch.nn.functional.conv2d((x64 * s64[:, :, None, None]).abs(), w64.abs(), padding=k // 2)
    if demodulate:
        d = ((w64[None] * s64[:, None, :, None, None]).square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()
        S = S * d[:, :, None, None]
    K, I = w.shape[1] * k * k, w.shape[1]
    nz = 0 if noise is None else noise.double().abs()
    tol = (K + I + 4) * EPS32 * (S + y64.abs()) + 2 * torch.finfo(dtype).eps * (y64.abs() + nz)
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
    y64, tol = _bound(x, w, s, noise, demodulate, dtype)
    err = (y.cpu().double() - y64).abs()
    assert (err <= tol).all(), f"max error {err.max():.3g}, bound there {tol.flatten()[err.argmax()]:.3g}"


def test_a_wrong_kernel_is_outside_the_bound():
    """The taps flipped (convolution instead of correlation), as a kernel bug would: caught."""
    x, w, s, noise = _inputs(2, 16, 24, 6, 3, torch.float32, "const")
    y = T.forward(x, w.flip([2, 3]).contiguous(), s, noise, demodulate=True)
    y64, tol = _bound(x, w, s, noise, True, torch.float32)
    assert ((y.cpu().double() - y64).abs() > tol).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[2:], ids=lambda s: "x".join(map(str, s)))
def test_backward_equals_the_reference(shape, dtype):
    batch, c_in, c_out, size, k = shape
    demodulate = k == 3
    x, w, s, noise = _inputs(*shape, dtype, "random", seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, w, s, noise)]
    y = kernels.modulated_conv2d(*leaves[:3], noise=leaves[3], padding=k // 2, demodulate=demodulate, impl="triton")
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    got = torch.autograd.grad(y, leaves, grad)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, s, noise)]
    y_ref = ref.modulated_conv2d(*ref_leaves[:3], noise=ref_leaves[3], padding=k // 2, demodulate=demodulate, fused_modconv=False)
    want = torch.autograd.grad(y_ref, ref_leaves, grad)
    for name, a, b in zip(("x", "weight", "styles", "noise"), got, want):
        assert torch.equal(a, b), name


def test_not_in_auto_until_measured_and_unsupported_inputs_refused():
    x, w, s, _ = _inputs(1, 16, 8, 6, 3, torch.float32, "none")
    kernels.modulated_conv2d(x, w, s, padding=1)
    assert kernels.chosen()["modulated_conv2d"] == "ref"  # auto: the reference
    assert "triton" in kernels.available("modulated_conv2d")
    with pytest.raises(ValueError, match="cannot run these inputs"):  # the up-sampling layers stay on the reference
        kernels.modulated_conv2d(x, w, s, up=2, padding=1, resample_filter=kernels.setup_filter([1, 3, 3, 1]),
                                 flip_weight=False, impl="triton")


@pytest.mark.slow
def test_a_whole_generator_prefers_the_kernel_where_it_applies():
    """G.impl = "prefer:triton": the stride-1 layers on the kernel, the up-sampling ones on the reference;
    the image within the float32 bound's order of magnitude of the reference's (20 layers of ~1e-6)."""
    from pti.engine.generator import tiny_generator

    G = tiny_generator(DEVICE)
    ws = G.mapping(torch.randn(2, G.z_dim, generator=torch.Generator().manual_seed(0)).to(DEVICE), truncation_psi=0.7)
    with torch.no_grad():
        want = G.synthesis(ws, noise_mode="const", force_fp32=True, impl="ref")
        got = G.synthesis(ws, noise_mode="const", force_fp32=True, impl="prefer:triton")
    assert kernels.chosen()["modulated_conv2d"] in ("triton", "ref")
    assert 0 < (got - want).abs().max() <= 1e-4
