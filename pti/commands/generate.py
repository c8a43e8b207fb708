"""`pti generate`: render random seeds from a generator (or the built-in tiny one)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from pti.commands.common import (
    DeviceOption,
    NetworkOption,
    console,
    network_label,
    parse_seeds,
    plural,
    seeds_callback,
    thread_setting,
)


GRID_MAX = 64  # seeds shown in grid.png: a grid of thousands of faces helps nobody and fills memory


class NoiseMode(str, Enum):
    const = "const"
    random = "random"
    none = "none"


def generate(
    network: NetworkOption = None,
    seeds: Annotated[
        str,
        typer.Option(
            "--seeds", callback=seeds_callback, help="Seeds to render: '0-7', '1,5,9' or a mix (0 to 2^32-1)."
        ),
    ] = "0-7",
    trunc: Annotated[
        float,
        typer.Option(
            "--trunc",
            min=-1.0,
            max=1.0,
            help="Truncation psi: 1 = none, 0 = the average face, negative = the far side of it.",
        ),
    ] = 0.7,
    noise_mode: Annotated[NoiseMode, typer.Option("--noise-mode", help="Per-pixel noise.")] = NoiseMode.const,
    outdir: Annotated[
        Path, typer.Option("--outdir", "-o", help="Where to write seedNNNN.png and grid.png (at most 64 seeds).")
    ] = Path("out/generate"),
    device: DeviceOption = "auto",
) -> None:
    """Render images for random seeds, one PNG per seed plus a grid."""
    import numpy as np
    import torch

    from pti.engine.checkpoint import load_generator
    from pti.engine.device import apply_cpu_threads, resolve_device
    from pti.engine.images import grid, save_png, to_uint8
    from pti.fsutil import ensure_writable_dir

    seed_list = parse_seeds(seeds)
    dev = resolve_device(device)
    G = load_generator(network, dev)
    apply_cpu_threads(G, dev, thread_setting())
    ensure_writable_dir(outdir)
    console.print(f"generator: {network_label(network)}", markup=False)
    written, tiles = [], []
    with console.status("rendering") as status:
        for i, seed in enumerate(seed_list):
            status.update(f"rendering seed {seed} ({i + 1}/{len(seed_list)})")
            z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).to(dev, torch.float32)
            with torch.no_grad():
                ws = G.mapping(z, truncation_psi=trunc)
                img = G.synthesis(ws, noise_mode=noise_mode.value)
            arr = to_uint8(img[0])
            if len(tiles) < GRID_MAX:
                tiles.append(arr)
            written.append(save_png(arr, outdir / f"seed{seed:04d}.png"))
    written.append(save_png(grid(tiles), outdir / "grid.png"))
    shown = "" if len(seed_list) <= GRID_MAX else f" of the first {GRID_MAX}"
    console.print(
        f"wrote {len(written)} files to {outdir}/: {plural(len(seed_list), 'seed')} + grid.png{shown}", markup=False
    )


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
