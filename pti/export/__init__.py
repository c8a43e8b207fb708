"""Export a person's tuned synthesis network to deployable runtimes, and swap identities by weight name.

One exported graph per base generator; each tuned person is a set of weights under names that are the
same for every identity: the identity file's own parameter names (`synthesis.b8.conv0.weight`, ...),
kept as named initializers (ONNX), constants (AOTInductor) or refittable weights (TensorRT), never
folded into anonymous constants (REFERENCE §7-8). A graph plus per-identity weights is the unit of
deployment; `contract.json` beside the graph says how to feed it:

- the input `ws` [batch, num_ws, w_dim] float32 and output `images` [batch, 3, R, R] float32 in about
  [-1, 1], the dynamic axis and the batch profile (min / opt / max);
- `weights`: identity tensor -> graph name, dtype and shape, for every tuned parameter;
- the base generator's content hash (an identity tuned on another base is refused), the versions and
  device it was built with (a package or engine built for another torch, TensorRT or GPU is refused);
- a sample input and a checksum of its expected output (a pooled image), and what the export measured
  against PyTorch right after it was written;
- `checksums`: the size and sha256 of every file it describes, so a truncated or changed file is refused
  (sizes on every load, hashes by `pti info`) instead of being described as checked.

The exported forward is the generator's own reference arithmetic in the export-friendly form: constant
noise, non-fused modulated convolution (x * s, shared-weight conv, * d), so the batch is dynamic and every
weight stays a graph weight. Layering: above `pti.engine`, below `pti.rendering`, which picks a backend.
Inside: `pti.export.contract` (what every format shares) under the format modules `onnx`, `aoti` and
`tensorrt` (their optional extras imported when one is asked for), under this package's `export` dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pti.engine.checkpoint import BUILTIN_TINY, generator_hash, load_generator, save_generator
from pti.engine.identity import is_identity_file, open_identity
from pti.errors import ExportError
from pti.export.aoti import export_aoti
from pti.export.config import ExportConfig
from pti.export.contract import CONTRACT, Source, quiet  # noqa: F401  (CONTRACT, quiet: public names)
from pti.export.nvidia_pkl import base_pickle, write_nvidia_pickle
from pti.export.onnx import export_onnx
from pti.export.rosinality import write_rosinality
from pti.export.tensorrt import export_tensorrt
from pti.fsutil import atomic_path, default_cache_dir

FORMATS = ("onnx", "aoti", "tensorrt")  # a folder: a graph, its weights and a contract
# One file another tool loads (the suffix a default output name gets):
FILE_FORMATS = {"nvidia-pkl": ".pkl", "rosinality": ".pt", "state-dict": ".safetensors", "projected-w": ".npz"}


@dataclass
class WrittenFile:
    """What `export_file` wrote: the file, and lines for people (what it holds, how to load it, caveats)."""

    path: Path
    kind: str
    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_source(path: str | Path | None, network: str | None = None, device="cpu") -> Source:
    """A `.pti` identity (its base from `network` or the path it records) or a generator checkpoint."""
    if path is not None and str(path) != BUILTIN_TINY and Path(path).is_file() and is_identity_file(path):
        ident, _, base_hash, G = open_identity(path, network, device)
        return Source(G, base_hash, str(network or ident.base_hint), ident, str(path))
    if network is not None and path is not None:
        raise ExportError("--network is for identities; give either a checkpoint or an identity file")
    G = load_generator(path, device)
    return Source(G, generator_hash(G), str(path or BUILTIN_TINY))


def export(kind: str, src: Source, out: str | Path, config: ExportConfig = ExportConfig()) -> Path:
    """Export `src` as `kind` (one of FORMATS) into the folder `out`, as `config` says; return the contract's path."""
    if kind == "onnx":
        return export_onnx(src, out, precision=config.precision, batch=config.batch, external_data=config.external_data)
    if kind == "aoti":
        return export_aoti(src, out, precision=config.precision, batch=config.batch, device=config.device)
    if kind == "tensorrt":
        return export_tensorrt(src, out, batch=config.batch, fp16=config.precision == "fp16")
    raise ExportError(f"unknown export format {kind!r}; choose from {', '.join(FORMATS)}")


def export_file(kind: str, src: Source, out: str | Path, drop_d: bool = False) -> WrittenFile:
    """Write `src`'s generator as one file in the format `kind` (one of FILE_FORMATS), atomically, to `out`."""
    out = Path(out)
    G = src.generator
    if kind == "nvidia-pkl":
        base = base_pickle(src.base_hint)
        w = write_nvidia_pickle(G, base, out, drop_d=drop_d)
        held = ", ".join(w.keys) if w.keys else "the generator alone (the base was a bare network pickle)"
        tuned = " and ".join(w.tuned) if w.tuned else "it"
        return WrittenFile(
            out,
            kind,
            [
                f"holds {held}; {tuned} = the {'tuned ' if src.identity is not None else ''}generator "
                f"({w.replaced} synthesis weights in place of the base's)"
                + ("" if "D" in w.keys or not drop_d else "; D left out (--drop-d)"),
                f"network records and code ({w.module_src_bytes} bytes of module_src) are {base}'s own, unchanged; "
                f"pickle protocol {w.protocol}",
                "checked: pti's safe loader reads it back as the tuned generator, bit for bit",
                "load it: legacy.load_network_pkl(f)['G_ema'] (stylegan2-ada-pytorch, stylegan3, DragGAN) or "
                "pickle.load(f)['G_ema'] (PTI); either runs that network code",
            ],
            [] if "D" in w.keys or not w.keys else ["without D, NVIDIA's legacy.load_network_pkl refuses the file"],
        )
    if kind == "rosinality":
        notes, info = write_rosinality(G, out)
        args = ", ".join(f"{k}={v}" for k, v in info.items())
        return WrittenFile(
            out,
            kind,
            [
                "holds {'g_ema': state dict in rosinality's names, 'latent_avg': w_avg}",
                f"load it: g = Generator({args}); g.load_state_dict(torch.load(path)['g_ema']) "
                "(rosinality stylegan2-pytorch, e4e, StyleCLIP, HyperStyle)",
            ],
            list(notes),
        )
    if kind == "state-dict":
        meta = {"exported_from": src.identity_path or src.base_hint}
        digest = save_generator(G, out, extra_metadata=meta)
        return WrittenFile(
            out,
            kind,
            [
                f"holds {len(G.state_dict())} tensors in NVIDIA's names (mapping, synthesis, buffers) and the "
                "generator's config in the metadata (content hash " + digest[:16] + ")",
                "load it: safetensors.torch.load_file(path) (tensors by name), or pti --network path",
            ],
        )
    if kind == "projected-w":
        return _write_projected_w(src, out)
    raise ExportError(f"unknown file format {kind!r}; choose from {', '.join(FILE_FORMATS)}")


def _write_projected_w(src: Source, out: Path) -> WrittenFile:
    """The identity's pivot in NVIDIA's projector layout: `projected_w.npz` with `w` float32 [1, num_ws, w_dim]."""
    if src.identity is None:
        raise ExportError(
            f"{src.base_hint} is a generator, which has no pivot; projected-w exports a tuned person's (a .pti)"
        )
    w = src.identity.pivot.detach().to("cpu", torch.float32).reshape(1, *src.identity.pivot.shape[-2:]).numpy()
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:  # np.savez on a path would append .npz to the temp name
            np.savez(f, w=w)
    check = np.load(out, allow_pickle=False)["w"]
    if check.dtype != np.float32 or not np.array_equal(check, w):
        raise ExportError(f"{out}: the file written does not read back as the pivot")
    return WrittenFile(
        out,
        "projected-w",
        [
            f"holds w: float32 {list(w.shape)}, the pivot (NVIDIA's projector output layout)",
            f"render it: python generate.py --network=<the tuned .pkl> --projected-w={out} --outdir=out "
            "(stylegan2-ada-pytorch; pti export --format nvidia-pkl writes the .pkl)",
        ],
    )


def default_export_dir(base_hash: str, kind: str, precision: str) -> Path:
    """Where `pti render --backend KIND` keeps the base generator's export: the user cache, one per base."""
    return default_cache_dir() / "exports" / f"{base_hash[:16]}-{kind}-{precision}"
