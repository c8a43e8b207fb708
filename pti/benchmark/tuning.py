"""Tuning time per phase (inversion, tuning, tuning with locality), implementation and precision, and the
full recipe projected from it (see `pti.benchmark`)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from pti.benchmark.machine import (
    PHASES,
    RECIPE,
    TORCH_IMPLS,
    Memory,
    common_fields,
    free,
    interpreted,
    sync,
    unavailable,
)
from pti.benchmark.render import graphs_by_compile, resolved
from pti.engine.invert import InvertConfig, invert
from pti.engine.losses import WeightFreePerceptual, WeightFreeProjectorMetric
from pti.engine.tune import TuneConfig, tune
from pti.errors import first_line
from pti.kernels.precision import precision_scope


def tune_rows(
    G,
    device: torch.device,
    impls: list[str],
    precisions: list[str],
    steps: int = 5,
    warmup: int = 1,
    progress: Callable[[str], None] = print,
    on_row: Callable[[dict], None] | None = None,
    deadline: float | None = None,
) -> list[dict]:
    """Seconds per step of each phase, per implementation (ref, compile, triton: those asked for, auto
    resolved) and precision: the median of `steps` steps after the first (which compiles under compile)
    and `warmup` more; then the full recipe projected from them."""
    rows: list[dict] = []

    def emit(row: dict, line: str) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)
        progress(line)

    with torch.no_grad(), precision_scope("fp32", device):
        target = G.synthesis(
            G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(1)).to(device)),
            noise_mode="const",
            impl="ref",
        )
        pivot = G.mapping(
            torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(2)).to(device), truncation_psi=0.7
        )
    saved_impl = G.impl
    left: list[str] = []
    try:
        for impl, requested in resolved([i for i in impls if i in TORCH_IMPLS or i == "auto"], device):
            reason = unavailable(impl, device)
            if reason is not None:
                row = dict(
                    kind="tune", status="skipped", reason=reason, **common_fields(device, impl, requested, "-", False)
                )
                emit(row, f"tune {impl}: skipped ({reason})")
                continue
            for precision in precisions:
                per: dict[str, float] = {}
                for phase in PHASES:
                    if deadline is not None and time.monotonic() > deadline:
                        left.append(f"{impl} {precision} {phase}")
                        continue
                    row = _tune_one(G, device, impl, requested, precision, phase, steps, warmup, target, pivot)
                    where = f"tune {impl:8s} {phase:14s} {precision}"
                    if row["status"] != "ok":
                        emit(row, f"{where}: failed ({row['error']})")
                        continue
                    per[phase] = row["seconds_per_step"]
                    ran = row
                    emit(row, _tune_line(where, row))
                if "invert" in per and not interpreted(impl, device):  # an interpreter's times project nothing
                    _recipe_rows(ran, per, steps, emit)
    finally:
        G.impl = saved_impl
    if left:
        row = dict(kind="cut", what="tune", left_out=left, reason="the time budget ran out")
        emit(row, f"tune: time budget ran out; {len(left)} measurements left out")
    return rows


def _tune_one(G, device, impl, requested, precision, phase, steps, warmup, target, pivot) -> dict:
    stamps: list[float] = []

    def tick(name, *_):
        if name != "compile":  # the compile phase's own lines come before and after the first step
            sync(device)
            stamps.append(time.perf_counter())

    n = 1 + warmup + steps  # the first step has no start stamp: steps 2.. are timed, warm-up first
    common = common_fields(device, impl, requested, precision, graphs_by_compile(impl, device))
    try:
        memory = Memory(device)
        if phase == "invert":
            cfg = InvertConfig(steps=n, w_avg_samples=64, precision=precision, impl=requested)
            result = invert(G, target, WeightFreeProjectorMetric(), cfg, progress=tick)
        else:
            cfg = TuneConfig(
                max_steps=n,
                lpips_threshold=0.0,
                precision=precision,
                impl=requested,
                locality=phase == "tune+locality",
            )
            result = tune(G, target, pivot, WeightFreePerceptual(), cfg, progress=tick)
    except Exception as e:  # noqa: BLE001  recorded, and the run goes on
        free(device)
        return dict(kind="tune", status="failed", phase=phase, error=first_line(e, 200), **common)
    took = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    ran = result.impl
    row = dict(
        kind="tune",
        status="ok",
        phase=phase,
        **{**common, "implementation": ran.get("impl", impl), "requested": ran.get("requested", requested)},
        flags=ran.get("flags"),
        ops=ran.get("ops") or None,
        seconds_per_step=round(statistics.median(took), 5),
        spread_seconds=[round(min(took), 5), round(max(took), 5)],
        steps_timed=len(took),
        warmup=warmup,
        compile_seconds=ran.get("compile_seconds"),
        peak_memory_gb=memory.peak_gb(),
        resident_memory_gb=memory.resident_gb(),
    )
    del result
    free(device)
    return row


def _tune_line(where: str, row: dict) -> str:
    return (
        f"{where}: {row['seconds_per_step'] * 1000:9.1f} ms/step"
        + (" under Triton's interpreter (not a speed)" if row["interpreter"] else "")
        + ("" if row["compile_seconds"] is None else f", compiled in {row['compile_seconds']:.1f} s")
        + ("" if row["peak_memory_gb"] is None else f", peak {row['peak_memory_gb']:.2f} GB")
    )


def _recipe_rows(ran: dict, per: dict[str, float], steps: int, emit) -> None:
    """The full recipe's seconds per image from the phases' seconds per step; `ran` is the last phase's row
    (what ran, on what, with which flags)."""
    common = ("implementation", "requested", "cuda_graph", "precision", "device_name", "threads", "interpreter")
    impl, precision = ran["implementation"], ran["precision"]
    for locality in (False, True):
        phase = "tune+locality" if locality else "tune"
        if phase not in per:
            continue
        total = RECIPE["invert"] * per["invert"] + RECIPE["tune"] * per[phase]
        row = dict(
            kind="recipe",
            status="ok",
            **{k: ran[k] for k in common},
            flags=ran["flags"],
            locality=locality,
            projected_seconds=round(total, 2),
            from_steps=steps,
        )
        emit(
            row,
            f"full recipe {impl} {precision} {'with' if locality else 'without'} locality: {total:.1f} s per image "
            "(projected)",
        )
