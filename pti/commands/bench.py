"""`pti bench`: render throughput and tuning time per implementation and precision (pti.benchmark)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pti.commands.common import AUTO_IMPL, PRECISIONS, DeviceOption, console

# Copies of pti.benchmark.IMPLS and CUDA_GRAPHS, so that --help does not import torch (tests/test_bench.py checks
# that they are equal).
BENCH_IMPLS = ("auto", "ref", "compile", "triton", "onnx", "aoti")
MAX_BATCH = 1024


class Config(str, Enum):  # pti.benchmark.CONFIGS
    tiny = "tiny"
    paper256 = "paper256"
    ffhq1024 = "ffhq1024"


class Graphs(str, Enum):  # pti.benchmark.CUDA_GRAPHS
    off = "off"
    on = "on"
    both = "both"


def _csv(allowed: tuple[str, ...]):
    def check(value: str) -> str:
        bad = [v for v in value.split(",") if v not in allowed]
        if bad:
            raise typer.BadParameter(f"{', '.join(bad)}: choose from {', '.join(allowed)}")
        return value

    return check


def _batches(value: str) -> str:
    if not all(v.isdigit() and 1 <= int(v) <= MAX_BATCH for v in value.split(",")):
        raise typer.BadParameter(f"{value!r}: comma-separated batch sizes from 1 to {MAX_BATCH}")
    return value


def _tune_steps(value: int) -> int:
    if value != 0 and not 5 <= value <= 1000:
        raise typer.BadParameter(f"{value}: 0 (no tuning benchmark) or 5 to 1000 (a median of at least 5)")
    return value


def bench(
    config: Annotated[
        Config,
        typer.Option(
            "--config", help="Generator shape (random weights): tiny, paper256 or ffhq1024 (config-f, 1024 px)."
        ),
    ] = Config.paper256,
    impl: Annotated[
        str,
        typer.Option(
            "--impl",
            callback=_csv(BENCH_IMPLS),
            help=(
                "Comma-separated implementations: ref (reference ops), compile (torch.compile; its compile time is "
                "reported apart), triton (the Triton kernels; CUDA), auto (recorded as what it runs here: "
                + ", ".join(f"{k} -> {v}" for k, v in AUTO_IMPL.items())
                + "), onnx, aoti (the export backends, fp32 only). Tuning is timed for ref, compile and triton."
            ),
        ),
    ] = "ref,onnx",
    cuda_graphs: Annotated[
        Graphs,
        typer.Option(
            "--cuda-graphs",
            help="Replay ref, compile and triton renders from CUDA graphs: off, on, or both (eager and graphed); CUDA.",
        ),
    ] = Graphs.off,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            callback=_csv(PRECISIONS),
            help="Comma-separated precisions: fp32 (TF32 off), tf32, bf16 (autocast); each measured apart.",
        ),
    ] = "fp32",
    batches: Annotated[
        str, typer.Option("--batches", callback=_batches, help="Comma-separated render batch sizes (1 to 1024).")
    ] = "1,8",
    repeats: Annotated[
        int, typer.Option("--repeats", min=5, max=1000, help="Timed calls per measurement (the median is reported).")
    ] = 5,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, max=100, help="Untimed calls after the first one, before timing.")
    ] = 2,
    tune_steps: Annotated[
        int,
        typer.Option(
            "--tune-steps",
            callback=_tune_steps,
            help="Timed steps per tuning phase, after two untimed ones (0: no tuning benchmark).",
        ),
    ] = 5,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            help="Results JSON (default: ./bench_<device>.json, never replaced without --force).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the default results file if it exists.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Measure rendering (img/s per implementation) and tuning (s per step, projected recipe) on this machine.

    Rows that fail (an export, an out-of-memory batch) are recorded with their reason and the run goes on;
    the JSON is written after every row, and the exit code is 1 when any row failed or was refused."""
    from pti.benchmark import default_out, problems, run
    from pti.commands.common import thread_setting
    from pti.engine.device import resolve_device
    from pti.errors import OutputError, PTIError
    from pti.fsutil import ensure_writable_dir, write_json

    dev = resolve_device(device)
    path = out or default_out(dev)
    if path.is_dir():  # checked before the benchmark, which takes minutes, not after it
        raise OutputError(f"cannot write {path}: it is a folder (give a file name, e.g. {path / 'bench.json'})")
    if out is None and path.exists() and not force:
        raise OutputError(f"{path} exists; pass --force to replace it, or -o to name the results file")
    ensure_writable_dir(path.parent)
    if dev.type != "cuda" and cuda_graphs != Graphs.off:
        console.print("CUDA graphs need a CUDA device: their rows are skipped", markup=False)
    doc = run(
        config.value,
        dev,
        [int(b) for b in batches.split(",")],
        impl.split(","),
        precision.split(","),
        repeats=repeats,
        tune_steps=tune_steps,
        cuda_graphs=cuda_graphs.value,
        warmup=warmup,
        threads=thread_setting(),
        progress=lambda line: console.print(line, markup=False),
        save=lambda d: write_json(d, path),
    )
    console.print(f"wrote {path}", markup=False)
    bad = problems(doc)
    if bad:
        measured = sum(r.get("status") != "skipped" for r in doc["rows"] if r["kind"] != "cut")
        raise PTIError(f"{len(bad)} of {measured} measurements failed or were refused; their reasons are in {path}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
