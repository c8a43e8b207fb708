"""`pti directions ganspace`: edit directions for any generator (PCA of its mapped w's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pti.commands.common import SEED_MAX, DeviceOption, NetworkOption, PhaseProgress, console, network_label

DEFAULT_COMPONENTS = 80  # as many as the authors' ffhq_pca.pt holds

directions_app = typer.Typer(
    name="directions",
    help="Compute edit directions for a generator (GANSpace), usable as --edit FILE:K=VALUE.",
    no_args_is_help=True,
)


@directions_app.command("ganspace")
def ganspace_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write (the ffhq_pca.pt layout: mean, comp, std).")],
    network: NetworkOption = None,
    components: Annotated[
        Optional[int],
        typer.Option(
            "--components",
            "-k",
            min=1,
            max=4096,
            show_default=False,
            help=(
                "Principal components to keep, at most w_dim. Default: 80 (the authors' FFHQ file), or w_dim when "
                "that is smaller."
            ),
        ),
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", min=2, max=100_000_000, help="Mapped z's the PCA is computed from.")
    ] = 100_000,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", min=0, max=SEED_MAX, help="Seed of the z's (numpy RandomState: the same on every machine)."
        ),
    ] = 0,
    batch: Annotated[int, typer.Option("--batch", min=1, max=1_000_000, help="z's mapped per forward pass.")] = 10_000,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite OUT if it exists.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """PCA of mapped w's (GANSpace, Harkonen et al. 2020): components sorted by variance, with their sd."""
    from pti.engine.checkpoint import load_generator
    from pti.engine.device import resolve_device
    from pti.engine.edits import ganspace, save_ganspace
    from pti.errors import OutputError
    from pti.fsutil import ensure_writable_dir

    if out.is_dir():
        raise OutputError(f"cannot write {out}: it is a folder")
    if out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to overwrite it")
    dev = resolve_device(device)
    G = load_generator(network, dev)
    note = None
    if components is None:
        components = min(DEFAULT_COMPONENTS, G.w_dim)
        if components < DEFAULT_COMPONENTS:
            note = (
                f"{components} components: all of this generator's w_dim (the default {DEFAULT_COMPONENTS} is more "
                "than that)"
            )
    if components > G.w_dim:
        raise typer.BadParameter(
            f"{components} components, but this generator's w_dim is {G.w_dim}", param_hint="'--components'"
        )
    if samples <= components:
        raise typer.BadParameter(f"need more samples than components ({components})", param_hint="'--samples'")
    ensure_writable_dir(out.parent)
    console.print(f"generator: {network_label(network)}", markup=False)
    if note:
        console.print(f"note: {note}", markup=False)
    with PhaseProgress() as bar:
        pca = ganspace(G, components, samples, seed, batch, progress=bar.update)
    save_ganspace(pca, out)
    top = ", ".join(f"{s:.3f}" for s in pca["std"][:5].tolist())
    console.print(
        f"wrote {out}: {components} components of w ({G.w_dim}-d) from {samples:,} samples; sd of the first: {top}",
        markup=False,
    )
    console.print(
        f"edit with: pti render PERSON.pti --network {network or 'builtin:tiny'} --edit {out}:0=+2", markup=False
    )


def register(app: typer.Typer) -> None:
    app.add_typer(directions_app, name="directions")
