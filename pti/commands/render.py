"""`pti render IDENTITY.pti --edit ...`: render edits of a tuned person (PNGs, sweep grids, GIFs)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from pti.commands.common import DeviceOption, PhaseProgress, console, help_text, plural, thread_setting
from pti.commands.export import Precision

EDIT_HELP = (
    "An edit, repeatable (edits sum): NAME=VALUE (age=+3, smile=-1.5), a sweep NAME=START:STOP:N "
    "(age=-3:3:7), layers NAME=VALUE@A-B (age=+3@0-8). NAME is a preset (age, smile, pose, eye_openness, "
    "smile_ganspace, trimmed_beard), a direction file (./dir.npy) or FILE:K for GANSpace component K."
)


class BackendName(str, Enum):  # pti.rendering.BACKENDS
    torch = "torch"
    onnx = "onnx"
    aoti = "aoti"
    tensorrt = "tensorrt"


def _check_edits(values: list[str] | None) -> list[str]:
    from pti.engine.edits import EditSyntaxError, parse_edits

    try:
        parse_edits(values or [])
    except EditSyntaxError as e:
        raise typer.BadParameter(str(e)) from None
    return values or []


def render(
    identity: Annotated[Path, typer.Argument(metavar="IDENTITY.pti", help="An identity file written by `pti tune`.")],
    edit: Annotated[Optional[list[str]], typer.Option("--edit", "-e", callback=_check_edits, help=EDIT_HELP)] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output folder (default: <identity folder>/<name>/edits).")
    ] = None,
    network: Annotated[
        Optional[str],
        typer.Option(
            "--network",
            "-n",
            help="The base generator (default: the one the identity records; its content hash must match).",
        ),
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Also write compare.png: input | reconstruction | edits.")
    ] = False,
    batch: Annotated[int, typer.Option("--batch", min=1, max=256, help="Frames per forward pass.")] = 8,
    fps: Annotated[
        float, typer.Option("--fps", min=0.5, max=60.0, help="Frames per second of sweep animations.")
    ] = 8.0,
    mp4: Annotated[
        bool, typer.Option("--mp4", help=help_text("Also write sweeps as .mp4 (needs pip install 'pti[video]')."))
    ] = False,
    backend: Annotated[
        BackendName,
        typer.Option(
            "--backend",
            help=(
                "torch; or an exported graph with this person's weights swapped in: onnx (ONNX Runtime), aoti "
                "(AOTInductor), tensorrt."
            ),
        ),
    ] = BackendName.torch,
    engine: Annotated[
        Optional[Path],
        typer.Option(
            "--engine",
            help=(
                "An export folder (pti export) for --backend; default: the base generator's, exported once into "
                "the cache."
            ),
        ),
    ] = None,
    precision: Annotated[
        Precision, typer.Option("--precision", help="Precision of the cached export (fp32 | fp16).")
    ] = Precision.fp32,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace renders of another identity (or files pti did not write) in the output folder."
        ),
    ] = False,
    device: DeviceOption = "auto",
) -> None:
    """Render edits of a tuned person: one PNG per edit set, or a grid and a GIF for a sweep."""
    import pti.rendering

    if engine is not None and backend is BackendName.torch:
        raise typer.BadParameter("--engine is for --backend onnx, aoti or tensorrt", param_hint="--engine")
    config = pti.rendering.RenderConfig(
        network=network,
        device=device,
        batch=batch,
        compare=compare,
        gif_fps=fps,
        mp4=mp4,
        backend=backend.value,
        engine=engine,
        precision=precision.value,
        threads=thread_setting(),
        force=force,
    )
    with PhaseProgress() as bar:
        result = pti.rendering.render(identity, edit or [], out, config, progress=bar.update)
    _summary(result)


def _summary(result) -> None:
    rep = result.report
    console.print(
        f"{result.identity}: {plural(rep['frames'], 'frame')} on {rep['backend']} ({rep['device']}), "
        f"{rep['ms_per_image']:.1f} ms per image at batch {rep['batch']}",
        markup=False,
    )
    for o in rep["outputs"]:
        sim = o["identity_similarity_to_reconstruction"]
        console.print(
            f"  {o['label']}: ID similarity to the reconstruction "
            + ("- (no face found)" if sim is None else f"{sim:.3f}"),
            markup=False,
        )
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    names = ", ".join(str(p.relative_to(result.out)) for k, p in result.files.items() if not k.startswith("frame "))
    frames = sum(k.startswith("frame ") for k in result.files)
    console.print(
        f"wrote {result.out}/: {names}" + (f", and {frames} frames in frames/" if frames else ""), markup=False
    )


def register(app: typer.Typer) -> None:
    app.command("render")(render)
