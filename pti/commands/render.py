"""`pti render IDENTITY.pti --edit ...`: render edits of a tuned person (PNGs, sweep grids, GIFs)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from pti.commands.common import (
    DeviceOption,
    Impl,
    PhaseProgress,
    compile_line,
    console,
    help_text,
    impl_help,
    plural,
    thread_setting,
)

EDIT_HELP = (
    "An edit, repeatable (edits sum): NAME=VALUE (age=+3, smile=-1.5), a sweep NAME=START:STOP:N "
    "(age=-3:3:7), layers NAME=VALUE@A-B (age=+3@0-8). NAME is a preset (age, smile, pose, eye_openness, "
    "smile_ganspace, trimmed_beard), a direction file (./dir.npy) or FILE:K for GANSpace component K."
)


class RenderPrecision(str, Enum):  # pti.rendering.RENDER_PRECISIONS
    fp32 = "fp32"
    tf32 = "tf32"
    bf16 = "bf16"
    fp16 = "fp16"


PRECISION_HELP = (
    "--backend torch computes in fp32 (float32, TF32 off), tf32 (TF32 tensor-core matmuls and convolutions on "
    "GPUs) or bf16 (bfloat16 autocast); an export backend renders its export's fp32 or fp16 weights (the cached "
    "export is made in that precision). Other pairs are refused."
)


class PasteFormat(str, Enum):  # pti.rendering.PASTE_FORMATS
    auto = "auto"
    png = "png"
    jpeg = "jpeg"


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
    identity: Annotated[
        Path,
        typer.Argument(
            metavar="IDENTITY.pti",
            help="An identity file written by `pti tune` (a clip's renders every frame into an MP4).",
        ),
    ],
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
    precision: Annotated[RenderPrecision, typer.Option("--precision", help=PRECISION_HELP)] = RenderPrecision.fp32,
    impl: Annotated[
        Impl,
        typer.Option(
            "--impl",
            help=impl_help("the torch backend")
            + " The export backends run the graph their runtime built: --impl is for --backend torch.",
        ),
    ] = Impl.auto,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace renders of another identity (or files pti did not write) in the output folder."
        ),
    ] = False,
    paste: Annotated[
        bool,
        typer.Option(
            "--paste",
            help=(
                "Also paste each output back into the original photo, at its resolution and in its format "
                "(<label>_pasted.jpg beside the crop): a soft face mask, the photo's own pixels outside it."
            ),
        ),
    ] = False,
    photo: Annotated[
        Optional[Path],
        typer.Option(
            "--photo",
            help="The original photo (or clip) for --paste (default: the one the identity records; it must be it).",
        ),
    ] = None,
    paste_format: Annotated[
        PasteFormat,
        typer.Option(
            "--paste-format",
            help="The pasted photo's format: auto (the original's; a JPEG re-encodes every pixel), png or jpeg.",
        ),
    ] = PasteFormat.auto,
    stitch: Annotated[
        bool,
        typer.Option(
            "--stitch",
            help=(
                "With --paste: first tune a copy of the generator per output (per frame of a clip) so the band "
                "round the mask's edge matches the original while the face keeps the edit (STIT's stitching "
                "tuning; --backend torch)."
            ),
        ),
    ] = False,
    stitch_steps: Annotated[
        int,
        typer.Option("--stitch-steps", min=1, max=10_000, help="Stitching tuning's Adam steps at most, per output."),
    ] = 50,
    stitch_threshold: Annotated[
        float,
        typer.Option(
            "--stitch-threshold",
            min=0.0,
            max=1.0,
            help="Stitching stops once the band's MSE (images in [-1, 1]) is below this.",
        ),
    ] = 0.002,
    device: DeviceOption = "auto",
) -> None:
    """Render edits of a tuned person: one PNG per edit set, or a grid and a GIF for a sweep; --paste puts
    them back into the original photo."""
    import pti.rendering

    if engine is not None and backend is BackendName.torch:
        raise typer.BadParameter("--engine is for --backend onnx, aoti or tensorrt", param_hint="--engine")
    if photo is not None and not paste:
        raise typer.BadParameter("--photo is the photo to paste into: add --paste", param_hint="--photo")
    if paste_format is not PasteFormat.auto and not paste:
        raise typer.BadParameter("--paste-format is for --paste", param_hint="--paste-format")
    if stitch and not paste:
        raise typer.BadParameter("--stitch tunes the pasted border: add --paste", param_hint="--stitch")
    if stitch and backend is not BackendName.torch:
        raise typer.BadParameter("--stitch tunes the generator: it runs on --backend torch", param_hint="--stitch")
    mismatch = pti.rendering.backend_mismatch(backend.value, impl.value, precision.value)
    if mismatch is not None:
        raise typer.BadParameter(mismatch[1], param_hint=f"--{mismatch[0]}")
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
        impl=impl.value,
        threads=thread_setting(),
        force=force,
        paste=paste,
        photo=photo,
        paste_format=paste_format.value,
        stitch=stitch,
        stitch_steps=stitch_steps,
        stitch_threshold=stitch_threshold,
    )
    with PhaseProgress() as bar:

        def progress(phase: str, step: int, total: int, values: dict) -> None:
            if not compile_line(phase, step, values):
                bar.update(phase, step, total, values)

        result = pti.rendering.render(identity, edit or [], out, config, progress=progress)
    _summary(result)


def _summary(result) -> None:
    rep = result.report
    ran = rep.get("impl") or {}
    how = f"{ran.get('impl')}, {ran.get('precision')}" if rep["backend"] == "torch" else ran.get("precision")
    compiled = f"; compiled once in {ran['compile_seconds']:.1f} s" if ran.get("compile_seconds") else ""
    console.print(
        f"{result.identity}: {plural(rep['frames'], 'frame')} on {rep['backend']} ({how}, {rep['device']}), "
        f"{rep['ms_per_image']:.1f} ms per image at batch {rep['batch']}{compiled}",
        markup=False,
    )
    clip = rep.get("clip")
    if clip:
        console.print(
            f"  {clip['frames']} frames at {clip['fps']:g} fps ({clip['rendered']} rendered, {clip['reused']} reused"
            + (f", {clip['kept_original']} kept as they were: no face" if clip["kept_original"] else "")
            + ")"
            + ("; pasted into the clip" if clip["pasted"] else "")
            + (f"; audio {clip['audio']}" if clip["audio"] else ""),
            markup=False,
        )
    for o in rep["outputs"] if not clip else []:
        sim = o["identity_similarity_to_reconstruction"]
        console.print(
            f"  {o['label']}: ID similarity to the reconstruction "
            + ("- (no face found)" if sim is None else f"{sim:.3f}"),
            markup=False,
        )
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    in_frames = [k for k, p in result.files.items() if p.parent.name == "frames" and p.parent.parent == result.out]
    names = ", ".join(str(p.relative_to(result.out)) for k, p in result.files.items() if k not in in_frames)
    pasted = rep.get("paste")
    if pasted:
        console.print(
            f"pasted into {pasted['photo']} ({pasted['size'][0]}x{pasted['size'][1]}, {pasted['format']})",
            markup=False,
        )
    console.print(
        f"wrote {result.out}/: {names}" + (f", and {len(in_frames)} files in frames/" if in_frames else ""),
        markup=False,
    )


def register(app: typer.Typer) -> None:
    app.command("render")(render)
