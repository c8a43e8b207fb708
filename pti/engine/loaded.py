"""What every checkpoint loader returns, and the one way loaders build our Generator from weights.

Data flows one way: a file -> its format's loader (`nvidia_pkl`, `rosinality`, our safetensors in
`checkpoint`) -> `build_generator` -> a `LoadedGenerator` -> the engine. This module sits below all
the loaders and imports none of them; `checkpoint.load_checkpoint` dispatches to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pti.engine.generator import Generator
from pti.errors import CheckpointError


@dataclass
class LoadedGenerator:
    """A generator plus where it came from; `pti info` prints these."""

    generator: Generator
    format: str  # builtin | stylegan2-ada-pkl | rosinality-pt | pti-safetensors
    source: str  # the path, or "builtin:tiny"
    label: str  # one line for people ("stylegan2-ada-pytorch pickle, G_ema")
    notes: list[str] = field(default_factory=list)  # caveats, e.g. an estimated w_avg

    def to_device(self, device: str | torch.device) -> "LoadedGenerator":
        """Move to `device`, eval mode, gradients off (tuning turns on what it trains)."""
        self.generator = self.generator.to(device).eval().requires_grad_(False)
        return self


def state_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """How `state` fails to fit a module whose state dict is `expected` (names missing, unexpected or of another
    shape, a few of each), for a one-line error; None when it fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    parts = [
        f"{what} {names[:3]}{' ...' if len(names) > 3 else ''} ({len(names)})"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if names
    ]
    return "; ".join(parts) or None


def build_generator(
    init_kwargs: dict[str, Any], state: dict[str, torch.Tensor], source: str, derive_filters: bool = False
) -> Generator:
    """Construct our Generator from `init_kwargs` and load `state` strictly, with one-line errors.

    `derive_filters`: keep the generator's own `resample_filter` buffers (they follow from the config)
    for formats that do not store them under our names.
    """
    try:
        G = Generator(**init_kwargs)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: generator options not understood ({e})") from None
    expected = G.state_dict()
    if derive_filters:
        state = {**{k: v for k, v in expected.items() if k.endswith("resample_filter")}, **state}
    mismatch = state_mismatch(expected, state)
    if mismatch:
        raise CheckpointError(f"{source}: weights do not fit the generator its config describes: {mismatch}")
    with torch.no_grad():
        G.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return G
