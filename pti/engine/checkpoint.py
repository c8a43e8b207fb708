"""Load generators from the checkpoint formats users have; write and hash our own.

Formats read by `load_generator(path, device)`, all returning the same `Generator`:

- `builtin:tiny` (or no path): the fixed-seed random tiny generator, labelled as not a trained model;
- stylegan2-ada-pytorch `.pkl` network snapshots, and StyleGAN2 ones from the stylegan3 repo (`G_ema`,
  else `G`; StyleGAN3 alias-free generators are refused), through the restricted
  unpickler in `safe_pickle` -- no code from the file ever runs;
- rosinality stylegan2-pytorch `.pt` (`g_ema`, else `g`), through `torch.load(weights_only=True)` and
  the name/layout mapping in `rosinality`;
- our own `.safetensors`: weights plus a JSON config and a content hash in the safetensors metadata,
  one file, no pickle.

Every failure is a one-line `CheckpointError` naming the file and what was found in it.

Layering: the loaders and this module share `LoadedGenerator` and `build_generator` from
`pti.engine.loaded`, below them all, so data flows one way (file -> loader -> LoadedGenerator -> engine).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from pti.engine.generator import TINY_LABEL, Generator, tiny_generator

# LoadedGenerator lives below the loaders (in `loaded`) and is re-exported here for callers.
from pti.engine.loaded import LoadedGenerator, build_generator  # noqa: F401 (re-export)
from pti.engine.nvidia_pkl import load_nvidia_pickle
from pti.engine.rosinality import load_rosinality
from pti.errors import CheckpointError
from pti.fsutil import atomic_path

BUILTIN_TINY = "builtin:tiny"
SAFETENSORS_FORMAT = "pti.generator"  # metadata "format" tag of our files
FORMAT_VERSION = 1  # bump when the metadata layout changes

# Leading bytes of things people pass by mistake, for a message that says what the file is.
_MAGIC_NAMES = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"RIFF": "a RIFF (WebP/WAV) file",
    b"\x1f\x8b": "a gzip archive",
    b"\x08\x01\x12": "an ONNX/protobuf file",
}
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pre-zip torch.save


def load_generator(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Generator:
    """The generator stored at `path` (any supported format), in eval mode with gradients off."""
    return load_checkpoint(path, device).generator


def load_checkpoint(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LoadedGenerator:
    """Like `load_generator`, also telling which format was read and any caveats."""
    if path is None or str(path) == BUILTIN_TINY:
        return LoadedGenerator(tiny_generator(), "builtin", BUILTIN_TINY, TINY_LABEL).to_device(device)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    kind = sniff_format(path)
    if kind == "safetensors":
        loaded = _load_safetensors(path)
    elif kind == "torch":
        loaded = load_rosinality(path)
    else:
        loaded = load_nvidia_pickle(path)
    return loaded.to_device(device)


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch' (torch.save zip or legacy) or 'pickle'; CheckpointError for anything else."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") or head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 8 + header_len > size:
            raise CheckpointError(f"{path} is a truncated safetensors file ({size} bytes, header says more)")
        return "safetensors"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:  # pickle PROTO opcode, protocols 2-5
        return "pickle"
    for magic, name in _MAGIC_NAMES.items():
        if head.startswith(magic):
            raise CheckpointError(f"{path} is {name}, not a generator checkpoint")
    try:
        head.decode("utf-8")
        what = "a text file"
    except UnicodeDecodeError:
        what = f"an unrecognized binary file (starts with {head[:8].hex()})"
    raise CheckpointError(f"{path} is {what}, not a generator checkpoint (.pkl, .pt or .safetensors)")


# ---------------------------------------------------------------------------------------------
# Our format: one .safetensors file, config and content hash in its metadata.


def generator_hash(G: Generator) -> str:
    """sha256 (hex) over the config and every parameter/buffer: name, dtype, shape and bytes, sorted by name.

    Independent of device and of how the generator was loaded, so the same weights from a .pkl,
    a .pt or our .safetensors hash the same. Identity files name their base generator by it.
    """
    h = hashlib.sha256(b"pti-generator-v1\0")
    h.update(json.dumps(G.init_kwargs, sort_keys=True).encode())
    for name, t in sorted(G.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_generator(G: Generator, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> str:
    """Write `G` as one .safetensors file (atomically: temp file + rename). Returns its content hash."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in G.state_dict().items()}
    digest = generator_hash(G)
    metadata = {
        **(extra_metadata or {}),
        "format": SAFETENSORS_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(G.init_kwargs, sort_keys=True),
        "content_hash": digest,
    }
    data = safetensors.torch.save(tensors, metadata=metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return digest


def _load_safetensors(path: Path) -> LoadedGenerator:
    try:
        data = path.read_bytes()
        tensors = safetensors.torch.load(data)
        meta = _safetensors_metadata(data)
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is a corrupt or truncated safetensors file ({e})") from None
    if meta.get("format") == "pti-identity":  # identity.FORMAT, spelled out: identity sits above this module
        raise CheckpointError(
            f"{path} is a pti identity file (one tuned person), not a generator; `pti info {path}` "
            "describes it, and --network takes the generator it was tuned from"
        )
    if meta.get("format") != SAFETENSORS_FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file without a pti generator config "
            f"(format={meta.get('format')!r}); convert the original checkpoint with `pti convert`"
        )
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer pti (format version {version}); upgrade pti")
    try:
        config = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable generator config in metadata ({e})") from None
    G = build_generator(config, tensors, str(path))
    stored = meta.get("content_hash")
    if stored and stored != generator_hash(G):
        raise CheckpointError(f"{path}: content hash mismatch (the file was modified or damaged)")
    return LoadedGenerator(G, "pti-safetensors", str(path), f"pti safetensors (format version {version})")


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8 : 8 + n]).get("__metadata__") or {})


# ---------------------------------------------------------------------------------------------
# What `pti info` shows.


@dataclass(frozen=True)
class GeneratorSummary:
    resolution: int
    num_ws: int
    z_dim: int
    w_dim: int
    params_total: int
    params_mapping: int
    params_synthesis: int
    fp16_resolutions: list[int]
    conv_clamp: float | None
    content_hash: str


def summarize(G: Generator) -> GeneratorSummary:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    syn = G.init_kwargs.get("synthesis_kwargs") or {}
    return GeneratorSummary(
        resolution=G.img_resolution,
        num_ws=G.num_ws,
        z_dim=G.z_dim,
        w_dim=G.w_dim,
        params_total=count(G),
        params_mapping=count(G.mapping),
        params_synthesis=count(G.synthesis),
        fp16_resolutions=list(G.synthesis.fp16_resolutions),
        conv_clamp=syn.get("conv_clamp"),
        content_hash=generator_hash(G),
    )
