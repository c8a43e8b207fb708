"""A tuned person as a stylegan2-ada-pytorch network pickle (`pti export --format nvidia-pkl`).

NVIDIA's loader (`legacy.load_network_pkl`, or `pickle.load` as PTI and DragGAN do it) rebuilds each network
from the `torch_utils.persistence` record it finds in the pickle: the network module's source code, its class
name and its state. pti ships no such source. The records come from the user's own base `.pkl`, read as data by
`pti.engine.safe_pickle` (nothing in it runs), and are written back unchanged: the same type, version,
`module_src` (the same string, byte for byte), class names, constructor arguments and every other attribute,
with the tuned synthesis tensors in place of the base's. The snapshot's other entries (`D`,
`training_set_kwargs`, `augment_pipe`, anything else) are carried over as they were, or `D` is left out on
request. `G_ema` is the tuned generator; a snapshot's `G` (its training copy) is written as the same tuned
network object, so whichever a tool loads it gets the person.

The pickle protocol is the base file's. The globals it names are the ones the base named (persistence, the
EasyDict, numpy's scalar under the module name the file used) plus torch's own tensor reconstructors, written by
a pickler that names them without importing them. After writing, the file is read back with pti's safe
loader and must give the tuned generator bit for bit, or nothing is kept.

Loading the result in NVIDIA's loader runs the `module_src` it carries: the base file's code, as the user gave
it to pti.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pti.engine.checkpoint import BUILTIN_TINY, load_generator, sniff_format
from pti.engine.safe_pickle import Global, PersistentObject, safe_load_pickle
from pti.errors import CheckpointError, ExportError
from pti.fsutil import atomic_path

GENERATOR_KEYS = ("G_ema", "G")  # where a snapshot keeps its generators, the one pti reads first


@dataclass
class WrittenPickle:
    path: Path
    keys: list[str]  # the snapshot's entries as written
    tuned: list[str]  # the entries holding the tuned generator
    replaced: int  # tensors put in place of the base's
    protocol: int
    module_src_bytes: int  # size of the network source the records carry (the base's own)


class _Pickler(pickle._Pickler):
    """The pure-Python pickler, writing `Global` references by name (they are never imported here)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_global_ref(self, obj: Global) -> None:
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[Global] = save_global_ref


def base_pickle(base_hint: str) -> Path:
    """The base generator file, when it is one that can give an NVIDIA pickle; ExportError saying why not."""
    if not base_hint or base_hint == BUILTIN_TINY:
        raise ExportError(
            "an NVIDIA pickle needs NVIDIA's network code, which pti takes from a stylegan2-ada-pytorch .pkl base; "
            f"this generator is {base_hint or 'not recorded'}. Only a .pkl base can give one: --format rosinality "
            "or state-dict work from any base"
        )
    path = Path(base_hint)
    if not path.is_file():
        raise ExportError(f"the base generator {path} is not here; pass it with --network")
    try:
        kind = sniff_format(path)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if kind != "pickle":
        what = {"torch": "a torch .pt (rosinality) checkpoint", "safetensors": "a pti safetensors file"}[kind]
        raise ExportError(
            f"the base generator {path} is {what}, which carries no NVIDIA network code; only a stylegan2-ada-pytorch "
            ".pkl base can give an NVIDIA pickle (--format rosinality or state-dict work from any base)"
        )
    return path


def write_nvidia_pickle(G: torch.nn.Module, base: str | os.PathLike, out: str | os.PathLike, drop_d: bool = False):
    """Write `G` (the base with tuned synthesis weights) into a copy of the snapshot `base`, to `out` (atomically)."""
    base, out = Path(base), Path(out)
    data = base.read_bytes()
    protocol = data[1] if len(data) > 1 and data[0] == 0x80 else 2
    top = safe_load_pickle(io.BytesIO(data), str(base), keep=True)
    del data
    if isinstance(top, PersistentObject):  # a bare network pickle, not a snapshot dict
        entries, key = None, None
        net = top
    elif isinstance(top, dict):
        key = next((k for k in GENERATOR_KEYS if isinstance(top.get(k), PersistentObject)), None)
        if key is None:
            raise ExportError(f"{base} holds no generator ('G_ema' or 'G') to put the tuned weights in")
        entries, net = top, top[key]
    else:
        raise ExportError(f"{base} is a pickle of a {type(top).__name__}, not a network snapshot")
    tensors = {f"synthesis.{k}": v.detach().to("cpu") for k, v in G.synthesis.named_parameters()}
    replaced = _replace_parameters(net, tensors, base)
    if entries is None:
        obj: Any = net
        keys, tuned = [], []
    else:
        obj = dict(entries)
        tuned = [k for k in GENERATOR_KEYS if isinstance(obj.get(k), PersistentObject)]
        for k in tuned:
            obj[k] = net
        if drop_d:
            obj.pop("D", None)
        keys = list(obj)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation chatter while torch pickles storages
            _Pickler(f, protocol=protocol).dump(obj)
        _verify(tmp, G, out)
    return WrittenPickle(out, keys, tuned, replaced, protocol, len(net.module_src.encode("utf-8")))


def _replace_parameters(net: PersistentObject, tensors: dict[str, torch.Tensor], base: Path) -> int:
    """Put `tensors` (state-dict names) in place of the network's parameters of those names, recursively."""
    found = 0

    def walk(obj: PersistentObject, prefix: str) -> None:
        nonlocal found
        params = obj.state.get("_parameters") or {}
        for name, old in list(params.items()):
            full = prefix + name
            if full not in tensors or old is None:
                continue
            new = tensors[full]
            if not isinstance(old, torch.Tensor) or tuple(old.shape) != tuple(new.shape):
                raise ExportError(f"{base}: {full} does not have the tuned weight's shape {tuple(new.shape)}")
            value = new.to(old.dtype).clone().contiguous()
            params[name] = (
                torch.nn.Parameter(value, requires_grad=old.requires_grad)
                if isinstance(old, torch.nn.Parameter)
                else value
            )
            found += 1
        for name, child in (obj.state.get("_modules") or {}).items():
            if isinstance(child, PersistentObject):
                walk(child, prefix + name + ".")

    walk(net, "")
    if found != len(tensors):
        raise ExportError(f"{base}: only {found} of the {len(tensors)} tuned synthesis weights have a place in it")
    return found


def _verify(path: Path, G: torch.nn.Module, out: Path) -> None:
    """The written pickle, read back by pti's safe loader, must be `G` bit for bit."""
    got = load_generator(path).state_dict()
    want = {k: v.detach().to("cpu") for k, v in G.state_dict().items()}
    bad = [k for k in want if k not in got or got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    if bad or set(got) != set(want):
        raise ExportError(f"{out}: the pickle written does not read back as the tuned generator ({bad[:3]}); not kept")
