"""`pti info [CKPT]`: what a generator checkpoint holds, without rendering anything."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def info(
    checkpoint: Annotated[
        Optional[str],
        typer.Argument(
            metavar="[CKPT]",
            help="stylegan2-ada .pkl, rosinality .pt or pti .safetensors; none (or builtin:tiny) = the built-in tiny generator.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Show a checkpoint's format, resolution, number of ws, parameter counts, fp16 layers and content hash."""
    import dataclasses
    import json

    from pti.engine.checkpoint import load_checkpoint, summarize

    loaded = load_checkpoint(checkpoint, device="cpu")
    summary = summarize(loaded.generator)
    record = {"source": loaded.source, "format": loaded.format, "label": loaded.label, "notes": loaded.notes,
              **dataclasses.asdict(summary)}
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    millions = lambda n: f"{n / 1e6:.2f} M ({n:,})"  # noqa: E731
    rows = [
        ("checkpoint", loaded.source),
        ("format", f"{loaded.format}: {loaded.label}"),
        ("resolution", f"{summary.resolution} x {summary.resolution}"),
        ("num_ws", str(summary.num_ws)),
        ("z_dim / w_dim", f"{summary.z_dim} / {summary.w_dim}"),
        ("parameters", millions(summary.params_total)),
        ("  mapping", millions(summary.params_mapping)),
        ("  synthesis", millions(summary.params_synthesis)),
        ("fp16 layers", ", ".join(f"{r}px" for r in summary.fp16_resolutions) or "none"),
        ("conv_clamp", "none" if summary.conv_clamp is None else f"{summary.conv_clamp:g}"),
        ("content hash", summary.content_hash),
    ]
    rows += [("note", note) for note in loaded.notes]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def register(app: typer.Typer) -> None:
    app.command("info")(info)
