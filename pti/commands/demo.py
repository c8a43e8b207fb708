"""`pti demo`: the whole PTI pipeline offline, on the built-in tiny generator and a public-domain photo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pti.commands.common import DeviceOption, console


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo-out"),
    device: DeviceOption = "auto",
) -> None:
    """Align, invert and tune NASA's public-domain astronaut photo on the built-in tiny generator."""
    from PIL import Image

    from pti.commands.tune import run_tune
    from pti.fsutil import atomic_path
    from pti.engine.invert import InvertConfig
    from pti.engine.tune import TuneConfig
    from pti.errors import PTIError

    try:
        import skimage.data
    except ImportError:
        raise PTIError("the demo photo comes from scikit-image: pip install scikit-image") from None
    photo = out / "astronaut.png"
    with atomic_path(photo) as tmp:
        Image.fromarray(skimage.data.astronaut()).save(tmp, format="PNG")
    console.print(f"demo photo: {photo} (NASA, public domain, from scikit-image)")
    console.print("The built-in generator is tiny and untrained: the pivot will not look like her; "
                  "tuning is what makes the reconstruction match the photo.")
    run_tune([photo], network=None, out=out, device=device, align=True, face=None, joint=False,
             invert_cfg=InvertConfig(), tune_cfg=TuneConfig(), exact=False, allow_fallback=True)
    console.print(f"open {out / 'astronaut' / 'contact.png'} to see input, aligned, pivot and reconstruction")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
