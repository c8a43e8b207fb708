"""The authors' PTI outputs (danielroich/PTI) -> a `.pti` identity, without running anything from the files.

What their code saves: `torch.save(self.G, "model_<run>_<image>.pt")`, where `G` is NVIDIA's `G_ema`
unpickled from the base `.pkl`, moved to CUDA, `.float()`, then tuned; and `torch.save(w_pivot, "0.pt")`.
The first is torch's zip container (`<prefix>/data.pkl`, `<prefix>/data/<key>`, `<prefix>/byteorder`, ...)
whose `data.pkl` is a protocol-2 pickle of `torch_utils.persistence` records, the same records a network
`.pkl` holds, with each tensor storage pulled out of the pickle as the persistent id
`('storage', torch.FloatStorage, key, 'cuda:0', numel)` and its bytes stored as the member `data/<key>`.

`read_checkpoint` reads it with `zipfile` and the `.pkl` files' restricted unpickler, extended by exactly
that persistent id: the storage class resolves to a marker of a fixed dtype table (never to torch's class),
and the storage is built from the member's bytes, little-endian only, its size checked against `numel`.
Every other global is refused as for `.pkl` files, before anything could be called.

`import_tuning` then checks that the checkpoint is a tuning of the given base: PTI's optimizer holds all of
G's parameters but only the synthesis gets gradients, so the config, the state-dict names and shapes, the
mapping parameters and every buffer must equal the base's bit for bit; what differs is the tuned synthesis.
The result is an `Identity` (the delta from the base, the pivot, and where both came from).
"""

from __future__ import annotations

import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import torch

from pti.engine.checkpoint import _TORCH_LEGACY_MAGIC, generator_hash, sniff_format
from pti.engine.generator import Generator
from pti.engine.identity import Identity, versions
from pti.engine.loaded import build_generator
from pti.engine.nvidia_pkl import _check_architecture, generator_kwargs
from pti.engine.pivots import fit_pivot, read_pivot_file
from pti.engine.safe_pickle import UNPICKLING_ERRORS, PersistentObject, RestrictedUnpickler
from pti.errors import CheckpointError
from pti.fsutil import sha256_file

FORMAT = "danielroich/PTI checkpoint"  # how the identity's metadata names what it was imported from
TUNED_BY = "danielroich/PTI"  # the `impl` the identity records for the tuning (the authors' code ran it)

# torch's storage classes by the name a pickle gives them -> the dtype of their elements. The names are
# only looked up here; torch's classes themselves are never resolved from a file.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class StorageType:
    """What `torch.<name>Storage` in a checkpoint's pickle resolves to: a marker of its element dtype."""

    name: str
    dtype: torch.dtype


# ---------------------------------------------------------------------------------------------
# torch's zip container, read as data


class _TorchZip:
    """The storages of one torch.save zip: `<prefix>/data/<key>`, each read once and checked."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, source: str) -> None:
        self.zf, self.prefix, self.source = zf, prefix, source
        self.members = {i.filename: i for i in zf.infolist()}
        self.storages: dict[str, tuple[torch.dtype, int, torch.storage.TypedStorage]] = {}

    def storage(self, kind: Any, key: Any, location: Any, numel: Any) -> torch.storage.TypedStorage:
        if not isinstance(kind, StorageType):
            raise CheckpointError(f"{self.source}: a tensor storage of unknown type {kind!r}")
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_]+", key):
            raise CheckpointError(f"{self.source}: a tensor storage with the malformed key {key!r}")
        if not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise CheckpointError(f"{self.source}: malformed tensor storage {key}")
        if key in self.storages:  # one storage shared by several tensors (views): the same each time
            dtype, n, storage = self.storages[key]
            if (dtype, n) != (kind.dtype, numel):
                raise CheckpointError(f"{self.source}: tensor storage {key} is named with two different types")
            return storage
        name = f"{self.prefix}/data/{key}"
        info = self.members.get(name)
        if info is None:
            raise CheckpointError(f"{self.source}: tensor storage {key} is missing (no {name} in the zip)")
        want = numel * kind.dtype.itemsize
        if info.file_size != want:  # checked before reading: a size from the zip's directory, not the data
            raise CheckpointError(
                f"{self.source}: tensor storage {key} holds {info.file_size} bytes, its tensors need {want} "
                f"({numel} x {kind.name})"
            )
        data = bytearray(self.zf.read(info))
        if len(data) != want:
            raise CheckpointError(f"{self.source}: tensor storage {key} is truncated")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation chatter
            untyped = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if want else torch.UntypedStorage(0)
            storage = torch.storage.TypedStorage(wrap_storage=untyped, dtype=kind.dtype, _internal=True)
        self.storages[key] = (kind.dtype, numel, storage)
        return storage


class CheckpointUnpickler(RestrictedUnpickler):
    """The `.pkl` files' restricted unpickler, plus torch.save's storage persistent ids (see the module docstring)."""

    def __init__(self, file: BinaryIO, container: _TorchZip, source: str = "checkpoint") -> None:
        super().__init__(file, source)
        self.container = container

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name, STORAGE_DTYPES[name])
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            what = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
            raise CheckpointError(f"{self.source} uses a pickle persistent id of kind {what!r}, not a tensor storage")
        _, kind, key, location, numel = pid
        return self.container.storage(kind, key, location, numel)


def read_checkpoint(path: str | Path) -> Any:
    """The object a `torch.save` zip holds, unpickled with the restricted unpickler (nothing from it runs)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:1] == b"\x80" and head[2:14] == _TORCH_LEGACY_MAGIC[2:14]:  # any pickle protocol
        raise CheckpointError(
            f"{path} is a legacy (pre-1.6) torch.save file, which pti does not read; re-save it with torch >= 1.6 "
            "in the environment that made it (torch.save(torch.load(f), f2)) and import that"
        )
    if not head.startswith(b"PK\x03\x04"):
        kind = sniff_format(path)  # images, text, empty and truncated files are named there
        raise CheckpointError(
            f"{path} is a {'network pickle (.pkl)' if kind == 'pickle' else kind + ' file'}, not a torch.save "
            "checkpoint of the authors' PTI (model_<run>_<image>.pt); a .pkl is the base: pass it with --base"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _data_prefix(zf, source)
            container = _TorchZip(zf, prefix, source)
            _check_byteorder(zf, prefix, source)
            with zf.open(f"{prefix}/data.pkl") as f:
                return _unpickle(f, container, source)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path} is a truncated or damaged zip file ({e})") from None


def _data_prefix(zf: zipfile.ZipFile, source: str) -> str:
    """The one folder holding `data.pkl`; every member must stay inside the archive."""
    names = zf.namelist()
    for name in names:
        p = PurePosixPath(name)
        if name.startswith("/") or "\\" in name or ".." in p.parts or re.match(r"[A-Za-z]:", name):
            raise CheckpointError(f"{source}: the zip member {name!r} points outside the archive; refusing it")
    pkls = [n for n in names if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pkls) != 1:
        raise CheckpointError(
            f"{source} is a zip file but not a torch.save checkpoint "
            f"({'no' if not pkls else len(pkls)} <name>/data.pkl member{'s' if len(pkls) > 1 else ''})"
        )
    return pkls[0].split("/")[0]


def _check_byteorder(zf: zipfile.ZipFile, prefix: str, source: str) -> None:
    # torch >= 1.10 records the writer's byte order; files without it come from little-endian machines. The
    # storages are read as this machine's numbers, so it must be little-endian too.
    if sys.byteorder != "little":
        raise CheckpointError(f"{source}: pti reads torch.save checkpoints on little-endian machines only")
    name = f"{prefix}/byteorder"
    if name in zf.namelist():
        order = zf.read(name)[:16].decode("ascii", "replace").strip()
        if order != "little":
            raise CheckpointError(f"{source} was written on a {order!r}-endian machine; pti reads little-endian only")


def _unpickle(f: BinaryIO, container: _TorchZip, source: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CheckpointUnpickler(f, container, source).load()
    except CheckpointError:
        raise
    except (*UNPICKLING_ERRORS, RuntimeError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{source}: data.pkl is truncated or not a valid pickle ({type(e).__name__}: {e})"
        ) from None


# ---------------------------------------------------------------------------------------------
# the tuned generator, checked against its base


def load_tuned_generator(path: str | Path) -> Generator:
    """Our Generator with the weights of the authors' tuned checkpoint `path` (a torch.save of NVIDIA's G)."""
    path = Path(path)
    top = read_checkpoint(path)
    if not isinstance(top, PersistentObject):
        raise CheckpointError(f"{path} holds {_what(top)}, not the generator the authors' PTI saves (torch.save(G))")
    kwargs = generator_kwargs(top, path)
    _check_architecture(top, kwargs, path)
    return build_generator(kwargs, top.flat_state(), str(path))


def _what(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = ", ".join(sorted(map(str, obj))[:6]) or "nothing"
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return f"a state dict ({len(obj)} tensors: {keys}{' ...' if len(obj) > 6 else ''})"
        return f"a dict (keys: {keys}{' ...' if len(obj) > 6 else ''})"
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {list(obj.shape)} (a pivot? pass it with --pivot)"
    return f"a {type(obj).__name__}"


def differences(tuned: Generator, base: Generator, limit: int = 3) -> list[str]:
    """What makes `tuned` something other than a PTI tuning of `base` ([] when it is one): the config, the
    state-dict names and shapes, and every tensor but the synthesis parameters, compared bit for bit."""
    if tuned.init_kwargs != base.init_kwargs:
        diffs = _dict_diff(tuned.init_kwargs, base.init_kwargs)
        return [f"its config differs ({'; '.join(diffs[:limit])}{' ...' if len(diffs) > limit else ''})"]
    a, b = tuned.state_dict(), base.state_dict()
    if a.keys() != b.keys():
        only = sorted(set(a) ^ set(b))
        return [f"its weights are named differently ({', '.join(only[:limit])})"]
    shapes = [k for k in a if a[k].shape != b[k].shape]
    if shapes:
        return [f"{k} is {list(a[k].shape)}, the base's {list(b[k].shape)}" for k in shapes[:limit]]
    tuned_names = {f"synthesis.{n}" for n, _ in tuned.synthesis.named_parameters()}
    fixed = [k for k in a if k not in tuned_names]  # mapping parameters and every buffer
    changed = [k for k in fixed if not _same_bits(a[k], b[k])]
    out = [
        f"{k} differs from the base's (max |diff| {(a[k].double() - b[k].double()).abs().max().item():.3g})"
        for k in changed[:limit]
    ]
    if len(changed) > limit:
        out.append(f"and {len(changed) - limit} more of the {len(fixed)} tensors PTI leaves as they are")
    return out


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal bit for bit (NaN payloads and the sign of zero included), as the content hash sees tensors."""
    x, y = x.detach().cpu().contiguous().reshape(-1), y.detach().cpu().contiguous().reshape(-1)
    return x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def _dict_diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            name = f"{where}.{k}" if where else str(k)
            if k not in a or k not in b:
                out.append(f"{name} only in the {'checkpoint' if k in a else 'base'}")
            else:
                out += _dict_diff(a[k], b[k], name)
        return out
    return [] if a == b else [f"{where} {a!r} in the checkpoint, {b!r} in the base"]


@dataclass
class Imported:
    """What `import_tuning` read and made."""

    identity: Identity  # the person: the delta from the base, the pivot and where they came from
    tuned: Generator  # the checkpoint's generator (ours, with its weights)
    pivot_shape: list[int]  # the pivot as the file stores it
    max_change: float  # max |tuned - base| over the synthesis parameters
    changed: int  # synthesis parameters that differ from the base's
    parameters: int  # synthesis parameters in all
    encoding_error: float  # max |stored - tuned| after applying (0.0 with exact)
    notes: list[str] = field(default_factory=list)


def import_tuning(
    checkpoint: str | Path,
    pivot: str | Path,
    base: Generator,
    base_hint: str,
    exact: bool = False,
    base_hash: str | None = None,
) -> Imported:
    """The identity of the authors' tuned `checkpoint` and its `pivot`, on `base` (the generator it was tuned
    from, loaded from `base_hint`). CheckpointError (one line) when the checkpoint is not a tuning of it."""
    checkpoint, pivot = Path(checkpoint), Path(pivot)
    stored = read_pivot_file(pivot)  # the small file first: a wrong pivot fails before the 127 MB are read
    w = fit_pivot(stored, pivot, base.num_ws, base.w_dim)
    device = next(base.parameters()).device
    tuned = load_tuned_generator(checkpoint).to(device).eval().requires_grad_(False)
    diffs = differences(tuned, base)
    if diffs:
        raise CheckpointError(f"{checkpoint} is not a PTI tuning of this base ({base_hint}): {'; '.join(diffs)}")
    bad = [n for n, p in tuned.synthesis.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"{checkpoint} holds NaN or infinite weights in synthesis.{bad[0]} ({len(bad)} tensors)")
    base_hash = base_hash or generator_hash(base)
    meta = {
        "imported": {
            "format": FORMAT,
            "checkpoint": str(checkpoint),
            "checkpoint_path": str(checkpoint.resolve()),
            "checkpoint_sha256": sha256_file(checkpoint),
            "pivot": str(pivot),
            "pivot_path": str(pivot.resolve()),
            "pivot_sha256": sha256_file(pivot),
            "pivot_shape": list(stored.shape),
        },
        "photo": None,
        "steps": None,  # the authors' code records none in its files
        "precision": "fp32",  # their G is .float() and renders with force_fp32=True; TF32 is not known
        "impl": {"tune": {"impl": TUNED_BY, "precision": "fp32", "flags": None}},
        "versions": versions(),
    }
    ident = Identity.from_tuning(base, tuned, w, base_hash, base_hint, exact=exact, meta=meta)
    changes = {
        n: (p.detach() - q.detach()).abs().max().item()
        for (n, p), q in zip(tuned.synthesis.named_parameters(), base.synthesis.parameters())
    }
    applied = ident.apply(base, base_hash)
    error = max(
        ((p - q).abs().max().item() for p, q in zip(applied.synthesis.parameters(), tuned.synthesis.parameters())),
        default=0.0,
    )
    notes = []
    changed = sum(1 for v in changes.values() if v > 0)
    if not changed:
        notes.append(f"{checkpoint}'s synthesis weights equal the base's: nothing was tuned in it")
    return Imported(
        ident, tuned, list(stored.shape), max(changes.values(), default=0.0), changed, len(changes), error, notes
    )
