"""Shared by every config dataclass: field rules with one-line errors, and seeded random generators.

`check_fields(cfg, {"steps": whole(1), "lr": real(0, above=True), ...})` in a frozen dataclass's
`__post_init__` refuses a bad value with a ValueError that names the config, the field, the rule and
the value, so a mistyped setting fails at construction instead of deep inside a run.
"""

from __future__ import annotations

import importlib.util
import math
import os
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pti.errors import PTIError

from pti.kernels.precision import PRECISIONS  # noqa: F401  (defined there; importable here too)

ProgressFn = Callable[[str, int, int, dict], None]  # (phase, step, total, values): what long runs report


@dataclass(frozen=True)
class Rule:
    """What a config field accepts: `ok(value)`, and `text` for the error message."""

    ok: Callable[[Any], bool]
    text: str


def whole(low: int, high: int | None = None, optional: bool = False) -> Rule:
    """A whole number (not a bool) in [low, high]; `optional` also accepts None."""

    def ok(v) -> bool:
        if v is None:
            return optional
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and low <= v and (high is None or v <= high)

    text = (
        f"a whole number >= {low}"
        + (f" and <= {high}" if high is not None else "")
        + (" (or None)" if optional else "")
    )
    return Rule(ok, text)


def one_of(*choices) -> Rule:
    """Exactly one of `choices` (of the same type: 1 is not True)."""
    return Rule(
        lambda v: any(v == c and type(v) is type(c) for c in choices), "one of " + ", ".join(map(repr, choices))
    )


def real(low: float, high: float | None = None, above: bool = False) -> Rule:
    """A finite number >= low (> low when `above`) and <= high."""

    def ok(v) -> bool:
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
            return False
        return (v > low if above else v >= low) and (high is None or v <= high)

    return Rule(ok, f"a finite number {'>' if above else '>='} {low}" + (f" and <= {high}" if high is not None else ""))


def instance_of(*types: type, optional: bool = False) -> Rule:
    """An instance of one of `types` (a bool is not an int unless `bool` is named); `optional` also accepts None."""

    def ok(v) -> bool:
        if v is None:
            return optional
        return isinstance(v, types) and (bool in types or not isinstance(v, bool))

    return Rule(ok, "a " + " or ".join(t.__name__ for t in types) + (" (or None)" if optional else ""))


def check_fields(cfg, rules: dict[str, Rule]) -> None:
    """ValueError naming the first field of the config `cfg` that breaks its rule."""
    for name, rule in rules.items():
        value = getattr(cfg, name)
        if not rule.ok(value):
            raise ValueError(f"{type(cfg).__name__}.{name} must be {rule.text}, got {value!r}")


def seeded_generator(seed: int | None, device) -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed`; None seeds it nondeterministically."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


# The precision names are defined once, in `pti.kernels.precision` (fp32, tf32, bf16; the flags each sets);
# an export stores and runs its weights in fp32 or fp16 (the generator's own fp16 blocks, which deployment
# runtimes run fast).
EXPORT_PRECISIONS = ("fp32", "fp16")

# ---------------------------------------------------------------------------- the implementation setting
#
#   ref      the reference ops, eager: the faithful path that reproduces the authors' PTI step for step
#   compile  torch.compile of the inversion and tuning steps (synthesis forward and backward, the
#            perceptual losses, the locality pass); the compile cache in the user cache folder
#   triton   the Triton kernels where they take the layer (CUDA; the reference ops elsewhere)
#   auto     per device kind, what the benchmarks showed fastest at parity (AUTO_IMPL below)
IMPLS = ("auto", "ref", "compile", "triton")

# What "auto" runs, per device kind, and the measurement it rests on.
# - cpu: ref. benchmarks/results/tune_cpu.json (2-core Xeon, one run): a compiled tuning step is 1.2-1.3x
#   faster per step, but compiling costs 60-90 s, more than a whole single-photo run saves; the Triton
#   kernels run on CPUs only in their interpreter.
# - cuda: ref until a GPU run of benchmarks/gpu_check.sh measures compile and triton at parity (no GPU has
#   been lent yet; issue 18's note says what remains).
AUTO_IMPL = {"cpu": "ref", "cuda": "ref"}


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation that runs for the setting `impl` on `device`: `impl` itself, or AUTO_IMPL's choice."""
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    chosen = AUTO_IMPL.get(device.type, "ref") if impl == "auto" else impl
    if chosen == "triton":
        if importlib.util.find_spec("triton") is None:
            raise PTIError("--impl triton needs Triton (pip install triton, or pti[kernels]); use --impl ref or auto")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise PTIError(
                f"--impl triton runs its kernels on CUDA GPUs, and this run is on {device.type} "
                "(TRITON_INTERPRET=1 runs them in Triton's interpreter, for tests); use --impl ref or auto"
            )
    return chosen
