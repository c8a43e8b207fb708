"""`pti export IDENTITY_OR_CKPT --format onnx|aoti|tensorrt -o DIR`: a tuned person's generator for a runtime."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pti.commands.common import DeviceOption, console


class Format(str, Enum):  # pti.export.FORMATS
    onnx = "onnx"
    aoti = "aoti"
    tensorrt = "tensorrt"


class Precision(str, Enum):  # pti.export.PRECISIONS
    fp32 = "fp32"
    fp16 = "fp16"


def export(
    source: Annotated[
        str,
        typer.Argument(
            metavar="IDENTITY_OR_CKPT",
            help="A .pti identity (its tuned weights), a generator checkpoint, or builtin:tiny.",
        ),
    ],
    format: Annotated[
        Format,
        typer.Option(
            "--format",
            "-f",
            help=(
                "onnx (ONNX Runtime, TensorRT), aoti (AOTInductor .pt2) or tensorrt (an engine; needs TensorRT and "
                "a GPU)."
            ),
        ),
    ] = Format.onnx,
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="Output folder (default: <source name>-<format> beside the source)."),
    ] = None,
    precision: Annotated[
        Precision, typer.Option("--precision", help="fp32, or fp16 (half the size; fp16 kernels on GPUs).")
    ] = Precision.fp32,
    network: Annotated[
        Optional[str],
        typer.Option("--network", "-n", help="The identity's base generator (default: the one it records)."),
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, max=1024, help="Largest batch the export accepts.")
    ] = 16,
    opt_batch: Annotated[int, typer.Option("--opt-batch", min=1, max=1024, help="The batch TensorRT tunes for.")] = 8,
    external_data: Annotated[
        bool, typer.Option("--external-data", help="ONNX: store the weights in model.onnx.data (automatic past 2 GB).")
    ] = False,
    refit: Annotated[
        Optional[Path],
        typer.Option(
            "--refit",
            help=(
                "TensorRT: an engine folder of the same base generator; write a copy refit with this identity's "
                "weights (no rebuild)."
            ),
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an export already in the output folder.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Export a tuned person's (or a base generator's) synthesis network, with a contract for swapping identities.

    The export is the reference arithmetic, traced (there is no --impl: ONNX Runtime, AOTInductor and TensorRT
    choose their own kernels), and it is checked against PyTorch in fp32 with TF32 off."""
    import time

    from pti.engine.device import resolve_device
    from pti.errors import OutputError
    from pti.export import CONTRACT, load_source
    from pti.export.config import ExportConfig

    if refit is not None and format is not Format.tensorrt:
        raise typer.BadParameter("--refit is for --format tensorrt", param_hint="--refit")
    if opt_batch > max_batch:
        raise typer.BadParameter(
            f"--opt-batch {opt_batch} is larger than --max-batch {max_batch}", param_hint="--opt-batch"
        )
    folder = out if out is not None else _default_out(source, format.value)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"cannot write the folder {folder}: it is a file")
    if (folder / CONTRACT).exists() and not force:
        raise OutputError(f"{folder} already holds an export; pass --force to replace it, or choose another --out")
    if folder.is_dir() and not (folder / CONTRACT).exists() and any(folder.iterdir()) and not force:
        raise OutputError(
            f"{folder} holds files that are not a pti export; choose a new or empty --out, or pass --force "
            "(files with an export's names are then replaced)"
        )
    dev = resolve_device(device)
    config = ExportConfig(
        precision=precision.value, batch=(1, opt_batch, max_batch), device=dev, external_data=external_data or None
    )  # not given: automatic past 2 GB
    src = load_source(source, network, dev if format is not Format.onnx else "cpu")
    what = "the tuned person" if src.identity is not None else "the generator"
    console.print(f"exporting {what} from {source} as {format.value} ({precision.value}) ...", markup=False)
    t0 = time.perf_counter()
    if refit is not None:
        from pti.export.tensorrt import refit as refit_engine

        contract_path = refit_engine(refit, src, folder)
    else:
        from pti.export import export as export_to

        contract_path = export_to(format.value, src, folder, config)
    _summary(contract_path, time.perf_counter() - t0)


def _default_out(source: str, fmt: str) -> Path:
    if source.startswith("builtin:"):
        return Path(f"{source.split(':', 1)[1]}-{fmt}")
    p = Path(source)
    return p.parent / f"{p.stem}-{fmt}"


def _summary(contract_path: Path, seconds: float) -> None:
    import json

    folder = contract_path.parent
    c = json.loads(contract_path.read_text())
    files = [*c["files"].values(), contract_path.name]
    sizes = ", ".join(f"{n} ({(folder / n).stat().st_size / 1e6:.1f} MB)" for n in files)
    b = c["batch"]
    console.print(f"wrote {folder}/: {sizes} in {seconds:.1f} s", markup=False)
    console.print(
        f"  input ws [batch {b['min']}-{b['max']}, {c['input']['shape'][1]}, {c['input']['shape'][2]}] -> "
        f"images {c['output']['shape'][1:]}; {len(c['weights'])} tuned weights swappable by name (contract.json)",
        markup=False,
    )
    v = c.get("verified", {})
    diff = v.get("max_abs_diff_vs_torch_fp32", v.get("pooled_diff"))
    if diff is not None:
        console.print(
            f"  checked on {v['runtime']}: differs from PyTorch by {diff:.2g} at most (tolerance "
            f"{c['sample']['tolerance']})",
            markup=False,
        )


def register(app: typer.Typer) -> None:
    app.command("export")(export)
