"""Options and helpers shared by commands. Imports nothing heavy."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console

from pti.errors import PTIError

console = Console(stderr=False, highlight=False)

NetworkOption = Annotated[
    Optional[str],
    typer.Option(
        "--network", "-n",
        help="Generator checkpoint: stylegan2-ada .pkl, rosinality .pt or pti .safetensors. "
        "Default: the built-in tiny generator (random weights, for offline demos).",
    ),
]
BUILTIN_NAMES = (None, "", "builtin:tiny")


def network_label(network: str | None) -> str:
    """How output names the generator; the built-in one always says it is untrained."""
    if network in BUILTIN_NAMES:
        from pti.engine.generator import TINY_LABEL

        return TINY_LABEL
    return str(network)


DeviceOption = Annotated[str, typer.Option("--device", help="auto (GPU if present), cpu or cuda.")]


def parse_seeds(text: str) -> list[int]:
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11]."""
    seeds: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            lo_i, hi_i = int(lo), int(hi or lo)
            if hi_i < lo_i:
                raise ValueError
            seeds.extend(range(lo_i, hi_i + 1))
    except ValueError:
        raise PTIError(f"cannot read seeds {text!r}; use a list like '0-7' or '1,5,9'") from None
    if not seeds or max(seeds) >= 2**32:
        raise PTIError(f"seeds must be between 0 and 2^32-1, got {text!r}")
    return seeds
