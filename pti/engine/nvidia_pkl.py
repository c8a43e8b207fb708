"""stylegan2-ada-pytorch / stylegan3 `.pkl` snapshots -> our Generator, without running the file's code.

The pickle is read by `safe_pickle` into `PersistentObject`s (class name + state as data). From the
generator object we take its constructor arguments (`_init_args`, `_init_kwargs`) and its
parameters/buffers (`_parameters`, `_buffers`, `_modules`, recursively), build our own Generator
from the arguments and load the weights strictly: the names are NVIDIA's, so nothing is renamed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pti.engine.loaded import LoadedGenerator, build_generator
from pti.engine.safe_pickle import PersistentObject, safe_load_pickle
from pti.errors import CheckpointError
from pti.fsutil import plain

# NVIDIA's positional order, for snapshots whose networks were built with positional arguments.
_GENERATOR_ARGS = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs", "synthesis_kwargs")


def load_nvidia_pickle(path: Path) -> LoadedGenerator:
    with open(path, "rb") as f:
        top = safe_load_pickle(f, str(path))
    key, net = _pick_generator(top, path)
    kwargs = generator_kwargs(net, path)
    _check_architecture(net, kwargs, path)
    G = build_generator(kwargs, net.flat_state(), str(path))
    label = "stylegan2-ada-pytorch pickle" + (f", {key}" if key else "")
    return LoadedGenerator(G, "stylegan2-ada-pkl", str(path), label)


def _pick_generator(top: Any, path: Path) -> tuple[str | None, PersistentObject]:
    if isinstance(top, PersistentObject):
        return None, top
    if isinstance(top, dict):
        for key in ("G_ema", "G"):
            if isinstance(top.get(key), PersistentObject):
                return key, top[key]
        found = ", ".join(sorted(map(str, top))[:8]) or "nothing"
        raise CheckpointError(f"{path} is a pickle without a generator ('G_ema' or 'G'); its keys: {found}")
    raise CheckpointError(f"{path} is a pickle of a {type(top).__name__}, not a network snapshot")


def generator_kwargs(net: PersistentObject, path: Path) -> dict[str, Any]:
    """The generator's constructor arguments as plain JSON-able data."""
    args = net.init_args
    if len(args) > len(_GENERATOR_ARGS):
        raise CheckpointError(f"{path}: generator built with {len(args)} positional arguments, expected at most 7")
    kwargs = dict(zip(_GENERATOR_ARGS, args))
    kwargs.update(net.init_kwargs)
    return plain(kwargs, other=_unexpected)  # EasyDicts, tuples and numpy scalars -> dicts, lists and numbers


def _unexpected(obj: Any):
    raise CheckpointError(f"generator option of unexpected type {type(obj).__name__}")


def _check_architecture(net: PersistentObject, kwargs: dict[str, Any], path: Path) -> None:
    """Refuse what our Generator cannot be, saying what the file holds instead."""
    if net.class_name != "Generator":
        raise CheckpointError(f"{path}: the generator is a {net.class_name}, not a StyleGAN2 Generator")
    synthesis = net.modules.get("synthesis")
    if not isinstance(synthesis, PersistentObject):
        raise CheckpointError(f"{path}: the generator has no synthesis network")
    layers = list(synthesis.modules)
    if any(re.match(r"L\d+_\d+_\d+$", name) for name in layers) or "input" in layers:
        raise CheckpointError(
            f"{path} holds a StyleGAN3 (alias-free) generator (layers {layers[:2]}...), "
            "which is not supported; use a StyleGAN2 / StyleGAN2-ADA checkpoint"
        )
    if int(kwargs.get("c_dim") or 0) != 0:
        raise CheckpointError(f"{path} holds a conditional generator (c_dim={kwargs['c_dim']}), which is not supported")
    syn = {**(kwargs.get("synthesis_kwargs") or {}), **{k: v for k, v in kwargs.items() if k not in _GENERATOR_ARGS}}
    arch = syn.get("architecture", "skip")
    if arch != "skip":
        raise CheckpointError(
            f"{path} holds a generator with architecture={arch!r}; only 'skip' (config-f) is supported"
        )
    if not all(re.match(r"b\d+$", name) for name in layers):
        raise CheckpointError(f"{path}: unexpected synthesis layers {layers[:4]}; not a StyleGAN2 generator")
