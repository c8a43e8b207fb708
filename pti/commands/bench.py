"""`pti bench`: render throughput and tuning time per implementation and precision (pti.benchmark)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pti.commands.common import DeviceOption, console

IMPLS = ("reference", "triton", "cudagraph", "triton-cudagraph", "compiled", "onnx", "aoti")


def _csv(allowed: tuple[str, ...]):
    def check(value: str) -> str:
        bad = [v for v in value.split(",") if v not in allowed]
        if bad:
            raise typer.BadParameter(f"{', '.join(bad)}: choose from {', '.join(allowed)}")
        return value

    return check


def _precisions(value: str) -> str:
    from pti.engine.config import PRECISIONS  # torch: loaded when the option is checked, never for --help

    return _csv(PRECISIONS)(value)


def _batches(value: str) -> str:
    if not all(v.isdigit() and 1 <= int(v) <= 1024 for v in value.split(",")):
        raise typer.BadParameter(f"{value!r}: comma-separated batch sizes from 1 to 1024")
    return value


def bench(
    config: Annotated[
        str,
        typer.Option(
            "--config",
            callback=_csv(("tiny", "paper256", "ffhq1024")),
            help="Generator shape (random weights): tiny, paper256 or ffhq1024 (config-f, 1024 px).",
        ),
    ] = "paper256",
    impl: Annotated[
        str,
        typer.Option(
            "--impl",
            callback=_csv(IMPLS),
            help=(
                "Comma-separated implementations: reference, triton (CUDA), cudagraph and triton-cudagraph (either "
                "replayed from a CUDA graph), compiled (torch.compile), onnx, aoti. Tuning is timed for reference, "
                "and for triton when asked on CUDA."
            ),
        ),
    ] = "reference,onnx",
    precision: Annotated[
        str, typer.Option("--precision", callback=_precisions, help="Comma-separated precisions.")
    ] = "fp32",
    batches: Annotated[
        str, typer.Option("--batches", callback=_batches, help="Comma-separated render batch sizes.")
    ] = "1,8",
    repeats: Annotated[
        int, typer.Option("--repeats", min=1, max=1000, help="Timed calls per measurement (the median is reported).")
    ] = 5,
    tune_steps: Annotated[
        int,
        typer.Option("--tune-steps", min=0, max=1000, help="Timed steps per tuning phase (0: no tuning benchmark)."),
    ] = 3,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            help="Results JSON (default: benchmarks/results/bench_<device>.json, or ./ outside a checkout).",
        ),
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """Measure rendering (img/s per implementation) and tuning (s per step, projected recipe) on this machine."""
    from pti.benchmark import default_out, run
    from pti.engine.device import resolve_device
    from pti.errors import OutputError
    from pti.fsutil import ensure_writable_dir, write_json

    dev = resolve_device(device)
    path = out or default_out(dev)
    if path.is_dir():  # checked before the benchmark, which takes minutes, not after it
        raise OutputError(f"cannot write {path}: it is a folder (give a file name, e.g. {path / 'bench.json'})")
    ensure_writable_dir(path.parent)
    result = run(
        config,
        dev,
        [int(b) for b in batches.split(",")],
        impl.split(","),
        precision.split(","),
        repeats,
        tune_steps,
        progress=lambda line: console.print(line, markup=False),
    )
    path = write_json(result, path)
    console.print(f"wrote {path}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
