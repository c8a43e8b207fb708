"""`pti align PHOTO... -o DIR`: FFHQ-align faces for inversion."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pti.commands.common import console


def align(
    photos: Annotated[list[Path], typer.Argument(metavar="PHOTO", help="Photos or directories of photos.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the aligned PNGs (<photo stem>.png).")],
    size: Annotated[
        int, typer.Option("--size", min=16, max=4096, help="Output resolution in pixels (the generator's).")
    ] = 1024,
    face: Annotated[
        Optional[int], typer.Option("--face", min=0, help="Which face to align when there are several (0 = largest).")
    ] = None,
    no_align: Annotated[
        bool, typer.Option("--no-align", help="The photos are already aligned crops: only resize them.")
    ] = False,
) -> None:
    """Detect the face in each photo and crop it the way FFHQ faces are cropped."""
    from pti.engine.align import align_photo, resize_prealigned
    from pti.engine.photo import expand_photo_paths, load_photo, save_photo_atomic, unique_stems
    from pti.errors import OutputError, PTIError
    from pti.fsutil import ensure_writable_dir

    paths = expand_photo_paths(photos)
    ensure_writable_dir(out)
    failures = 0
    for path, name in zip(paths, unique_stems(paths)):
        target = out / f"{name}.png"
        try:
            img = load_photo(path)
            if no_align:
                aligned, warning = resize_prealigned(img, size)
                if warning:
                    typer.secho(f"warning: {path}: {warning}", fg=typer.colors.YELLOW, err=True)
            else:
                result = align_photo(img, size, face=face, name=str(path))
                aligned = result.image
                if len(result.faces) > 1:
                    console.print(
                        f"{path}: {len(result.faces)} faces found, aligned #{result.chosen_index} (--face N picks "
                        "another):",
                        markup=False,
                    )
                    for i, f in enumerate(result.faces):
                        mark = "*" if i == result.chosen_index else " "
                        console.print(
                            f"  {mark} {i}: box {f.box}, {f.box[2] - f.box[0]}x{f.box[3] - f.box[1]} px", markup=False
                        )
            save_photo_atomic(aligned, target)
            console.print(f"{path} -> {target}", markup=False)
        except OutputError:  # the output cannot take files: the next photo would fail the same way
            raise
        except PTIError as e:
            if len(paths) == 1:
                raise
            failures += 1
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    if failures:
        raise PTIError(f"{failures} of {len(paths)} photos could not be aligned (see the messages above)")


def register(app: typer.Typer) -> None:
    """Add `pti align` to the main app."""
    app.command("align")(align)
