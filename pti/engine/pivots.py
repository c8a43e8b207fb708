"""Pivot files other tools write, read as one float32 [num_ws, w_dim] latent, without running any of them.

What is accepted, by content (the suffix is only a hint):

- a `torch.save` of one tensor (`.pt`; the authors' PTI saves its pivot as `embeddings/.../0.pt`,
  [1, num_ws, w_dim]), read by `torch.load(weights_only=True)`: tensors and plain containers, never code;
- a `.npy` array, read with `allow_pickle=False` (an object array is refused, not unpickled);
- a `.npz` archive holding `w` (NVIDIA's `projector.py` writes `projected_w.npz` this way), also without pickle.

Shapes: [1, w_dim] (one w, used on every layer), [num_ws, w_dim] or [1, num_ws, w_dim]. Any floating
dtype is accepted and cast to float32 (float64 pivots, like InterFaceGAN's `.npy` files, round once);
integers, booleans, complex values, NaN or infinity, and every other shape or format are one-line
`PivotError`s naming the file and what it holds.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pti.engine.safe_pickle import load_weights_only, pickle_refusal
from pti.errors import PTIError

NPY_MAGIC = b"\x93NUMPY"
NPZ_KEY = "w"  # NVIDIA's projected_w.npz: np.savez(path, w=...)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class PivotError(PTIError):
    """A pivot (latent) file is missing, unreadable, or not a w of the generator's shape."""


def read_pivot(path: str | os.PathLike, num_ws: int, w_dim: int) -> torch.Tensor:
    """The pivot in `path` as float32 [num_ws, w_dim] (see the module docstring for what is accepted)."""
    return fit_pivot(read_pivot_file(path), path, num_ws, w_dim)


def read_pivot_file(path: str | os.PathLike) -> torch.Tensor:
    """The one tensor a pivot file holds, as float32 in the shape the file stores (not yet checked against a
    generator: `fit_pivot` does that)."""
    path = Path(path)
    if not path.is_file():
        raise PivotError(f"{path}: no such pivot file" if not path.exists() else f"{path} is not a file")
    return _as_tensor(_read(path), path)


def _read(path: Path) -> Any:
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise PivotError(f"{path} is empty, not a pivot file")
    if head.startswith(NPY_MAGIC):
        return _numpy_load(path)
    if head.startswith(b"PK\x03\x04"):
        return _zip(path)
    if head[:1] == b"\x80":  # a pickle: torch.save's format before torch 1.6
        return _torch_load(path)
    raise PivotError(
        f"{path} is not a pivot file: expected a torch.save of a tensor (.pt), a .npy array or an .npz with '{NPZ_KEY}'"
    )


def _zip(path: Path) -> Any:
    """A torch.save (zip with `<prefix>/data.pkl`) or an .npz (zip of .npy members)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise PivotError(f"{path} is a truncated or damaged zip file ({e})") from None
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return _torch_load(path)
    with _numpy_load(path) as arrays:
        keys = sorted(arrays.files)
        if NPZ_KEY not in keys:
            found = ", ".join(keys[:8]) or "nothing"
            raise PivotError(
                f"{path} is an .npz without '{NPZ_KEY}' (the key NVIDIA's projected_w.npz uses); it holds {found}"
            )
        return _numpy_member(arrays, NPZ_KEY, path)


def _numpy_load(path: Path) -> Any:
    try:
        out = np.load(path, allow_pickle=False)
    except ValueError as e:
        why = pickle_refusal(e) or str(e)
        raise PivotError(f"{path}: not a pivot ({why})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise PivotError(f"{path} is truncated or not a valid .npy/.npz file ({type(e).__name__}: {e})") from None
    return out


def _numpy_member(arrays, key: str, path: Path) -> np.ndarray:
    try:
        return arrays[key]
    except ValueError as e:  # an object member: numpy refuses to unpickle it
        why = pickle_refusal(e) or str(e)
        raise PivotError(f"{path}: '{key}' is not a pivot ({why})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise PivotError(f"{path}: '{key}' is truncated or damaged ({type(e).__name__}: {e})") from None


def _torch_load(path: Path) -> Any:
    try:
        return load_weights_only(path)
    except Exception as e:  # noqa: BLE001  refused pickles, truncated zips, not a torch file: all one line
        why = pickle_refusal(e)
        if why:
            raise PivotError(f"{path} is not a pivot: {why}") from None
        raise PivotError(f"{path} is truncated or not a torch.save file ({type(e).__name__}: {e})") from None


def _as_tensor(value: Any, path: Path) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "f":
            raise PivotError(f"{path} holds a {value.dtype} array; a pivot is floating point (float32)")
        return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    if isinstance(value, torch.Tensor):
        if value.dtype not in _FLOAT_DTYPES:
            raise PivotError(
                f"{path} holds a {str(value.dtype).removeprefix('torch.')} tensor; a pivot is floating point (float32)"
            )
        return value.detach().to("cpu", torch.float32).contiguous()
    what = type(value).__name__
    if isinstance(value, dict):
        keys = ", ".join(sorted(map(str, value))[:8]) or "nothing"
        what = f"dict (keys: {keys})"
    raise PivotError(f"{path} holds a {what}, not one pivot tensor")


def fit_pivot(t: torch.Tensor, path: str | os.PathLike, num_ws: int, w_dim: int) -> torch.Tensor:
    """`t` (read from `path`) as the [num_ws, w_dim] pivot of a generator with those sizes, all values finite."""
    shape = tuple(t.shape)
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise PivotError(f"{path}: the pivot holds {bad} NaN or infinite value(s) of {math.prod(shape)}")
    if shape == (1, w_dim):
        t = t.expand(num_ws, w_dim)  # one w for every layer (a W-space pivot)
    elif shape in ((num_ws, w_dim), (1, num_ws, w_dim)):
        t = t.reshape(num_ws, w_dim)
    else:
        raise PivotError(
            f"{path} holds a pivot of shape {list(shape)}; this generator takes [1, {num_ws}, {w_dim}], "
            f"[{num_ws}, {w_dim}] or [1, {w_dim}]"
        )
    return t.contiguous().clone()
