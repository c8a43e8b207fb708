"""Where the Triton kernel tests run: CUDA tensors on a GPU, else CPU tensors under Triton's interpreter.

Import this before anything that imports a kernel module: TRITON_INTERPRET must be set before
`triton.jit` decorates the kernels.
"""

from __future__ import annotations

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
EPS32 = torch.finfo(torch.float32).eps
