"""How a step runs: the implementation setting (`pti.engine.config.IMPLS`) applied, and what ran, recorded.

- `ref`: the functions as written, eager, the reference ops (`G.impl = "ref"`): the faithful path.
- `triton`: the same functions, eager, with the generator on `G.impl = "prefer:triton"` (the Triton kernels
  where they take a layer, the reference elsewhere; which ran is counted per op).
- `compile`: the same functions through `torch.compile` (AOTAutograd compiles their backward too). Each
  function is compiled once per process and device kind (`compiled`), with the generator's synthesis
  network an argument, so a new tuned copy of it per photo reuses the compiled code instead of compiling
  again. Inductor's cache lives in the user cache folder (`compile_cache_dir`), so a later process reuses
  what an earlier one compiled. On CUDA the mode is "reduce-overhead" (CUDA graphs for the step).

`StepRunner` is what `invert` and `tune` hold: `runner.call(name, fn, *args)` runs `fn` the way the
setting says and times the first compiled call (the one-time compile), and `runner.record()` is the
dict a result stores ("impl" in report.json).
"""

from __future__ import annotations

import contextlib
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch

from pti import kernels
from pti.engine.config import ProgressFn, resolve_impl
from pti.fsutil import default_cache_dir
from pti.kernels.precision import flags, tf32_scope

CUDA_COMPILE_MODE = "reduce-overhead"  # CUDA graphs through torch.compile (not measured on a GPU yet)
_COMPILED: dict[tuple, Callable] = {}


def _inductor_default() -> str:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default  # noqa: PLC0415

    return os.path.abspath(inductor_default())


def compile_cache_dir() -> Path:
    """Where torch.compile keeps what it compiled: $TORCHINDUCTOR_CACHE_DIR when the user set it, else the
    user cache folder's `compile/`. Inductor writes its own default folder into the variable the first time
    it runs in a process; that value is not the user's, and does not count."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env and os.path.abspath(env) != _inductor_default():
        return Path(env)
    return default_cache_dir() / "compile"


@contextlib.contextmanager
def cache_env():
    """Inductor's cache in `compile_cache_dir()` for the block, and the process's environment (which every
    process it starts inherits) as it was afterwards. Compiling is lazy (a backward compiles at its first
    call), so this spans the whole phase that runs compiled code, not only the compile call."""
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved


def structure(*modules) -> tuple:
    """What a compiled function is specialised on, beyond the tensors' shapes: the modules' types and their
    parameters' names and shapes. Networks of one structure (every tuned copy of one base) share one
    compiled function; another structure gets its own, so no single function collects recompilations
    until torch's recompile limit makes it run eagerly without saying so."""
    key = []
    for m in modules:
        net = getattr(m, "net", m)  # a perceptual wrapper holds its network as .net
        params = (
            tuple((n, tuple(p.shape)) for n, p in net.named_parameters()) if hasattr(net, "named_parameters") else ()
        )
        key.append((type(m).__qualname__, params))
    return tuple(key)


def compiled(fn: Callable, device: torch.device, key: tuple = ()) -> Callable:
    """`fn` compiled by torch.compile for `device`'s kind and `key` (`structure` of its module arguments),
    once per process (the compile cache in the user cache folder)."""
    key = (fn, device.type, key)
    if key not in _COMPILED:
        mode = CUDA_COMPILE_MODE if device.type == "cuda" else None
        with cache_env():
            _COMPILED[key] = torch.compile(fn, mode=mode, dynamic=False)
    return _COMPILED[key]


def _synthesize(synthesis, ws, noise_mode="random", force_fp32=False, fused_modconv=None):
    return synthesis(ws, noise_mode=noise_mode, force_fp32=force_fp32, fused_modconv=fused_modconv, impl="ref")


def compiled_synthesis(G, device: torch.device) -> Callable:
    """`G.synthesis` (or a synthesis network) compiled, as a callable with the synthesis signature
    `(ws, noise_mode=..., force_fp32=..., fused_modconv=...)`, for rendering and benchmarks. The network
    runs the reference ops inside the compiled code (whatever its `impl`), and one compile serves each
    batch size (dynamic=False: a new batch size compiles again)."""
    synthesis = getattr(G, "synthesis", G)
    fn = compiled(_synthesize, device, structure(synthesis))

    def run(ws, noise_mode="random", force_fp32=False, fused_modconv=None):
        with cache_env():
            return fn(synthesis, ws, noise_mode, force_fp32, fused_modconv)

    return run


class StepRunner:
    """Runs a phase's step functions per the implementation setting, inside the precision's TF32 flags,
    and records what ran."""

    def __init__(
        self,
        impl: str,
        precision: str,
        device: torch.device,
        phase: str,
        progress: ProgressFn | None = None,
        modules: tuple = (),
    ):
        """`modules`: the step functions' module arguments (the synthesis network, the loss), which a
        compiled function is specialised on (`structure`)."""
        self.requested = impl
        self.impl = resolve_impl(impl, device)
        self.precision = precision
        self.device = device
        self.phase = phase
        self.progress = progress
        self.compile_seconds: float | None = None
        self._key = structure(*modules) if self.impl == "compile" else ()
        self._first = True
        self._stack = ExitStack()
        self._ops: dict[str, dict[str, int]] = {}
        self._flags: dict = {}

    def network_impl(self) -> str:
        """What `G.impl` must be for this setting."""
        return "prefer:triton" if self.impl == "triton" else "ref"

    def __enter__(self) -> "StepRunner":
        self._stack.enter_context(tf32_scope(self.precision))
        if self.impl == "compile":
            self._stack.enter_context(cache_env())
        if self.impl != "compile":
            self._ops = self._stack.enter_context(kernels.recording())
        self._flags = flags()
        if self.precision == "bf16":  # autocast is entered around each forward pass (autocast_scope), not here
            self._flags["autocast"] = f"{self.device.type}:bfloat16"
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def fn(self, fn: Callable) -> Callable:
        """`fn` as this setting runs it: itself, or compiled."""
        return compiled(fn, self.device, self._key) if self.impl == "compile" else fn

    def step(self):
        """Context for each step. Under compile, the first is when the compiling happens, so it is timed and
        reported (progress phase "compile"); on CUDA each step begins a new CUDA-graph step (the previous
        step's graph outputs may then be overwritten, as torch's reduce-overhead mode requires)."""
        runner = self

        class _Step:
            def __enter__(self):
                self.on = runner.impl == "compile" and runner._first
                runner._first = False
                if runner.impl == "compile" and runner.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                if self.on:
                    if runner.progress is not None:
                        runner.progress("compile", 0, 1, {"for": runner.phase})
                    self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if self.on and exc[0] is None:
                    if runner.device.type == "cuda":
                        torch.cuda.synchronize(runner.device)
                    runner.compile_seconds = time.perf_counter() - self.t0
                    if runner.progress is not None:
                        runner.progress("compile", 1, 1, {"for": runner.phase, "seconds": runner.compile_seconds})

        return _Step()

    def record(self) -> dict:
        """What ran: the setting asked for and what it resolved to, the ops per implementation (eager runs),
        the precision and the flags in effect, and the first compiled step's seconds (compiling included)."""
        return {
            "requested": self.requested,
            "impl": self.impl,
            "ops": {op: dict(sorted(names.items())) for op, names in sorted(self._ops.items())},
            "precision": self.precision,
            "flags": self._flags,
            "compile_seconds": None if self.compile_seconds is None else round(self.compile_seconds, 3),
        }
