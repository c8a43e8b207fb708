"""Shared by every config dataclass: field rules with one-line errors, and seeded random generators.

`check_fields(cfg, {"steps": whole(1), "lr": real(0, above=True), ...})` in a frozen dataclass's
`__post_init__` refuses a bad value with a ValueError that names the config, the field, the rule and
the value, so a mistyped setting fails at construction instead of deep inside a run.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch

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


# The precision names, defined here once. Inversion, tuning and `pti bench` run their forward passes in
# fp32 (the paper) or under bf16 autocast (`autocast` below); an export stores and runs its weights in fp32
# or fp16 (the generator's own fp16 blocks, which deployment runtimes run fast).
PRECISIONS = ("fp32", "bf16")
EXPORT_PRECISIONS = ("fp32", "fp16")


def autocast(device: torch.device, precision: str):
    """The forward passes' precision: "fp32" as is; "bf16" under autocast (bfloat16 matmuls and convolutions,
    float32 master weights, optimizer state and reductions; bfloat16 keeps float32's range, so no loss scaling)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
