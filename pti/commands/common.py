"""Options and helpers shared by commands. Imports nothing heavy.

Every option is checked while the command line is parsed (type, range, choices), so a bad value is
a usage error (exit 2) before any work starts, never a traceback from deep inside the engine.
"""

from __future__ import annotations

import re
import time
from enum import Enum
from typing import Annotated, Optional

import typer
from rich.console import Console

# soft_wrap: long lines (paths, values) are never broken or cut when the output is a log file.
console = Console(stderr=False, highlight=False, soft_wrap=True)

NetworkOption = Annotated[
    Optional[str],
    typer.Option(
        "--network",
        "-n",
        help="Generator checkpoint: stylegan2-ada .pkl, rosinality .pt or pti .safetensors. "
        "Default: the built-in tiny generator (random weights, for offline demos).",
    ),
]
BUILTIN_NAMES = (None, "", "builtin:tiny")


def network_label(network: str | None) -> str:
    """How output names the generator; the built-in one always says it is untrained."""
    if network in BUILTIN_NAMES:
        from pti.engine.generator import TINY_LABEL

        return TINY_LABEL
    return str(network)


def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value.lower()):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value.lower()


DeviceOption = Annotated[
    str, typer.Option("--device", callback=_check_device, help="auto (the GPU if there is one), cpu, cuda or cuda:N.")
]


# The implementation and precision names, as the help texts say them. `--help` must not import torch, so these
# are copies of pti.engine.config.IMPLS and AUTO_IMPL and pti.kernels.precision.PRECISIONS; tests/
# test_impl_setting.py checks that they are equal.
IMPLS = ("auto", "ref", "compile", "triton")
AUTO_IMPL = {"cpu": "ref", "cuda": "ref"}  # what auto runs, per device kind
PRECISIONS = ("fp32", "tf32", "bf16")


class Impl(str, Enum):  # IMPLS
    auto = "auto"
    ref = "ref"
    compile = "compile"
    triton = "triton"


class Precision(str, Enum):  # PRECISIONS: the compute precisions
    fp32 = "fp32"
    tf32 = "tf32"
    bf16 = "bf16"


def impl_help(what: str) -> str:
    """The help of `--impl` for a command whose work is `what`."""
    auto = ", ".join(f"{kind} -> {impl}" for kind, impl in AUTO_IMPL.items())
    return (
        f"The implementation of {what}: ref (the reference ops, eager: the faithful path), compile (torch.compile, "
        "compiled once and cached in the user cache), triton (the Triton kernels where they take a layer; needs "
        f"CUDA), or auto, which picks per device: {auto}."
    )


PRECISION_HELP = (
    "fp32 (the paper: float32, TF32 off), tf32 (float32 tensors, TF32 tensor-core matmuls and convolutions on "
    "GPUs; on a CPU the same as fp32) or bf16 (bfloat16 autocast, fp32 master weights)."
)


def compile_line(phase: str, step: int, values: dict, out: Console = console) -> bool:
    """Print the engine's "compile" phase as lines ("compiling the tuning step (one-time) ...", then its
    seconds); False for any other phase."""
    if phase != "compile":
        return False
    what = COMPILED.get(str(values.get("for")), f"{values.get('for', 'the')} step")
    if step == 0:
        out.print(f"compiling {what} (one-time) ...", markup=False)
    else:
        seconds = values.get("seconds")
        took = f" in {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
        out.print(f"compiled {what}{took}", markup=False)
    return True


COMPILED = {"invert": "the inversion step", "tune": "the tuning step", "render": "the synthesis network"}


def thread_setting() -> str:
    """The CLI's CPU-thread setting: $PTI_THREADS (auto | torch | N); "torch" when the user set OMP_NUM_THREADS."""
    import os

    if "PTI_THREADS" in os.environ:
        return os.environ["PTI_THREADS"]
    return "torch" if "OMP_NUM_THREADS" in os.environ else "auto"


def help_text(text: str) -> str:
    """`text` for a help string: Typer renders help as Rich markup, where the `[ray]` of `pip install 'pti[ray]'`
    is a style tag and vanishes; escaped, it prints as written (plain Click help, without Rich, needs no escape)."""
    import typer.core
    from rich.markup import escape

    return escape(text) if getattr(typer.core, "HAS_RICH", True) else text


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """'1 photo', '2 photos' ('1 identity', '3 identities' with `nouns`)."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


SEED_MAX = 2**32 - 1  # numpy's RandomState takes seeds up to 2^32 - 1


def parse_seeds(text: str) -> list[int]:
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11]; ValueError with the reason otherwise."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        try:
            lo_i, hi_i = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"cannot read {part!r}; use a list like '0-7' or '1,5,9'") from None
        if hi_i < lo_i:
            raise ValueError(f"{part!r} is an empty range")
        seeds.extend(range(lo_i, hi_i + 1))
    if not seeds:
        raise ValueError("no seeds given; use a list like '0-7' or '1,5,9'")
    if max(seeds) > SEED_MAX:
        raise ValueError(f"seeds must be between 0 and {SEED_MAX}")
    return seeds


def seeds_callback(value: str) -> str:
    try:
        parse_seeds(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return value


class PhaseProgress:
    """Progress of long phases: a live bar with the loss in a terminal, a line every tenth in a log.

    `update(phase, step, total, values)` is the engine's progress callback signature; a new phase
    (or step 1 of a phase seen before, i.e. the next photo) starts a new bar.
    """

    def __init__(self, out: Console = console, lines: int = 10):
        self.out = out
        self.lines = lines
        self.live = out.is_terminal
        self._bar = None
        self._tasks: dict[str, int] = {}
        self._started: dict[str, float] = {}

    def __enter__(self) -> "PhaseProgress":
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description:<10}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.out,
                transient=False,
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            for task in self._bar.tasks:  # an early stop ends a bar where the work ended
                self._bar.update(task.id, total=task.completed)
            self._bar.__exit__(*exc)

    def update(self, phase: str, step: int, total: int, values: dict) -> None:
        info = "  ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
        new = step <= 1 or phase not in self._started
        if new:
            self._started[phase] = time.perf_counter()
        if self._bar is not None:
            if new:
                self._tasks[phase] = self._bar.add_task(phase, total=total, info="")
            self._bar.update(self._tasks[phase], completed=step, total=total, info=info)
            return
        every = max(1, total // self.lines)
        if step == total or step % every == 0:
            seconds = time.perf_counter() - self._started[phase]
            self.out.print(f"{phase} {step}/{total}  {info}  {seconds:.1f} s")
