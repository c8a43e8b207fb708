"""`pti export IDENTITY_OR_CKPT --format onnx|aoti|tensorrt -o DIR`: a tuned person's generator for a runtime;
`--format nvidia-pkl|rosinality|state-dict -o FILE`: one file another tool loads."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pti.commands.common import DeviceOption, console


class Format(str, Enum):  # pti.export.FORMATS, then pti.export.FILE_FORMATS
    onnx = "onnx"
    aoti = "aoti"
    tensorrt = "tensorrt"
    nvidia_pkl = "nvidia-pkl"
    rosinality = "rosinality"
    state_dict = "state-dict"
    projected_w = "projected-w"


FOLDER_ONLY = ("precision", "max_batch", "opt_batch", "external_data", "refit")  # options of the runtime exports


class Precision(str, Enum):  # pti.export.PRECISIONS
    fp32 = "fp32"
    fp16 = "fp16"


def export(
    ctx: typer.Context,
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
                "A folder for a runtime: onnx (ONNX Runtime, TensorRT), aoti (AOTInductor .pt2) or tensorrt (an "
                "engine; needs TensorRT and a GPU). One file for another tool: nvidia-pkl (a stylegan2-ada-pytorch "
                "network pickle, from a .pkl base: it carries that file's own network code, which NVIDIA's loader "
                "runs), rosinality (a stylegan2-pytorch checkpoint), state-dict (NVIDIA-named tensors, "
                "safetensors) or projected-w (the pivot as NVIDIA's projected_w.npz)."
            ),
        ),
    ] = Format.onnx,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            help=(
                "Output folder (default: <source name>-<format> beside the source); for a file format the file "
                "(default: <identity name>.pkl|.pt|.safetensors beside it)."
            ),
        ),
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
    drop_d: Annotated[
        bool,
        typer.Option(
            "--drop-d",
            help=(
                "nvidia-pkl: leave the discriminator D out (smaller; pickle.load(f)['G_ema'] reads it, NVIDIA's "
                "legacy.load_network_pkl needs D)."
            ),
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an export already in the output folder, or the output file.")
    ] = False,
    device: DeviceOption = "auto",
) -> None:
    """Export a tuned person (or a base generator): a folder for a runtime, or one file another tool loads.

    Runtime exports (onnx, aoti, tensorrt) hold the synthesis network with a contract for swapping identities;
    they are the reference arithmetic, traced (there is no --impl: ONNX Runtime, AOTInductor and TensorRT choose
    their own kernels), checked against PyTorch in fp32 with TF32 off.

    File exports hold the whole generator with the tuned weights, and are read back and checked after writing.
    nvidia-pkl needs a stylegan2-ada-pytorch .pkl base: the network records and code are that file's own, copied
    unchanged, and loading the result in NVIDIA's loader runs that code (your base file's, not pti's)."""
    import time

    from pti.engine.device import resolve_device
    from pti.errors import OutputError
    from pti.export import CONTRACT, FILE_FORMATS, load_source
    from pti.export.config import ExportConfig

    if format.value in FILE_FORMATS:
        return _export_file(ctx, source, format.value, out, network, drop_d, force, device)
    if drop_d:
        raise typer.BadParameter("--drop-d is for --format nvidia-pkl", param_hint="--drop-d")
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


def _export_file(ctx, source: str, kind: str, out, network, drop_d: bool, force: bool, device: str) -> None:
    import time

    from pti.engine.device import resolve_device
    from pti.errors import OutputError
    from pti.export import export_file, load_source

    given = [
        "--" + name.replace("_", "-")
        for name in FOLDER_ONLY
        if ctx.get_parameter_source(name) is not None and ctx.get_parameter_source(name).name != "DEFAULT"
    ]
    if given:
        raise typer.BadParameter(f"{', '.join(given)} is for the runtime exports (onnx, aoti, tensorrt), not {kind}")
    if drop_d and kind != "nvidia-pkl":
        raise typer.BadParameter("--drop-d is for --format nvidia-pkl", param_hint="--drop-d")
    path = out if out is not None else _default_file(source, kind)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; give a file name with -o")
    if path.exists() and not force:
        raise OutputError(f"{path} already exists; pass --force to replace it, or choose another -o")
    src = load_source(source, network, resolve_device(device))
    what = "the tuned person" if src.identity is not None else "the generator"
    console.print(f"exporting {what} from {source} as {kind} ...", markup=False)
    t0 = time.perf_counter()
    written = export_file(kind, src, path, drop_d=drop_d)
    size = path.stat().st_size / 1e6
    console.print(f"wrote {path} ({size:.1f} MB) in {time.perf_counter() - t0:.1f} s", markup=False)
    for line in written.lines:
        console.print(f"  {line}", markup=False)
    for note in written.notes:
        console.print(f"note: {note}", markup=False)


def _default_file(source: str, kind: str) -> Path:
    """<identity>.pkl beside the identity; <checkpoint>-<kind>.<suffix> beside a checkpoint (never the source)."""
    from pti.export import FILE_FORMATS

    suffix = FILE_FORMATS[kind]
    if source.startswith("builtin:"):
        return Path(f"{source.split(':', 1)[1]}-{kind}{suffix}")
    p = Path(source)
    return p.with_suffix(suffix) if p.suffix == ".pti" else p.parent / f"{p.stem}-{kind}{suffix}"


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
