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

import functools
from dataclasses import dataclass
from typing import Callable

from pti.kernels import ref


@dataclass(frozen=True)
class Impl:
    name: str
    fn: Callable
    supports: Callable[..., bool]
    auto: bool = True            # False: only when asked for by name (not yet measured faster)


OPS = ("bias_act", "upfirdn2d", "conv2d_resample", "modulated_conv2d")
_REGISTRY: dict[str, list[Impl]] = {op: [] for op in OPS}
_LAST: dict[str, str] = {}


def register(op: str, name: str, fn: Callable, supports: Callable[..., bool] = lambda *a, **k: True,
             auto: bool = True) -> None:
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


def _dispatch(op: str, impl: str, args, kwargs):
    if impl == "ref":
        fn, name = getattr(ref, op), "ref"
    elif impl == "auto":
        fn, name = getattr(ref, op), "ref"
        for cand in _REGISTRY[op]:
            if cand.auto and cand.supports(*args, **kwargs):
                fn, name = cand.fn, cand.name
                break
    elif impl.startswith("prefer:"):  # a whole network: NAME wherever it exists and takes the inputs, else the reference
        fn, name = getattr(ref, op), "ref"
        for cand in _REGISTRY[op]:
            if cand.name == impl.removeprefix("prefer:") and cand.supports(*args, **kwargs):
                fn, name = cand.fn, cand.name
                break
    else:
        match = [i for i in _REGISTRY[op] if i.name == impl]
        if not match:
            raise ValueError(f"no implementation {impl!r} of {op}; available: {', '.join(available(op))}")
        if not match[0].supports(*args, **kwargs):
            raise ValueError(f"implementation {impl!r} of {op} cannot run these inputs")
        fn, name = match[0].fn, impl
    _LAST[op] = name
    return fn(*args, **kwargs)


def bias_act(x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None, impl="auto"):
    """Bias, activation, gain and clamp in one op (see `ref.bias_act`)."""
    return _dispatch("bias_act", impl, (x, b), dict(dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp))


def upfirdn2d(x, f, up=1, down=1, padding=0, flip_filter=False, gain=1, impl="auto"):
    """Upsample, pad, FIR-filter, downsample (see `ref.upfirdn2d`)."""
    return _dispatch("upfirdn2d", impl, (x, f), dict(up=up, down=down, padding=padding, flip_filter=flip_filter, gain=gain))


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
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _triton(module: str, fn: str):
    """The op `fn` of the kernel module `pti.kernels.<module>` and its `supports`, imported on first call."""

    def supports(x, *args, **kwargs) -> bool:
        import importlib
        import os

        if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") or not _triton_available():
            return False
        return importlib.import_module(f"pti.kernels.{module}").supports(x, *args, **kwargs)

    def run(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(f"pti.kernels.{module}"), fn)(*args, **kwargs)

    return run, supports


register("modulated_conv2d", "triton", *_triton("triton_modconv", "modulated_conv2d"), auto=False)
register("bias_act", "triton", *_triton("triton_bias_act", "bias_act"), auto=False)
