"""`pti import CKPT --pivot 0.pt --base ffhq.pkl [-o person.pti]`: the authors' PTI outputs as a `.pti` identity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pti.commands.common import DeviceOption, console


def _check_out(value: Optional[Path]) -> Optional[Path]:
    if value is not None and value.suffix != ".pti":
        raise typer.BadParameter(f"{value}: the output must end in .pti")
    return value


def import_(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            metavar="CKPT",
            help="The authors' tuned generator: model_<run>_<image>.pt, a torch.save of NVIDIA's G "
            "(read without running anything from it).",
        ),
    ],
    pivot: Annotated[
        Path,
        typer.Option(
            "--pivot",
            "-p",
            help="The pivot it was tuned at: the authors' embeddings/.../0.pt ([1, num_ws, 512]), or a .npy, or "
            "NVIDIA's projected_w.npz (key w); [1, 512] means the same w on every layer.",
        ),
    ],
    base: Annotated[
        str,
        typer.Option(
            "--base",
            "--network",
            "-n",
            help="The generator the checkpoint was tuned from (the authors' stylegan2_ada_ffhq .pkl, or the same "
            "weights as rosinality .pt or pti .safetensors). Its mapping and buffers must equal the checkpoint's.",
        ),
    ],
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            callback=_check_out,
            help="The identity file to write (default: <CKPT name>.pti beside CKPT).",
        ),
    ] = None,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact",
            help="Store the tuned synthesis weights as exact fp32 (renders equal the checkpoint's generator bit "
            "for bit; about twice the size) instead of fp16 deltas from the base.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite the output if it exists.")] = False,
    device: DeviceOption = "cpu",
) -> None:
    """Import a generator tuned by the authors' PTI code (danielroich/PTI) and its pivot as a .pti identity,
    which render, export and studio then use like one from pti tune."""
    from pti.engine.authors_pti import import_tuning
    from pti.engine.checkpoint import load_checkpoint
    from pti.engine.device import resolve_device
    from pti.errors import OutputError
    from pti.fsutil import ensure_writable_dir

    dest = out if out is not None else checkpoint.with_suffix(".pti")
    if dest.is_dir():
        raise OutputError(f"cannot write {dest}: it is a folder")
    for given, what in ((checkpoint, "CKPT"), (pivot, "--pivot"), (Path(base), "--base")):
        if given.exists() and dest.exists() and dest.resolve() == given.resolve():
            raise OutputError(f"{dest} is the {what} file; write the identity elsewhere with -o")
    if dest.exists() and not force:
        raise OutputError(f"{dest} already exists; pass --force to overwrite it")
    ensure_writable_dir(dest.parent)  # before the reading: a 1024 px checkpoint is 127 MB
    dev = resolve_device(device)
    loaded = load_checkpoint(base, dev)
    res = import_tuning(checkpoint, pivot, loaded.generator, str(base), exact=exact)
    ident, G = res.identity, res.tuned
    console.print(
        f"read {checkpoint}: the authors' PTI generator, {G.img_resolution} px, {res.parameters} synthesis "
        f"tensors, {res.changed} tuned (max |tuned - base| {res.max_change:.3g})",
        markup=False,
    )
    console.print(f"pivot {pivot}: {res.pivot_shape} -> {list(ident.pivot.shape)} float32", markup=False)
    console.print(
        f"base {base} ({loaded.label}): content hash {ident.base_hash[:16]}; its mapping and buffers equal the "
        "checkpoint's",
        markup=False,
    )
    path = ident.save(dest)
    encoding = (
        "exact fp32 weights"
        if exact
        else f"fp16 deltas, max |stored - tuned| {res.encoding_error:.2g} (--exact stores them exactly)"
    )
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {encoding})", markup=False)
    for note in [*loaded.notes, *res.notes]:
        console.print(f"note: {note}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("import")(import_)
