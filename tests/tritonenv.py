"""Where the Triton kernel tests run: CUDA tensors on a GPU, else CPU tensors under Triton's interpreter;
and in which precision.

Import this before anything that imports a kernel module: TRITON_INTERPRET must be set before
`triton.jit` decorates the kernels. Import `fp32_unless_asked` into a test module too: every test there
then runs in `precision_scope("fp32")` (TF32 off in cuBLAS and cuDNN, whatever PyTorch's defaults: cuDNN's
TF32 is on by default), unless it opens a scope of its own.

The rounding errors the bounds are built from: `unit_roundoff(dtype)` (round to nearest even: half an
eps), `TF32_U` per TF32 operand, `compound` for a product passing through several roundings.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
EPS32 = torch.finfo(torch.float32).eps
# TF32 keeps 10 of float32's 23 mantissa bits: 2^-11 relative rounded to nearest, 2^-10 when the tensor cores
# take the float32 bits as they are (truncation); neither Triton's mma lowering nor cuDNN documents which.
TF32_U = 2.0**-10

from pti.kernels.precision import precision_scope  # noqa: E402  (after TRITON_INTERPRET)


def unit_roundoff(dtype: torch.dtype) -> float:
    """The largest relative error of one rounding to nearest (even) to `dtype`: 2^-8 for bfloat16."""
    return torch.finfo(dtype).eps / 2


def compound(*us: float) -> float:
    """The relative error of a value rounded with relative errors `us` in turn (or of a product of such values)."""
    p = 1.0
    for u in us:
        p *= 1 + u
    return p - 1


@pytest.fixture(autouse=True)
def fp32_unless_asked():
    with precision_scope("fp32", DEVICE):
        yield
