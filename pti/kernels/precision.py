"""The compute precisions, defined once, and the scope that makes each one what it says.

    fp32  float32 throughout: TF32 off in cuBLAS and cuDNN for the duration (PyTorch leaves cuDNN's TF32
          on by default, which would round every convolution's inputs to 10 mantissa bits on a GPU)
    tf32  float32 tensors, TF32 tensor-core matmuls and convolutions (cuBLAS, cuDNN, and the Triton
          kernels' `tl.dot`) allowed: about 1e-3 relative per product
    bf16  bfloat16 autocast on the device (bfloat16 matmuls and convolutions, float32 master weights,
          optimizer state and reductions); TF32 off for what autocast leaves in float32

`precision_scope(precision, device)` sets the flags (and autocast) for the duration of a call and puts
the caller's back afterwards; `flags()` is what is in effect, as every result records it. On a CPU the
TF32 flags change nothing, but they are still set and recorded, so a result says what it assumed.
The Triton kernels read the same flags (`dot_precision`), so they follow the precision too.

Only the legacy flag API (`allow_tf32`) is used: PyTorch refuses to read flags set through a mix of it
and the newer `fp32_precision` API.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


def flags() -> dict:
    """The TF32 flags and autocast state in effect, as results record them."""
    out = {
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
    }
    for kind in ("cuda", "cpu"):
        if torch.is_autocast_enabled(kind):
            out["autocast"] = f"{kind}:{str(torch.get_autocast_dtype(kind)).removeprefix('torch.')}"
    return out


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


@contextlib.contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """cuBLAS and cuDNN TF32 set to `allowed` for the block, the caller's flags put back."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tf32_scope(precision: str):
    """The TF32 flags of `precision` (on for tf32, off for fp32 and bf16) for the block; the caller's after."""
    _check(precision)
    return tf32(precision == "tf32")


def autocast_scope(precision: str, device: torch.device | str | None = None):
    """bfloat16 autocast on `device` for bf16, nothing for fp32 and tf32: what a forward pass runs under (the
    engine keeps its losses in float32, outside it)."""
    _check(precision)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def precision_scope(precision: str, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block in `precision` (see the module's table) on `device`: `tf32_scope` and `autocast_scope`
    together; restores the caller's flags."""
    with tf32_scope(precision), autocast_scope(precision, device):
        yield


@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Autocast off for the block (what float32 work inside a bf16 scope runs under)."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def dot_precision(dtype: torch.dtype) -> str:
    """The `input_precision` a Triton `tl.dot` on operands of `dtype` should use under the flags in effect:
    "ieee" for float32 unless TF32 is allowed (then "tf32"); 16-bit operands run natively ("ieee" is
    Triton's name for no rounding of them)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
