"""`pti demo`: the whole PTI pipeline offline, on the built-in tiny generator and a public-domain photo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pti.commands.common import DeviceOption, console

SWEEP = "0=-1:1:7"  # GANSpace component 0 of the tiny generator, -1 to +1 sd in 7 frames


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo-out"),
    device: DeviceOption = "auto",
) -> None:
    """Align, invert and tune NASA's public-domain astronaut photo on the built-in tiny generator, then edit it."""
    from PIL import Image

    from pti.commands.render import _summary as render_summary
    from pti.commands.tune import run_tune
    from pti.engine.invert import InvertConfig
    from pti.engine.tune import TuneConfig
    from pti.errors import PTIError
    from pti.fsutil import atomic_path

    try:
        import skimage.data
    except ImportError:
        raise PTIError("the demo photo comes from scikit-image: pip install scikit-image") from None
    from pti.engine.device import resolve_device

    resolve_device(device)  # a device that is not there fails before anything is written
    photo = out / "astronaut.png"
    with atomic_path(photo) as tmp:
        Image.fromarray(skimage.data.astronaut()).save(tmp, format="PNG")
    console.print(f"demo photo: {photo} (NASA, public domain, from scikit-image)", markup=False)
    console.print(
        "The built-in generator is tiny and untrained: the pivot will not look like her; "
        "tuning is what makes the reconstruction match the photo."
    )
    run_tune(
        [photo],
        network=None,
        out=out,
        device=device,
        align=True,
        face=None,
        joint=False,
        invert_cfg=InvertConfig(),
        tune_cfg=TuneConfig(),
        exact=False,
        allow_fallback=True,
    )
    result = _edit(out, device)
    render_summary(result)
    console.print(
        f"open {out / 'astronaut' / 'contact.png'} to see input, aligned, pivot, reconstruction and an edit sweep",
        markup=False,
    )


def _edit(out: Path, device: str):
    """GANSpace directions for the tiny generator, a sweep of its first component,
    and the contact sheet grown by a row."""
    import numpy as np
    from PIL import Image

    import pti.rendering
    from pti.engine.checkpoint import load_generator
    from pti.engine.device import resolve_device
    from pti.engine.edits import ganspace, save_ganspace
    from pti.engine.images import labelled_sheet
    from pti.engine.layout import Layout
    from pti.engine.photo import load_photo, save_photo_atomic

    dirs = out / "tiny_ganspace.pt"
    console.print(f"computing GANSpace directions for the tiny generator -> {dirs}", markup=False)
    save_ganspace(ganspace(load_generator(None, resolve_device(device)), components=16, samples=20_000), dirs)
    person = Layout(out, "astronaut")
    result = pti.rendering.render(
        person.identity, [f"{dirs}:{SWEEP}"], person.edits, pti.rendering.RenderConfig(device=device)
    )
    first = [("input", load_photo(out / "astronaut.png"))] + [
        (label, Image.open(path))
        for label, path in (
            ("aligned", person.aligned),
            ("pivot (before tuning)", person.pivot),
            ("reconstruction (after)", person.reconstruction),
        )
    ]
    sweep = [(f"GANSpace 0 at {v:+.2g} sd", img) for v, img in zip(np.linspace(-1, 1, 7), result.images)]
    save_photo_atomic(labelled_sheet([first, sweep], size=128), person.contact)
    return result


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
