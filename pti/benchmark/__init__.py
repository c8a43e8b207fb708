"""`pti bench`: render throughput and tuning time per implementation and precision, against the hardware.

Render: images per second at each batch for one generator config, per implementation (`IMPLS`):
- `ref`: the PyTorch reference ops, eager (what `pti render --impl ref` runs);
- `triton`: the same network with `impl="prefer:triton"` (the Triton kernels where they take a layer; CUDA,
  or CPU under TRITON_INTERPRET=1, whose rows are marked `interpreter` and never counted as speed);
- `compile`: `pti.engine.speed.compiled_synthesis` (torch.compile); its one-time compile is timed apart;
- `auto`: what `pti.engine.config.resolve_impl` picks on this device, recorded as that;
- `onnx`, `aoti`: the export backends (`pti export`), the base generator exported once into a temp folder.
Each of ref, compile and triton runs eager and, with `cuda_graphs` "on" or "both" on CUDA, replayed from a
CUDA graph (`pti.engine.cudagraph`); on CUDA the compile mode "reduce-overhead" replays graphs of its own,
which its rows say (`graphs_by`).
Tuning: seconds per inversion step, tuning step and locality-regularized tuning step, per implementation
(ref, compile, triton) and precision, and the full recipe projected from them (450 inversion + 350 tuning
steps; without and with locality), plus peak GPU memory. The weight-free losses are used (no weights
needed); the paper's VGG16 + LPIPS add about one VGG forward per inversion step.

Every measurement runs inside `precision_scope(precision, device)` (fp32: TF32 off; tf32: on; bf16: autocast)
and `torch.no_grad()` (render), and is timed the same way: one first call (compiling, recording a graph or
JIT-compiling kernels: its seconds are `first_call_seconds`, and `compile_seconds` for compile), `warmup`
untimed calls, then `repeats` timed calls; the median is reported with the spread. Every row says what ran:
implementation (resolved) and requested, cuda_graph, precision, the flags in effect inside the scope,
the device's name and the thread count; a row that could not run says why in one line (status "failed",
"refused" or "skipped") and the run goes on. `speedup_vs_reference` is the eager ref's time over this one's
at the same batch and precision (above 1: faster). The hardware's floor: 2 x the synthesis multiply-adds per
image (about 150 GFLOP at 1024 px config-f) at the device's dense peak for the precision, for the GPUs in
`PEAK_TFLOPS` (unknown devices, and CPUs, report achieved GFLOP/s only). Render rows also give
`max_abs_diff_vs_ref_fp32`: the largest pixel difference from the eager fp32 reference, a check that each
row computed what it says (about 1e-6 for fp32, 1e-2 for bf16 at the tiny generator's scale).

The package: `machine` (generator configs, the device's name, peak and free memory, timing and memory
counting), `render` and `tuning` (the rows), and here the whole run (`run`) and its results document.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from pti.benchmark.machine import (
    CONFIGS,
    CUDA_GRAPHS,
    IMPLS,
    PEAK_TFLOPS,
    PHASES,
    RECIPE,
    available_bytes,
    build,
    device_name,
    peak,
    render_bytes,
)
from pti.benchmark.render import compared, render_rows, renderer, scoped
from pti.benchmark.tuning import tune_rows
from pti.engine.config import resolve_impl
from pti.engine.cudagraph import cuda_graphed
from pti.engine.device import apply_cpu_threads
from pti.export.contract import environment as versions_and_device
from pti.kernels.precision import PRECISIONS

__all__ = [  # what the CLI, the benchmarks/ scripts and the tests use
    "CONFIGS",
    "CUDA_GRAPHS",
    "IMPLS",
    "PEAK_TFLOPS",
    "PHASES",
    "RECIPE",
    "available_bytes",
    "build",
    "compared",
    "cuda_graphed",  # pti.engine.cudagraph's
    "default_out",
    "device_name",
    "environment",
    "header",
    "peak",
    "problems",
    "render_bytes",
    "render_rows",
    "renderer",
    "run",
    "scoped",
    "tune_rows",
]


def environment(device: torch.device) -> dict:
    """The versions, machine and device (`pti.export.contract.environment`, with Triton's version when it is
    installed), the date, the device's name and the thread count, and the CUDA version on a GPU."""
    env = {**versions_and_device(device, packages=("triton",)), "date": time.strftime("%Y-%m-%d")}
    env["device_name"] = device_name(device)
    env["threads"] = torch.get_num_threads()
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def header(config: str, G, device: torch.device, **settings) -> dict:
    """A results document without rows: what was measured, on what, with which settings."""
    return {
        "what": "pti bench: render throughput and tuning time per implementation and precision",
        "config": config,
        "resolution": G.img_resolution,
        "environment": environment(device),
        "auto": resolve_impl("auto", device),  # what --impl auto runs on this device
        **settings,
        "rows": [],
        "complete": False,
    }


def run(
    config: str,
    device: torch.device,
    batches: list[int],
    impls: list[str],
    precisions: list[str],
    repeats: int = 5,
    tune_steps: int = 5,
    cuda_graphs: str = "off",
    warmup: int = 2,
    threads: str = "auto",
    progress: Callable[[str], None] = print,
    save: Callable[[dict], None] | None = None,
) -> dict:
    """Render rows, then tuning rows (`tune_steps` timed steps per phase; 0: none). `save(doc)` is called
    after every row and at the end (`complete` true), so an interrupted run keeps what it measured."""
    bad = [p for p in precisions if p not in PRECISIONS] + [i for i in impls if i not in IMPLS]
    if bad or cuda_graphs not in CUDA_GRAPHS:
        raise ValueError(f"unknown setting {(bad or [cuda_graphs])[0]!r}")
    G = build(config, device)
    apply_cpu_threads(G, device, threads)
    doc = header(config, G, device, repeats=repeats, warmup=warmup, cuda_graphs=cuda_graphs)

    def on_row(row: dict) -> None:
        doc["rows"].append(row)
        if save is not None:
            save(doc)

    render_rows(G, device, batches, impls, precisions, cuda_graphs, repeats, warmup, progress, on_row)
    if tune_steps:
        tune_rows(G, device, impls, precisions, tune_steps, 1, progress, on_row)
    doc["complete"] = True
    if save is not None:
        save(doc)
    return doc


def problems(doc: dict) -> list[dict]:
    """The rows that did not run as asked: failed or refused (skipped ones do not apply to this machine)."""
    return [r for r in doc["rows"] if r.get("status") in ("failed", "refused")]


def default_out(device: torch.device) -> Path:
    """The results file when none is named: in the current folder, never the checkout's committed
    benchmarks/results/ (which are replaced on purpose, with -o)."""
    return Path.cwd() / f"bench_{device.type}.json"
