"""Ops behind one `impl=` switch: the reference (`ref.py`) is the definition, kernels plug in.

Every op here takes `impl="auto" | "ref" | <registered name>`:
- "ref" always runs the pure-PyTorch reference;
- "auto" runs the first registered fast implementation that accepts the inputs (for example a
  Triton kernel on CUDA tensors) and otherwise the reference;
- a registered name runs that implementation, and fails loudly if it cannot take the inputs;
- "prefer:NAME" runs NAME where it exists and takes the inputs, else the reference: how a whole network
  (`G.impl = "prefer:triton"`) uses a kernel that covers only some of its layers.

A fast implementation registers itself with `register(op, name, fn, supports)` where
`supports(*args, **kwargs) -> bool` says whether it can run these inputs. The generator never
changes when kernels arrive. `chosen()` reports which implementation ran last for each op, so a
benchmark can state what it measured.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from pti.kernels import ref


@dataclass(frozen=True)
class Impl:
    name: str
    fn: Callable
    supports: Callable[..., bool]
    auto: bool = True  # False: only when asked for by name (not yet measured faster)


OPS = ("bias_act", "upfirdn2d", "conv2d_resample", "modulated_conv2d", "modulated_conv2d_act")
_REGISTRY: dict[str, list[Impl]] = {op: [] for op in OPS}
_LAST: dict[str, str] = {}
_RECORDS: list[dict[str, dict[str, int]]] = []  # open `recording()` blocks: {op: {implementation: calls}}


def register(
    op: str, name: str, fn: Callable, supports: Callable[..., bool] = lambda *a, **k: True, auto: bool = True
) -> None:
    """Add a fast implementation of `op`. Later registrations take precedence under "auto"; `auto=False`
    keeps it out of "auto" (it runs only when asked for by name) until it has been measured faster."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    if name == "ref" or name == "auto":
        raise ValueError(f"{name!r} is reserved")
    _REGISTRY[op] = [i for i in _REGISTRY[op] if i.name != name]
    _REGISTRY[op].insert(0, Impl(name, fn, supports, auto))


def available(op: str) -> list[str]:
    """Names of the implementations of `op`, reference last."""
    return [i.name for i in _REGISTRY[op]] + ["ref"]


def chosen() -> dict[str, str]:
    """Which implementation each op ran last ({op: name})."""
    return dict(_LAST)


@contextlib.contextmanager
def recording():
    """Count, for the block, which implementation ran each op: yields {op: {name: calls}} (filled as it runs;
    a fused layer that ran split counts as "split"). What a result records as the ops that actually ran."""
    counts: dict[str, dict[str, int]] = {}
    _RECORDS.append(counts)
    try:
        yield counts
    finally:
        _RECORDS.remove(counts)


def _ran(op: str, name: str) -> None:
    if torch.compiler.is_compiling():  # bookkeeping inside compiled code would become a guard: a recompile
        return
    _LAST[op] = name
    for counts in _RECORDS:
        per = counts.setdefault(op, {})
        per[name] = per.get(name, 0) + 1


def _is_name(impl: str) -> bool:
    """Whether `impl` names one implementation outright (not "ref", "auto" or "prefer:NAME")."""
    return impl not in ("ref", "auto") and not impl.startswith("prefer:")


def _pick(op: str, impl: str, args, kwargs) -> Impl | None:
    """The registered implementation that runs `op` on these inputs, or None for the reference:

    "ref"          None
    "auto"         the first registered with auto=True whose `supports` takes the inputs, else None
    "prefer:NAME"  NAME if it is registered for `op` and takes the inputs, else None (how a whole network
                   uses a kernel that covers only some of its layers)
    "NAME"         NAME; ValueError if it is not registered for `op` or cannot take the inputs
    """
    if impl == "ref":
        return None
    if impl == "auto":
        return next((c for c in _REGISTRY[op] if c.auto and c.supports(*args, **kwargs)), None)
    if impl.startswith("prefer:"):
        name = impl.removeprefix("prefer:")
        return next((c for c in _REGISTRY[op] if c.name == name and c.supports(*args, **kwargs)), None)
    match = [i for i in _REGISTRY[op] if i.name == impl]
    if not match:
        raise ValueError(f"no implementation {impl!r} of {op}; available: {', '.join(available(op))}")
    if not match[0].supports(*args, **kwargs):
        raise ValueError(f"implementation {impl!r} of {op} cannot run these inputs")
    return match[0]


def _dispatch(op: str, impl: str, args, kwargs):
    cand = _pick(op, impl, args, kwargs)
    _ran(op, cand.name if cand else "ref")
    return (cand.fn if cand else getattr(ref, op))(*args, **kwargs)


def bias_act(x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None, impl="auto"):
    """Bias, activation, gain and clamp in one op (see `ref.bias_act`)."""
    return _dispatch("bias_act", impl, (x, b), dict(dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp))


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1, impl="auto"):
    """Upsample, pad, FIR-filter, downsample (see `ref.upfirdn2d`)."""
    return _dispatch(
        "upfirdn2d", impl, (x, f), dict(up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain)
    )


def conv2d_resample(x, w, f=None, up=1, down=1, padding=0, groups=1, flip_weight=True, flip_filter=False, impl="auto"):
    """Convolution with FIR up/downsampling (see `ref.conv2d_resample`)."""
    kw = dict(f=f, up=up, down=down, padding=padding, groups=groups, flip_weight=flip_weight, flip_filter=flip_filter)
    return _dispatch("conv2d_resample", impl, (x, w), kw)


def modulated_conv2d(
    x,
    weight,
    styles,
    noise=None,
    up=1,
    padding=0,
    resample_filter=None,
    demodulate=True,
    flip_weight=True,
    fused_modconv=True,
    impl="auto",
):
    """StyleGAN2 modulated convolution (see `ref.modulated_conv2d`)."""
    kw = dict(
        noise=noise,
        up=up,
        padding=padding,
        resample_filter=resample_filter,
        demodulate=demodulate,
        flip_weight=flip_weight,
        fused_modconv=fused_modconv,
    )
    return _dispatch("modulated_conv2d", impl, (x, weight, styles), kw)


def modulated_conv2d_act(
    x,
    weight,
    styles,
    noise=None,
    up=1,
    padding=0,
    resample_filter=None,
    demodulate=True,
    flip_weight=True,
    fused_modconv=True,
    bias=None,
    act="linear",
    alpha=None,
    gain=None,
    clamp=None,
    impl="auto",
):
    """A whole synthesis layer: `modulated_conv2d`, then `bias_act(bias, act, alpha, gain, clamp)`.

    It runs as one fused kernel or "split" (the two ops, each dispatched with this same `impl`):

        impl                         the layer runs as
        "ref"                        split: the reference ops, bit for bit
        "auto"                       the first fused kernel in "auto" that takes the inputs, else split
        "prefer:NAME"                NAME's fused kernel if it takes the inputs, else split (NAME's op kernels
                                     where they take the inputs, the reference where not)
        "NAME", a fused kernel       that kernel; ValueError if it cannot take the inputs
        "NAME", op kernels only      split: NAME's op kernels, each failing loudly if it cannot take the inputs

    The first four lines are `_pick`'s rule, the same as for every op. `chosen()["modulated_conv2d_act"]`
    is the fused kernel's name, or "split"."""
    args = (x, weight, styles)
    kw = dict(
        noise=noise,
        up=up,
        padding=padding,
        resample_filter=resample_filter,
        demodulate=demodulate,
        flip_weight=flip_weight,
        fused_modconv=fused_modconv,
        bias=bias,
        act=act,
        alpha=alpha,
        gain=gain,
        clamp=clamp,
    )
    only_ops = _is_name(impl) and impl not in available("modulated_conv2d_act")  # the table's last line
    cand = None if only_ops else _pick("modulated_conv2d_act", impl, args, kw)
    if cand is not None:
        _ran("modulated_conv2d_act", cand.name)
        return cand.fn(*args, **kw)
    _ran("modulated_conv2d_act", "split")
    y = modulated_conv2d(
        x,
        weight,
        styles,
        noise=noise,
        up=up,
        padding=padding,
        resample_filter=resample_filter,
        demodulate=demodulate,
        flip_weight=flip_weight,
        fused_modconv=fused_modconv,
        impl=impl,
    )
    b = None if bias is None else bias.to(y.dtype)
    return bias_act(y, b, act=act, alpha=alpha, gain=gain, clamp=clamp, impl=impl)


def upsample2d(x, f, up=2, impl="auto"):
    """Upsample by `up` with FIR filter f to exactly up x the size (the skip path's op): upfirdn2d
    with the padding `ref.upsample_padding` (shared with conv2d_resample) and gain up^2."""
    return upfirdn2d(x, f, up=up, padding=ref.upsample_padding(f, up), gain=up * up, impl=impl)


setup_filter = ref.setup_filter
activation_gain = ref.activation_gain


# ----------------------------------------------------------------------------- Triton kernels (pti.kernels.triton_*)
# Imported on first use, so that importing the generator never imports Triton. They run on CUDA tensors, and on
# CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 before the kernel module is imported: how CI tests
# them). Not in "auto" until measured faster on a GPU: ask for them with impl="triton".


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:  # asked per layer under impl="prefer:triton": look once
    return importlib.util.find_spec("triton") is not None


def _triton(module: str, fn: str, supports_fn: str = "supports"):
    """The op `fn` of the kernel module `pti.kernels.<module>` and its `supports`, imported on first call."""

    def supports(x, *args, **kwargs) -> bool:
        if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") or not _triton_available():
            return False
        return getattr(importlib.import_module(f"pti.kernels.{module}"), supports_fn)(x, *args, **kwargs)

    def run(*args, **kwargs):
        return getattr(importlib.import_module(f"pti.kernels.{module}"), fn)(*args, **kwargs)

    return run, supports


register("modulated_conv2d", "triton", *_triton("triton_modconv", "modulated_conv2d"), auto=False)
register("bias_act", "triton", *_triton("triton_bias_act", "bias_act"), auto=False)
register("upfirdn2d", "triton", *_triton("triton_upfirdn", "upfirdn2d"), auto=False)
register(
    "modulated_conv2d_act", "triton", *_triton("triton_modconv", "modulated_conv2d_act", "supports_act"), auto=False
)
