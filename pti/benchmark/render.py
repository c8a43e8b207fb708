"""Render throughput per implementation, CUDA graph or not, precision and batch (see `pti.benchmark`)."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from typing import Callable

import torch

from pti import kernels
from pti.benchmark.machine import (
    TORCH_IMPLS,
    Memory,
    common_fields,
    free,
    peak,
    refusal,
    sync,
    timed,
    unavailable,
)
from pti.engine.checkpoint import generator_hash
from pti.engine.config import resolve_impl
from pti.engine.cudagraph import cuda_graphed
from pti.engine.device import synthesis_macs
from pti.engine.speed import CUDA_COMPILE_MODE, compiled_synthesis
from pti.errors import first_line
from pti.export import export
from pti.export.config import ExportConfig
from pti.export.contract import Source
from pti.kernels.precision import flags, precision_scope
from pti.rendering import make_backend


def renderer(G, impl: str, device: torch.device, max_batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`render(ws) -> images` for `impl` (resolved: ref, compile, triton, onnx, aoti), without the precision
    scope or no_grad (`scoped` adds them). onnx and aoti export the generator into a temp folder first."""
    if impl in ("ref", "triton"):
        net = "ref" if impl == "ref" else "prefer:triton"
        return lambda ws: G.synthesis(ws, noise_mode="const", force_fp32=True, impl=net)
    if impl == "compile":
        compiled = compiled_synthesis(G, device)
        return lambda ws: compiled(ws, noise_mode="const", force_fp32=True)
    if impl in ("onnx", "aoti"):
        tmp = tempfile.mkdtemp(prefix=f"pti-bench-{impl}-")
        source = Source(G, generator_hash(G), "bench")
        try:
            folder = export(impl, source, tmp, ExportConfig(batch=(1, max_batch, max_batch), device=device)).parent
            backend = make_backend(impl, G, G, generator_hash(G), device, max_batch, engine=folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        def render(ws):
            return backend.render(ws)

        render.folder = tmp  # type: ignore[attr-defined]  removed when the measurements are done
        return render
    raise ValueError(f"unknown implementation {impl!r}")


def scoped(fn: Callable, precision: str, device: torch.device) -> Callable:
    """`fn` run under no_grad in `precision` (its TF32 flags, and bf16 autocast): every implementation is
    called through this, compiled and graphed ones included."""

    def run(ws):
        with torch.no_grad(), precision_scope(precision, device):
            run.flags = flags()  # type: ignore[attr-defined]  what is in effect as the implementation runs
            return fn(ws)

    return run


def graph_refusal(impl: str, device: torch.device) -> str | None:
    """Why `impl` is not replayed from a pti CUDA graph here (one line), or None."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if graphs_by_compile(impl, device):
        return f"torch.compile (mode {CUDA_COMPILE_MODE}) replays CUDA graphs itself: its eager rows are graphed"
    return None


def graphs_by_compile(impl: str, device: torch.device) -> bool:
    """Whether torch.compile itself replays CUDA graphs for `impl` here (mode "reduce-overhead")."""
    return impl == "compile" and device.type == "cuda" and CUDA_COMPILE_MODE == "reduce-overhead"


def resolved(impls: list[str], device: torch.device) -> list[tuple[str, str]]:
    """[(what runs, what was asked for)]: auto resolved, each implementation once, ref first (the base of
    every speedup)."""
    out: dict[str, str] = {}
    for asked in impls:
        impl = resolve_impl(asked, device) if asked == "auto" else asked
        if impl not in out or out[impl] == "auto":
            out[impl] = asked
    return sorted(out.items(), key=lambda item: item[0] != "ref")


def render_rows(
    G,
    device: torch.device,
    batches: list[int],
    impls: list[str],
    precisions: list[str],
    cuda_graphs: str = "off",
    repeats: int = 5,
    warmup: int = 2,
    progress: Callable[[str], None] = print,
    on_row: Callable[[dict], None] | None = None,
    deadline: float | None = None,
) -> list[dict]:
    """One row per (implementation, CUDA graph or not, precision, batch); see the module's docstring."""
    flop = 2 * synthesis_macs(G)
    rows: list[dict] = []
    graphed_too = {"off": [False], "on": [True], "both": [False, True]}[cuda_graphs]
    with torch.no_grad(), precision_scope("fp32", device):
        ws_of = {
            b: G.mapping(
                torch.randn([b, G.z_dim], generator=torch.Generator().manual_seed(0)).to(device), truncation_psi=0.7
            )
            for b in batches
        }
    truth: dict[int, torch.Tensor] = {}  # the eager fp32 reference per batch, for max_abs_diff_vs_ref_fp32
    base: dict[tuple[str, int], float] = {}  # (precision, batch) -> eager ref seconds per call
    left: list[str] = []

    def emit(row: dict, line: str) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)
        progress(line)

    for impl, requested in resolved(impls, device):
        label = impl if requested == impl else f"{impl} ({requested})"
        precs = precisions if impl in TORCH_IMPLS else [p for p in precisions if p == "fp32"]
        plan = [(g, p, b) for g in (graphed_too if impl in TORCH_IMPLS else [False]) for p in precs for b in batches]
        reason = unavailable(impl, device)
        if reason is not None:
            row = dict(
                kind="render", status="skipped", reason=reason, **common_fields(device, impl, requested, "-", False)
            )
            emit(row, f"render {label}: skipped ({reason})")
            continue
        if not plan:  # an export backend, and no fp32 asked for
            continue
        if deadline is not None and time.monotonic() > deadline:
            left += [f"{label} {'graph ' if g else ''}{p} batch {b}" for g, p, b in plan]
            continue
        t0 = time.perf_counter()
        try:  # setup (an export, a compile wrapper) inside the try: one failing implementation is one row
            render = renderer(G, impl, device, max(batches))
        except Exception as e:  # noqa: BLE001  recorded, and the run goes on
            row = dict(kind="render", status="failed", stage="setup", error=first_line(e, 200))
            emit(
                {**row, **common_fields(device, impl, requested, "-", False)},
                f"render {label}: failed ({row['error']})",
            )
            free(device)
            continue
        setup = time.perf_counter() - t0
        skipped: set[bool] = set()
        for graphed, precision, batch in plan:
            if deadline is not None and time.monotonic() > deadline:
                left.append(f"{label} {'graph ' if graphed else ''}{precision} batch {batch}")
                continue
            by_compile = graphs_by_compile(impl, device)
            common = common_fields(device, impl, requested, precision, graphed or by_compile)
            where = f"render {label:10s} {'graph ' if graphed else ''}{precision} batch {batch:3d}"
            reason = graph_refusal(impl, device) if graphed else None
            if reason is not None:  # one row for all the graphed measurements of this implementation
                if graphed not in skipped:
                    skipped.add(graphed)
                    row = dict(kind="render", status="skipped", reason=reason, **{**common, "precision": "-"})
                    emit(row, f"render {label} graph: skipped ({reason})")
                continue
            refused = refusal(G, device, batch)
            if refused is not None:
                row = dict(kind="render", status="refused", **common, batch=batch, reason=refused)
                emit(row, f"{where}: refused ({refused})")
                continue
            one = _render_one(G, device, render, impl, graphed, precision, ws_of[batch], truth, warmup, repeats)
            row = {"kind": "render", "status": one.pop("status"), **common, "batch": batch, **one}
            row["setup_seconds"] = round(setup, 2)
            if row["status"] != "ok":
                emit(row, f"{where}: failed ({row['error']})")
                continue
            if impl == "ref" and not graphed:
                base[(precision, batch)] = row["seconds"]
            _speed(row, flop, batch, peak(device, row["peak_basis"]), base.get((precision, batch)))
            emit(row, _render_line(where, row))
        if getattr(render, "folder", None):
            shutil.rmtree(render.folder, ignore_errors=True)
        del render
        free(device)
    if left:
        row = dict(kind="cut", what="render", left_out=left, reason="the time budget ran out")
        emit(row, f"render: time budget ran out; {len(left)} measurements left out")
    return rows


def _render_one(G, device, render, impl, graphed, precision, ws, truth, warmup, repeats) -> dict:
    """One measurement's fields (status ok, or failed with the error's first line)."""
    batch = ws.shape[0]
    if batch not in truth:
        with torch.no_grad(), precision_scope("fp32", device):
            truth[batch] = G.synthesis(ws, noise_mode="const", force_fp32=True, impl="ref").float()
    # the graph inside the scope: its key sees the scope's flags and autocast, and it records under them
    net = "prefer:triton" if impl == "triton" else "ref"
    fn = scoped(cuda_graphed(render, device, G.synthesis, net) if graphed else render, precision, device)
    out: dict = {}
    try:
        memory = Memory(device)
        with kernels.recording() as ops:  # the first call only: what ran (counting costs a little per op)
            sync(device)
            t0 = time.perf_counter()
            images = fn(ws)
            sync(device)
            first = time.perf_counter() - t0
        out["flags"] = fn.flags
        # at once: a compiled graph's output is overwritten by its next replay (one output-sized temporary,
        # a few percent of the render's own activations)
        diff = float((torch.as_tensor(images).float().to(truth[batch].device) - truth[batch]).abs_().max())
        del images
        _, times = timed(lambda: fn(ws), device, warmup, repeats, first_call=False)
    except Exception as e:  # noqa: BLE001  one measurement failing (out of memory, a kernel refusing) is one row
        fn = None  # the graphs' pools, freed
        free(device)
        return {**out, "status": "failed", "error": first_line(e, 200)}
    fn = None
    med = statistics.median(times)
    out.update(
        status="ok",
        seconds=med,
        spread_seconds=[min(times), max(times)],
        first_call_seconds=round(first, 3),
        compile_seconds=round(first, 3) if impl == "compile" else None,
        graphs_by="pti" if graphed else "torch.compile" if graphs_by_compile(impl, device) else None,
        ops={op: sorted(names) for op, names in sorted(ops.items())} if impl == "triton" else None,
        max_abs_diff_vs_ref_fp32=diff,
        peak_memory_gb=memory.peak_gb(),
        resident_memory_gb=memory.resident_gb(),
        repeats=repeats,
        warmup=warmup,
    )
    # the export backends follow their own runtime's precision, which may use TF32 for fp32 on a GPU
    out["peak_basis"] = "tf32" if impl in ("onnx", "aoti") and precision == "fp32" else precision
    if impl == "triton" and not any("triton" in names for names in ops.values()):
        out["note"] = "no layer ran on Triton (the kernels did not take these inputs): this measured the reference"
    free(device)
    return out


def _speed(row: dict, flop: int, batch: int, top: float | None, base: float | None) -> None:
    """Throughput fields; interpreter rows get their times but no speed figures."""
    med = row["seconds"]
    row["images_per_second"] = round(batch / med, 2)
    row["ms_per_image"] = round(1000 * med / batch, 3)
    row["gflop_per_image"] = round(flop / 1e9, 2)
    fast = not row["interpreter"]
    achieved = flop * batch / med / 1e9
    row["gflops_achieved"] = round(achieved, 1) if fast else None
    row["percent_of_peak"] = round(100 * achieved / (1000 * top), 2) if fast and top is not None else None
    row["speedup_vs_reference"] = round(base / med, 3) if fast and base is not None else None
    row["seconds"] = round(med, 6)
    row["spread_seconds"] = [round(s, 6) for s in row["spread_seconds"]]


def _render_line(where: str, row: dict) -> str:
    if row["interpreter"]:
        return f"{where}: {row['ms_per_image']:.2f} ms/img under Triton's interpreter (not a speed)"
    return (
        f"{where}: {row['images_per_second']:9.2f} img/s ({row['ms_per_image']:.2f} ms/img, "
        f"{row['gflops_achieved']:.0f} GFLOP/s"
        + ("" if row["percent_of_peak"] is None else f", {row['percent_of_peak']:.1f} % of {row['peak_basis']} peak")
        + (
            ""
            if row["speedup_vs_reference"] is None or (row["implementation"] == "ref" and not row["cuda_graph"])
            else f", {compared(row['speedup_vs_reference'])}"
        )
        + (f", compiled in {row['compile_seconds']:.1f} s" if row["compile_seconds"] is not None else "")
        + ")"
    )


def compared(speedup: float) -> str:
    """`speedup` (reference time / this time) in words that say which way: "1.33x slower than reference"."""
    factor = speedup if speedup >= 1 else 1 / speedup
    if f"{factor:.2f}" == "1.00":
        return "same speed as reference"
    return f"{factor:.2f}x {'faster' if speedup > 1 else 'slower'} than reference"
