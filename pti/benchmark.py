"""`pti bench`: render throughput and tuning time per implementation and precision, against the hardware.

Render: images per second at each batch for one generator config, per implementation:
- `reference`: the PyTorch reference ops (what `pti render --backend torch` runs);
- `triton`: the same network with `impl="prefer:triton"` (each stride-1 layer as one Triton kernel:
  modulated conv, noise, bias, activation, gain, clamp; the other epilogues on the Triton bias_act; the
  up-sampling convolutions on the reference; CUDA only);
- `cudagraph`, `triton-cudagraph`: `reference` or `triton` recorded once per batch size into a CUDA graph
  and replayed (no per-launch CPU overhead; CUDA only);
- `compiled`: `torch.compile` of the synthesis network (with `--compile`; the compile time is reported);
- `onnx`, `aoti`: the export backends (`pti export`), the base generator exported once into a temp folder.
Tuning: seconds per inversion step, tuning step and locality-regularized tuning step, per implementation
(reference; triton too on CUDA when asked for) and precision, and
the full recipe projected from them (450 inversion + 350 tuning steps; without and with locality), plus
peak GPU memory. The weight-free losses are used (no weights needed); the paper's VGG16 + LPIPS add
about one VGG forward per inversion step.

Each measurement: one warm-up call, then `repeats` timed calls, the median reported; every implementation
runs in the same process on the same inputs. `speedup_vs_reference` is the reference's time over this
one's at the same batch and precision (above 1: faster), printed as "1.50x faster than reference" or
"1.33x slower than reference". The hardware's floor: 2 x the synthesis multiply-adds per image (about
150 GFLOP at 1024 px config-f) at the device's dense peak, for the GPUs in `PEAK_TFLOPS` (unknown
devices, and CPUs, report achieved GFLOP/s only).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from pti.engine.checkpoint import generator_hash
from pti.engine.device import apply_cpu_threads, synthesis_macs
from pti.engine.generator import Generator, tiny_generator
from pti.engine.invert import InvertConfig, invert
from pti.engine.losses import WeightFreePerceptual, WeightFreeProjectorMetric
from pti.engine.tune import TuneConfig, tune
from pti.errors import first_line
from pti.export import export
from pti.export.config import ExportConfig
from pti.export.contract import Source
from pti.export.contract import environment as versions_and_device
from pti.rendering import make_backend

CONFIGS = {
    "tiny": None,  # the built-in tiny generator
    "paper256": dict(
        z_dim=512,
        c_dim=0,
        w_dim=512,
        img_resolution=256,
        img_channels=3,
        mapping_kwargs=dict(num_layers=8),
        synthesis_kwargs=dict(channel_base=16384, channel_max=512, num_fp16_res=0, conv_clamp=256),
    ),
    "ffhq1024": dict(
        z_dim=512,
        c_dim=0,
        w_dim=512,
        img_resolution=1024,
        img_channels=3,
        mapping_kwargs=dict(num_layers=8),
        synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256),
    ),
}
# Dense peak TFLOP/s by device name (fp32 without tensor cores, bf16/fp16 with), from the vendors' sheets.
PEAK_TFLOPS = {
    "H100": {"fp32": 67.0, "bf16": 989.0},
    "H200": {"fp32": 67.0, "bf16": 989.0},
    "A100": {"fp32": 19.5, "bf16": 312.0},
    "RTX 2080": {"fp32": 10.1, "bf16": 40.3},  # fp16 tensor cores with fp32 accumulate (no bf16 on Turing)
}
RECIPE = {"invert": 450, "tune": 350}


def build(config: str, device="cpu"):
    if CONFIGS[config] is None:
        return tiny_generator(device)
    torch.manual_seed(0)
    return Generator(**copy.deepcopy(CONFIGS[config])).eval().requires_grad_(False).to(device)


def peak(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table["fp32" if precision == "fp32" else "bf16"]
    return None


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up (and lazy initialization)
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def render_rows(G, device, batches, impls, repeats, precision="fp32", progress=print) -> list[dict]:
    flop = 2 * synthesis_macs(G)
    top = peak(device, precision)
    rows = []
    runners: dict[str, Callable] = {}
    setup: dict[str, float] = {}
    dtype_ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else None

    def eager(impl):
        def run(ws):
            with torch.no_grad():
                if dtype_ctx is None:
                    return G.synthesis(ws, noise_mode="const", force_fp32=True, impl=impl)
                with dtype_ctx():
                    return G.synthesis(ws, noise_mode="const", force_fp32=True, impl=impl)

        return run

    for impl in impls:
        t0 = time.perf_counter()
        if impl in ("triton", "cudagraph", "triton-cudagraph") and device.type != "cuda":
            progress(f"{impl}: needs a CUDA device; skipped")
            continue
        if impl == "reference":
            runners[impl] = eager("ref")
        elif impl == "triton":
            runners[impl] = eager("prefer:triton")
        elif impl in ("cudagraph", "triton-cudagraph"):
            runners[impl] = cuda_graphed(eager("prefer:triton" if impl.startswith("triton") else "ref"), device)
        elif impl == "compiled":
            compiled = torch.compile(G.synthesis)
            runners[impl] = lambda ws, c=compiled: c(ws, noise_mode="const", force_fp32=True, impl="ref")
        elif impl in ("onnx", "aoti"):
            tmp = tempfile.mkdtemp(prefix=f"pti-bench-{impl}-")
            backend = make_backend(
                impl, G, G, generator_hash(G), device, max(batches), engine=_export(impl, G, device, tmp, max(batches))
            )
            runners[impl] = backend.render
        else:
            raise ValueError(f"unknown implementation {impl!r}")
        setup[impl] = time.perf_counter() - t0
    for batch in batches:
        with torch.no_grad():
            ws = G.mapping(
                torch.randn([batch, G.z_dim], generator=torch.Generator().manual_seed(0)).to(device), truncation_psi=0.7
            )
        base = None
        for impl, run in runners.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                times = _time(lambda: run(ws), device, repeats)
            except Exception as e:  # noqa: BLE001  one implementation failing must not end the suite
                progress(f"{impl} batch {batch}: failed ({first_line(e, 120)})")
                continue
            med = statistics.median(times)
            base = base if base is not None else med if impl == "reference" else None
            achieved = flop * batch / med / 1e9
            row = dict(
                kind="render",
                implementation=impl,
                precision=precision,
                batch=batch,
                images_per_second=round(batch / med, 2),
                ms_per_image=round(1000 * med / batch, 3),
                gflops_achieved=round(achieved, 1),
                gflop_per_image=round(flop / 1e9, 2),
                percent_of_peak=None if top is None else round(100 * achieved / (1000 * top), 2),
                speedup_vs_reference=None if base is None else round(base / med, 3),
                setup_seconds=round(setup.get(impl, 0.0), 1),
                peak_memory_gb=round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
                if device.type == "cuda"
                else None,
            )
            rows.append(row)
            progress(
                f"render {impl:10s} {precision} batch {batch:3d}: {row['images_per_second']:9.2f} img/s "
                f"({row['ms_per_image']:.2f} ms/img, {row['gflops_achieved']:.0f} GFLOP/s"
                + ("" if row["percent_of_peak"] is None else f", {row['percent_of_peak']:.1f} % of peak")
                + ("" if base is None or impl == "reference" else f", {compared(base / med)}")
                + ")"
            )
    return rows


def compared(speedup: float) -> str:
    """`speedup` (reference time / this time) in words that say which way: "1.33x slower than reference"."""
    factor = speedup if speedup >= 1 else 1 / speedup
    if f"{factor:.2f}" == "1.00":
        return "same speed as reference"
    return f"{factor:.2f}x {'faster' if speedup > 1 else 'slower'} than reference"


def cuda_graphed(fn: Callable, device: torch.device) -> Callable:
    """`fn(ws) -> images` replayed from a CUDA graph, one per input shape: the whole synthesis network's
    launches recorded once (after warm-up calls on a side stream, which also compile Triton kernels), then
    each call copies ws into the graph's static input and replays. Needs constant noise (no RNG inside)."""
    graphs: dict[tuple, tuple] = {}

    def run(ws):
        key = (tuple(ws.shape), ws.dtype)
        if key not in graphs:
            static_in = ws.clone()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn(static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = fn(static_in)
            graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = graphs[key]
        static_in.copy_(ws)
        graph.replay()
        return static_out

    return run


def _export(kind, G, device, tmp, batch):
    return export(
        kind, Source(G, generator_hash(G), "bench"), tmp, ExportConfig(batch=(1, batch, batch), device=device)
    ).parent


def tune_rows(G, device, precisions, steps, progress=print, impls=("reference",)) -> list[dict]:
    """Seconds per step of each phase (median after one warm-up step) and the projected full recipe, per
    implementation (always reference; triton too on CUDA when asked for: `G.impl = "prefer:triton"`) and
    precision."""
    rows = []
    with torch.no_grad():
        target = G.synthesis(
            G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(1)).to(device)),
            noise_mode="const",
        )
        pivot = G.mapping(
            torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(2)).to(device), truncation_psi=0.7
        )
    tuned = ["reference"] + (["triton"] if "triton" in impls and device.type == "cuda" else [])
    runs = [(impl, precision) for impl in tuned for precision in precisions]
    saved_impl = G.impl
    try:
        for impl, precision in runs:
            G.impl = "prefer:triton" if impl == "triton" else "ref"
            rows += _tune_rows_one(G, device, impl, precision, steps, target, pivot, progress)
    finally:
        G.impl = saved_impl
    return rows


def _tune_rows_one(G, device, impl, precision, steps, target, pivot, progress) -> list[dict]:
    rows = []
    per = {}
    for phase in ("invert", "tune", "tune+locality"):
        stamps = []

        def tick(*_):
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if phase == "invert":
            invert(
                G,
                target,
                WeightFreeProjectorMetric(),
                InvertConfig(steps=steps + 1, w_avg_samples=64, precision=precision),
                progress=tick,
            )
        else:
            tune(
                G,
                target,
                pivot,
                WeightFreePerceptual(),
                TuneConfig(
                    max_steps=steps + 1, lpips_threshold=0.0, precision=precision, locality=phase == "tune+locality"
                ),
                progress=tick,
            )
        per[phase] = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
        mem = round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None
        rows.append(
            dict(
                kind="tune",
                implementation=impl,
                phase=phase,
                precision=precision,
                seconds_per_step=round(per[phase], 4),
                peak_memory_gb=mem,
            )
        )
        progress(
            f"tune {impl:9s} {phase:14s} {precision}: {per[phase] * 1000:9.1f} ms/step"
            + ("" if mem is None else f", peak {mem:.2f} GB")
        )
    for locality in (False, True):
        total = RECIPE["invert"] * per["invert"] + RECIPE["tune"] * per["tune+locality" if locality else "tune"]
        rows.append(
            dict(
                kind="recipe",
                implementation=impl,
                precision=precision,
                locality=locality,
                projected_seconds=round(total, 2),
                from_steps=steps,
            )
        )
        progress(
            f"full recipe {impl} {precision} {'with' if locality else 'without'} locality: {total:.1f} s per image "
            "(projected)"
        )
    return rows


def environment(device: torch.device) -> dict:
    """The versions, machine and device (`pti.export.contract.environment`, with Triton's version when it is
    installed), the date, and the GPU and CUDA version or the CPU threads."""
    env = {**versions_and_device(device, packages=("triton",)), "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def run(
    config: str,
    device: torch.device,
    batches: list[int],
    impls: list[str],
    precisions: list[str],
    repeats: int,
    tune_steps: int,
    progress=print,
) -> dict:
    G = build(config, device)
    apply_cpu_threads(G, device, "auto")
    rows = []
    for precision in precisions:
        rows += render_rows(
            G,
            device,
            batches,
            impls if precision == "fp32" else [i for i in impls if "onnx" != i != "aoti"],
            repeats,
            precision,
            progress,
        )
    if tune_steps:
        rows += tune_rows(G, device, precisions, tune_steps, progress, impls)
    return {
        "what": "pti bench: render throughput and tuning time per implementation and precision",
        "config": config,
        "resolution": G.img_resolution,
        "environment": environment(device),
        "repeats": repeats,
        "rows": rows,
    }


def default_out(device: torch.device) -> Path:
    here = Path.cwd() / "benchmarks" / "results"
    return (here if here.is_dir() else Path.cwd()) / f"bench_{device.type}.json"
