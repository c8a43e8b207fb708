"""`pti generate`: render random seeds from a generator (or the built-in tiny one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pti.commands.common import DeviceOption, NetworkOption, console, network_label, parse_seeds


def generate(
    network: NetworkOption = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Seeds to render: '0-7', '1,5,9' or a mix.")] = "0-7",
    trunc: Annotated[float, typer.Option("--trunc", help="Truncation psi: 1 = none, lower = closer to the average face.")] = 0.7,
    noise_mode: Annotated[str, typer.Option("--noise-mode", help="Per-pixel noise: const, random or none.")] = "const",
    outdir: Annotated[Path, typer.Option("--outdir", "-o", help="Where to write seedNNNN.png and grid.png.")] = Path("out/generate"),
    device: DeviceOption = "auto",
) -> None:
    """Render images for random seeds, one PNG per seed plus a grid."""
    import numpy as np
    import torch

    from pti.engine.checkpoint import load_generator
    from pti.engine.device import resolve_device
    from pti.engine.images import grid, save_png, to_uint8
    from pti.errors import PTIError

    if noise_mode not in ("const", "random", "none"):
        raise PTIError(f"--noise-mode must be const, random or none, not {noise_mode!r}")
    seed_list = parse_seeds(seeds)
    dev = resolve_device(device)
    G = load_generator(network, dev)
    console.print(f"generator: {network_label(network)}")
    written, tiles = [], []
    with console.status("rendering") as status:
        for i, seed in enumerate(seed_list):
            status.update(f"rendering seed {seed} ({i + 1}/{len(seed_list)})")
            z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).to(dev, torch.float32)
            with torch.no_grad():
                ws = G.mapping(z, truncation_psi=trunc)
                img = G.synthesis(ws, noise_mode=noise_mode)
            arr = to_uint8(img[0])
            tiles.append(arr)
            written.append(save_png(arr, outdir / f"seed{seed:04d}.png"))
    written.append(save_png(grid(tiles), outdir / "grid.png"))
    console.print(f"wrote {len(written)} files to {outdir}/: {len(seed_list)} seeds + grid.png")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
