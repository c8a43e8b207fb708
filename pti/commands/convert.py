"""`pti convert IN OUT.safetensors`: any supported checkpoint -> our pickle-free format."""

from __future__ import annotations

from typing import Annotated

import typer


def _check_dest(value: str) -> str:
    if not value.endswith(".safetensors"):
        raise typer.BadParameter(f"{value}: the output must end in .safetensors")
    return value


def convert(
    source: Annotated[
        str, typer.Argument(metavar="IN", help="stylegan2-ada .pkl, rosinality .pt, pti .safetensors or builtin:tiny.")
    ],
    dest: Annotated[
        str,
        typer.Argument(metavar="OUT.safetensors", callback=_check_dest, help="File to write (replaced atomically)."),
    ],
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Convert a generator checkpoint to one .safetensors file (weights + config, no pickle)."""
    from pathlib import Path

    from pti.engine.checkpoint import load_checkpoint, save_generator
    from pti.errors import OutputError
    from pti.fsutil import ensure_writable_dir

    out = Path(dest)
    if out.is_dir():
        raise OutputError(f"cannot write {out}: it is a folder")
    if out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to overwrite it")
    ensure_writable_dir(out.parent)  # before loading: a large checkpoint takes a while
    loaded = load_checkpoint(source, device="cpu")
    digest = save_generator(loaded.generator, out, extra_metadata={"converted_from": loaded.format})
    typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) from {loaded.label}")
    for note in loaded.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"content hash {digest}")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
