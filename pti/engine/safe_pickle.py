"""A restricted unpickler for stylegan2-ada-pytorch / stylegan3 network pickles.

NVIDIA's `.pkl` files are plain `pickle.dump`s of a dict of `torch_utils.persistence` objects. Each
network pickles as `_reconstruct_persistent_obj(meta)` with
`meta = {type, version, module_src, class_name, state}`; NVIDIA's own loader `exec`s `module_src`,
so opening such a file with `pickle.load` runs whatever code the file carries.

This unpickler resolves only an allow-list of globals, each mapped to a function of ours that checks
its arguments and builds plain data:

- `torch_utils.persistence._reconstruct_persistent_obj` -> `PersistentObject` (the meta read as
  data; `module_src` is kept as a string for inspection and is never executed);
- `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter[_with_state]` -> tensors, after type checks;
- `torch.storage._load_from_bytes` -> `torch.load(weights_only=True)` on those bytes (the original
  callable would `torch.load` them with the full unpickler);
- `collections.OrderedDict`, `builtins.set`/`frozenset`, `dnnlib.util.EasyDict` (read as a dict),
  torch dtypes, `torch.Size`, `_codecs.encode` (latin1 only: protocol-2 bytes), and the numpy scalar/array/dtype
  reconstructors (non-object dtypes).

Every other global (`os.system`, `builtins.eval`, `subprocess.Popen`, an unknown class, ...) raises
`CheckpointError` from `find_class`, before anything could be called. Persistent ids are refused.

Writing a pickle back (`pti export --format nvidia-pkl`): what this unpickler reads can be pickled again
with the same globals, so a user's records go back out unchanged. `PersistentObject` keeps its whole meta
and reduces to `torch_utils.persistence._reconstruct_persistent_obj(meta)`, an EasyDict to the EasyDict it
was, and with `keep=True` numpy values come back as `Kept` calls of the numpy global the file named. The
globals are `Global` references, which only `pti.export.nvidia_pkl`'s pickler writes (by name, without
importing them).
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch

from pti.errors import CheckpointError


PERSISTENCE = "torch_utils.persistence"


@dataclass(frozen=True)
class Global:
    """The global `module.name` named in a pickle, to be written back by name (never imported or resolved)."""

    module: str
    name: str

    def __call__(self, *args, **kwargs):  # pickle's writer wants the reducer of a record to be callable
        raise TypeError(f"{self.module}.{self.name} is a name in a pickle; pti never calls it")


@dataclass
class PersistentObject:
    """One `torch_utils.persistence` object, read as data (its source code is never run)."""

    class_name: str  # e.g. "Generator", "SynthesisNetwork", "SynthesisLayer"
    version: int  # persistence format version (6 in stylegan2-ada-pytorch)
    module_src: str  # source the file carries; kept for inspection only
    state: dict[str, Any]  # the module's __dict__ as pickled (parameters, buffers, ...)
    meta: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # the record as read

    def __reduce__(self):
        """The record as the file had it (its meta's keys in their order, `state` as it is now)."""
        meta = (
            dict(self.meta)
            if self.meta is not None
            else dict(type="class", version=self.version, module_src=self.module_src, class_name=self.class_name)
        )
        meta["state"] = self.state
        return Global(PERSISTENCE, "_reconstruct_persistent_obj"), (meta,)

    @property
    def init_args(self) -> tuple:
        return tuple(self.state.get("_init_args") or ())

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return dict(self.state.get("_init_kwargs") or {})

    @property
    def modules(self) -> dict[str, Any]:
        return dict(self.state.get("_modules") or {})

    def flat_state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Parameters and persistent buffers of this object and its children, named as in a state_dict."""
        out: dict[str, torch.Tensor] = {}
        non_persistent = set(self.state.get("_non_persistent_buffers_set") or ())
        for name, t in (self.state.get("_parameters") or {}).items():
            if t is not None:
                out[prefix + name] = _as_tensor(t, prefix + name)
        for name, t in (self.state.get("_buffers") or {}).items():
            if t is not None and name not in non_persistent:
                out[prefix + name] = _as_tensor(t, prefix + name)
        for name, child in self.modules.items():
            if child is None:
                continue
            if not isinstance(child, PersistentObject):
                raise CheckpointError(f"submodule {prefix + name} is a {type(child).__name__}, not a network object")
            out.update(child.flat_state(prefix + name + "."))
        return out


def _as_tensor(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{name} is a {type(t).__name__}, not a tensor")
    return t.detach()


class _PlainDict(dict):
    """What `dnnlib.util.EasyDict` unpickles to: a dict that tolerates pickle's BUILD step, and pickles back
    as the EasyDict it was read as."""

    _module = "dnnlib.util"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.update(state)

    def __reduce__(self):
        return Global(self._module, "EasyDict"), (), None, None, iter(self.items())


class _PlainDictRoot(_PlainDict):
    _module = "dnnlib"  # `dnnlib.EasyDict`, as some snapshots spell it


class Kept:
    """A call of an allowed global, kept as (global, args, BUILD state) to be pickled back as it was read
    (`RestrictedUnpickler(keep=True)`: numpy scalars and arrays keep the module names the file used)."""

    def __init__(self, ref: Global, args: tuple) -> None:
        self.ref, self.args, self.state = ref, args, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __reduce__(self):
        return (self.ref, self.args) if self.state is None else (self.ref, self.args, self.state)


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
    if not isinstance(meta, dict):
        raise CheckpointError("malformed persistent object: its meta is not a dict")
    if meta.get("type") != "class":
        raise CheckpointError(f"unsupported persistent object type {meta.get('type')!r}")
    class_name, state = meta.get("class_name"), meta.get("state")
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise CheckpointError("malformed persistent object: class_name/state missing")
    src = meta.get("module_src")
    return PersistentObject(
        class_name=class_name,
        version=int(meta.get("version", 0)),
        module_src=src if isinstance(src, str) else "",
        state=dict(state),
        meta={k: v for k, v in meta.items() if k != "state"},
    )


def _load_from_bytes(data: Any) -> Any:
    # The bytes are a legacy `torch.save` of one storage; the weights-only loader reads exactly that.
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointError("malformed tensor storage in pickle")
    try:
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only loader refuses anything but tensors and storages
        raise CheckpointError(f"unreadable tensor storage in pickle ({type(e).__name__}: {e})") from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise CheckpointError(f"tensor storage in pickle decoded to a {type(storage).__name__}")
    return storage


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles spell bytes objects as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("unexpected _codecs.encode call in pickle")
    return text.encode("latin1")


def _check_ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list, torch.Size)) or not all(isinstance(v, int) for v in values):
        raise CheckpointError(f"malformed tensor {what} in pickle")
    return tuple(values)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, torch.storage.TypedStorage) or not isinstance(storage_offset, int):
        raise CheckpointError("malformed tensor in pickle")
    if backward_hooks:  # hooks are callables: a weights file has none
        raise CheckpointError("tensor in pickle carries backward hooks")
    size, stride = _check_ints(size, "size"), _check_ints(stride, "stride")
    try:
        t = torch._utils._rebuild_tensor(storage, storage_offset, size, stride)
    except RuntimeError as e:  # e.g. a view reaching past its storage
        raise CheckpointError(f"malformed tensor in pickle ({e})") from None
    t.requires_grad = bool(requires_grad) and t.is_floating_point()
    return t


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("malformed parameter in pickle")
    if backward_hooks:
        raise CheckpointError("parameter in pickle carries backward hooks")
    return torch.nn.Parameter(data.detach(), requires_grad=bool(requires_grad))


def _numpy_allowed() -> dict[tuple[str, str], Any]:
    def scalar(dtype, data=None):
        if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
            raise CheckpointError("unsupported numpy scalar in pickle")
        return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]

    def reconstruct(cls, shape, dtype_code):
        if cls is not np.ndarray:
            raise CheckpointError("unsupported numpy array subclass in pickle")
        return np.ndarray.__new__(np.ndarray, shape, dtype_code)

    def dtype(spec, align=False, copy=False):
        d = np.dtype(spec)
        if d.hasobject:
            raise CheckpointError("numpy object arrays are not allowed in a checkpoint")
        return d

    table = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "scalar")] = scalar
        table[(mod, "_reconstruct")] = reconstruct
    table[("numpy", "dtype")] = dtype
    table[("numpy", "ndarray")] = np.ndarray
    return table


_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}

_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # protocol-2 pickles written by Python 2 era tools
    ("dnnlib.util", "EasyDict"): _PlainDict,
    ("dnnlib", "EasyDict"): _PlainDictRoot,
    ("torch", "Size"): torch.Size,
    ("_codecs", "encode"): _codecs_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only the allow-list above; see the module docstring."""

    def __init__(self, file: BinaryIO, source: str = "checkpoint", keep: bool = False) -> None:
        super().__init__(file)
        self.source = source  # file name, for error messages
        self.keep = keep  # numpy values as `Kept` calls, to be written back unchanged
        self._numpy: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(torch, name)
        if module.startswith("numpy"):
            if not self._numpy:
                self._numpy = _numpy_allowed()
            if key in self._numpy:
                if self.keep and module.endswith(".multiarray"):  # the module numpy moved in 2.0: keep the file's
                    return _kept(self._numpy[key], Global(module, name))
                return self._numpy[key]
        if module.startswith("dnnlib.tflib"):
            raise CheckpointError(
                f"{self.source} is a TensorFlow StyleGAN2 pickle ({module}.{name}), which is not supported yet; "
                "convert it first with NVIDIA's stylegan2-ada-pytorch legacy.py "
                "(python legacy.py --source=IN.pkl --dest=OUT.pkl) and load the result"
            )
        raise CheckpointError(
            f"{self.source} refers to {module}.{name}, which a generator checkpoint has no "
            "reason to contain; refusing to load it (nothing from the file was run)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.source} uses pickle persistent ids, which NVIDIA network pickles do not")


def load_weights_only(path, safe_globals: tuple = (), mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` (tensors and plain containers, never code) on CPU. Torch's warnings are
    silenced: they point into its own sources, and its advice for a refused file (load it with
    weights_only=False) would run the file's code."""
    with warnings.catch_warnings(), torch.serialization.safe_globals(list(safe_globals)):
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def pickle_refusal(e: BaseException) -> str | None:
    """Why a weights-only load refused a file (it needs pickled code or classes), in pti's words; None when
    `e` is another failure (truncated, not a torch file, ...)."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "invalid load key" in text:
        return None  # not a pickle at all (a corrupt or foreign file): no refusal to explain
    if isinstance(e, pickle.UnpicklingError) and ("weights_only" in text or "GLOBAL" in text):
        m = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({m.group(1)})" if m else ""
        return f"the file needs pickled code or classes{what} to load, which pti never runs"
    if isinstance(e, ValueError) and "allow_pickle" in text:  # numpy's refusal of an object array
        return "the file holds pickled Python objects, which pti never loads"
    return None


# What unpickling a damaged or malformed file raises (each becomes one CheckpointError line).
UNPICKLING_ERRORS = (
    EOFError,
    pickle.UnpicklingError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    UnicodeDecodeError,
    OverflowError,
    MemoryError,
    RecursionError,
)


def _kept(check, ref: Global):
    """A stand-in for the allowed global `check` that checks its arguments as `check` does, then keeps the call."""

    def call(*args):
        check(*args)
        return Kept(ref, args)

    return call


def safe_load_pickle(f: BinaryIO, source: str = "checkpoint", keep: bool = False) -> Any:
    """Unpickle `f` with the restricted unpickler; every failure becomes a one-line CheckpointError.
    `keep`: read it to be written back (see the module docstring)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation chatter from torch internals
            return RestrictedUnpickler(f, source, keep).load()
    except CheckpointError:
        raise
    except UNPICKLING_ERRORS as e:
        raise CheckpointError(f"{source} is truncated or not a valid pickle ({type(e).__name__}: {e})") from None
