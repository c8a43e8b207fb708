"""The per-identity file (`photo.pti`): one safe, compact file per tuned person.

Format: a safetensors file (no pickle, nothing executable) holding
- `pivot`: float32 [num_ws, w_dim], the pivot w;
- the tuned synthesis weights, either as `delta.<param>` float16 tensors (tuned - base; the default,
  about 56 MB at 1024 px against 127 MB for the authors' whole-module save) or, with `exact=True`,
  as `weight.<param>` float32 tensors equal to the tuned weights bit for bit;
- metadata (strings): format tag and version, the base generator's content hash and a path hint,
  its config, the run's config, per-step loss curves, timings and library versions, and how it was tuned
  (`impl`: per step, the implementation that ran, its ops, precision and flags; see `tuned_with`);
- from format v2, `checksum`: sha256 over every tensor (name, dtype, shape, bytes) and the other metadata,
  checked on every load, so a damaged file is refused instead of rendering garbage. v1 files (no
  checksum) still load, with a note saying damage to them cannot be detected;
- from format v3, how the face was cut from the photo (`meta["alignment"]`, see `alignment_record`: the FFHQ
  quad and the 68 landmarks in the photo's pixels, the photo's size and sha256), which paste-back needs; and,
  for a clip (`pti tune clip.mp4`), every frame's pivot (`pivots` [F, num_ws, w_dim]) and cut (`frames.quad`
  [F, 4, 2] float64, `frames.landmarks` [F, 68, 2] float64, `frames.index` [F] int64: the source frame numbers),
  the shared tuned weights once, and `pivot` = the first frame's. v1 and v2 files still load; they have no
  alignment record, so they cannot be pasted back (re-tune for that).

Only synthesis parameters are stored: tuning never touches the mapping network or the buffers.
Applying the file to any generator whose content hash differs from the recorded one is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from pti._version import __version__  # the version module, not `pti`: the package sits above the engine
from pti.engine.checkpoint import BUILTIN_TINY, generator_hash, load_generator
from pti.errors import IdentityError
from pti.fsutil import atomic_path

FORMAT = "pti-identity"
VERSION = 3  # 3: the alignment record and clips' frames; 2: a checksum in the metadata; 1: none
SUFFIX = ".pti"
CHECKSUM = "checksum"  # metadata key: "sha256:<hex>" (see `checksum`)


@dataclass
class Identity:
    pivot: torch.Tensor  # [num_ws, w_dim] float32
    tensors: dict[str, torch.Tensor]  # "delta.<param>" (fp16) or "weight.<param>" (fp32)
    base_hash: str  # content hash of the base generator
    base_hint: str = ""  # where the base came from (path or builtin name)
    exact: bool = False  # True: full fp32 weights; False: fp16 deltas
    meta: dict[str, Any] = field(default_factory=dict)  # config, curves, timings, versions, ...
    notes: list[str] = field(default_factory=list, compare=False)  # what loading found worth telling (not stored)
    checksum: str | None = field(default=None, compare=False)  # the verified file checksum (v2 files; None: v1)
    frames: dict[str, torch.Tensor] = field(default_factory=dict)  # a clip's: "pivots", "quad", "landmarks", "index"

    # ------------------------------------------------------------------ building and applying

    @classmethod
    def from_tuning(
        cls,
        G_base,
        G_tuned,
        pivot: torch.Tensor,
        base_hash: str,
        base_hint: str = "",
        exact: bool = False,
        meta: dict | None = None,
    ) -> "Identity":
        """Capture what tuning changed: the synthesis parameters, as fp16 deltas or exact fp32."""
        base = dict(G_base.synthesis.named_parameters())
        tensors = {}
        for name, p in G_tuned.synthesis.named_parameters():
            key = f"synthesis.{name}"
            if exact:
                tensors[f"weight.{key}"] = p.detach().float().cpu().contiguous()
            else:
                tensors[f"delta.{key}"] = (p.detach().float() - base[name].detach().float()).half().cpu().contiguous()
        pivot = pivot.detach().float().cpu().reshape(pivot.shape[-2:]).contiguous()
        return cls(pivot, tensors, base_hash, base_hint, exact, dict(meta or {}))

    def apply(self, G_base, base_hash: str | None = None):
        """A new generator: the base with this identity's tuned synthesis weights."""
        if base_hash is None:
            base_hash = generator_hash(G_base)
        if base_hash != self.base_hash:
            raise IdentityError(
                f"this identity was tuned on generator {self.base_hash[:16]} ({self.base_hint or 'unknown'}), "
                f"not on {base_hash[:16]}; pass the same --network it was tuned with"
            )
        G = G_base.clone()
        params = dict(G.named_parameters())
        expected = {n for n in params if n.startswith("synthesis.")}
        names = set()
        for key, t in self.tensors.items():  # a file is untrusted input: check before touching G
            kind, _, name = key.partition(".")
            if kind not in ("weight", "delta") or name not in params:
                raise IdentityError(f"identity holds {key!r}, which does not fit the base generator")
            if tuple(t.shape) != tuple(params[name].shape):
                raise IdentityError(
                    f"identity tensor {key!r} has shape {tuple(t.shape)}, the generator {tuple(params[name].shape)}"
                )
            names.add(name)
        if names != expected:
            raise IdentityError(f"identity file lacks {len(expected - names)} of the generator's synthesis parameters")
        with torch.no_grad():
            for key, t in self.tensors.items():
                kind, name = key.split(".", 1)
                p = params[name]
                if kind == "weight":
                    p.copy_(t.to(p.device, p.dtype))
                else:
                    p.add_(t.to(p.device, torch.float32))
        return G

    # ------------------------------------------------------------------ file I/O

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file, then rename), with the checksum in the metadata. A full disk or a
        file-size limit is an `OutputError` naming the path, as for every file pti writes."""
        path = Path(path)
        meta = {
            "format": FORMAT,
            "version": str(VERSION),
            "base_hash": self.base_hash,
            "base_hint": self.base_hint,
            "encoding": "weight-fp32" if self.exact else "delta-fp16",
            "meta": json.dumps(self.meta, default=_json_default),
        }
        tensors = {"pivot": self.pivot.contiguous(), **{k: v.contiguous() for k, v in self.tensors.items()}}
        tensors.update({_frame_key(k): v.contiguous() for k, v in self.frames.items()})
        meta[CHECKSUM] = checksum(tensors, meta)
        with atomic_path(path) as tmp:
            try:
                safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
            except SafetensorError as e:  # its writer's I/O errors, as the OSError atomic_path turns into one line
                raise _os_error(e) from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Identity":
        """The identity in `path`, its checksum verified; IdentityError (one line) when it is damaged."""
        path = Path(path)
        meta, tensors, notes = _read_verified(path)
        if "pivot" not in tensors:
            raise IdentityError(f"{path}: identity file has no pivot")
        pivot = tensors.pop("pivot")
        frames = {k: tensors.pop(_frame_key(k)) for k in FRAME_KEYS if _frame_key(k) in tensors}
        try:
            record = json.loads(meta.get("meta", "{}"))
        except json.JSONDecodeError:
            raise IdentityError(f"{path}: unreadable identity metadata (not JSON)") from None
        return cls(
            pivot,
            tensors,
            meta.get("base_hash", ""),
            meta.get("base_hint", ""),
            meta.get("encoding") == "weight-fp32",
            record,
            notes,
            meta.get(CHECKSUM),
            frames,
        )

    @property
    def tuned_with(self) -> dict[str, Any]:
        """How the tuning ran (see `tuned_with`)."""
        return tuned_with(self.meta)

    @property
    def alignment(self) -> dict | None:
        """How the face was cut from its photo (`alignment_record`); None in files from before format v3."""
        rec = self.meta.get("alignment")
        return rec if isinstance(rec, dict) else None

    @property
    def is_clip(self) -> bool:
        """True for a clip's identity (one pivot and one cut per frame, `frames`)."""
        return "pivots" in self.frames

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) + self.pivot.numel() * 4


FRAME_KEYS = ("pivots", "quad", "landmarks", "index")  # a clip's per-frame tensors (`Identity.frames`)


def _frame_key(name: str) -> str:
    """The file's tensor name for a clip's per-frame tensor: `pivots` as is, the others under `frames.`."""
    return name if name == "pivots" else f"frames.{name}"


def alignment_record(
    quad, landmarks, photo_size: tuple[int, int], photo_sha256: str | None, output_size: int, face: int | None
) -> dict[str, Any]:
    """What an identity records about how its face was cut (`meta["alignment"]`): the FFHQ quad [4, 2] (TL, BL,
    BR, TR) and the 68 landmarks [68, 2], both in the photo's pixels (after its EXIF rotation), the photo's
    (width, height) and sha256, the crop's size and which face it was (0 = the largest)."""
    return {
        "aligned": True,
        "quad": [[float(v) for v in row] for row in quad],
        "landmarks": [[float(v) for v in row] for row in landmarks],
        "photo_size": [int(photo_size[0]), int(photo_size[1])],
        "photo_sha256": photo_sha256,
        "output_size": int(output_size),
        "face": face,
    }


NOT_ALIGNED = {"aligned": False}  # the alignment record of a photo tuned with --no-align


def tuned_with(meta: dict) -> dict[str, Any]:
    """How an identity was tuned, from its metadata: {"impl", "precision", "flags", "recorded"}.

    The record is `meta["impl"]["tune"]` (what the engine's `TuneResult.impl` said). Files written before pti
    recorded it (no `impl` in their metadata) were tuned with the reference ops, the only path `pti tune` ran
    then, at the precision they record; their TF32 flags are not known (None), and `recorded` is False."""
    rec = (meta.get("impl") or {}).get("tune") if isinstance(meta.get("impl"), dict) else None
    if isinstance(rec, dict):
        return {
            "impl": rec.get("impl"),
            "precision": rec.get("precision", meta.get("precision")),
            "flags": rec.get("flags"),
            "recorded": True,
        }
    return {"impl": "ref", "precision": meta.get("precision", "fp32"), "flags": None, "recorded": False}


def load_base(ident: Identity, network=None, device="cpu"):
    """The identity's base generator: `network` if given, else the file it records. Applying the
    identity then checks the content hash, so a different generator is refused, not mixed."""
    source = network or ident.base_hint or None
    if source is None:
        raise IdentityError("this identity does not record its base generator; pass it with --network")
    if network is None and source != BUILTIN_TINY and not Path(source).is_file():
        raise IdentityError(
            f"this identity was tuned on {source}, which is not here; pass that generator with --network"
        )
    return load_generator(source, device)


class OpenIdentity(NamedTuple):
    """An identity file opened on its base generator (see `open_identity`)."""

    ident: Identity  # the file's contents, checksum verified
    base: Any  # the base generator it was tuned on
    base_hash: str  # the base's content hash (equal to the one the identity records)
    G: Any  # the base with the identity's tuned weights: the person's generator


def open_identity(path: str | Path, network=None, device="cpu") -> OpenIdentity:
    """(identity, base, base hash, the person's generator) for the identity file `path`, its base from
    `network` or the file it records (`load_base`), on `device`. Everything that renders or exports a
    person opens it here."""
    ident = Identity.load(path)
    base = load_base(ident, network, device)
    base_hash = generator_hash(base)
    return OpenIdentity(ident, base, base_hash, ident.apply(base, base_hash))


def checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """ "sha256:<hex>" over the metadata (every key but the checksum itself) and every tensor's name, dtype,
    shape and bytes, in name order. Hashing reads each byte once (sha256 runs at about 1 GB/s), so
    verifying a 56 MB identity costs tens of milliseconds."""
    h = hashlib.sha256(b"pti-identity-v2\0")
    h.update(json.dumps({k: v for k, v in meta.items() if k != CHECKSUM}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def _os_error(e: Exception) -> Exception:
    """safetensors reports a failed write as SafetensorError("... I/O error: File too large (os error 27)"):
    the OSError it stands for, else `e` itself."""
    m = re.search(r"\(os error (\d+)\)", str(e))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else e


def _read_verified(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor], list[str]]:
    """(metadata, tensors, notes) of the identity file `path`, after its format and checksum checks."""
    if not path.is_file():
        raise IdentityError(f"{path}: no such identity file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise IdentityError(f"{path}: not a pti identity file (format {meta.get('format')!r})")
            version = int(meta.get("version", 0))
            if version > VERSION:
                raise IdentityError(
                    f"{path}: identity format v{meta['version']} is newer than this pti (v{VERSION}); upgrade pti"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except IdentityError:
        raise
    except Exception as e:  # truncated, corrupt, not safetensors, a version that is not a number
        raise IdentityError(f"{path}: unreadable identity file ({type(e).__name__}: {e})") from None
    if version < 2:
        return (
            meta,
            tensors,
            [
                f"{path} has no checksum (identity format v{version}, from an older pti), so damage "
                "to it cannot be detected; re-run pti tune for a checked file"
            ],
        )
    if meta.get(CHECKSUM) != checksum(tensors, meta):
        raise IdentityError(
            f"{path} is damaged (checksum mismatch): its weights or metadata changed after pti wrote it; "
            "re-run pti tune"
        )
    return meta, tensors, []


def versions() -> dict[str, str]:
    return {
        "pti": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def is_identity_file(path: str | Path) -> bool:
    """True when `path` is a safetensors file tagged as a pti identity (reads only the header)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001  not safetensors, unreadable: not an identity
        return False


def describe(path: str | Path) -> dict[str, Any]:
    """What an identity file holds, for `pti info`: its header, after the checksum is verified."""
    path = Path(path)
    header, tensors, notes = _read_verified(path)
    shapes = {k: list(t.shape) for k, t in tensors.items()}
    dtypes = {k: str(t.dtype).removeprefix("torch.") for k, t in tensors.items()}
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError:
        meta = {}
    frame_names = {_frame_key(k) for k in FRAME_KEYS}
    weights = {k: v for k, v in shapes.items() if k != "pivot" and k not in frame_names}
    return {
        "path": str(path),
        "format": f"{FORMAT} v{header.get('version', '?')}",
        "checksum": header.get(CHECKSUM),
        "notes": notes,
        "bytes": path.stat().st_size,
        "base_hash": header.get("base_hash", ""),
        "base_hint": header.get("base_hint", ""),
        "encoding": header.get("encoding", "?"),
        "pivot_shape": shapes.get("pivot"),
        "pivot_dtype": dtypes.get("pivot"),
        "frames": shapes["pivots"][0] if "pivots" in shapes else None,
        "tensors": len(weights),
        "parameters": sum(math.prod(s) for s in weights.values()),
        "weights_dtype": sorted({dtypes[k] for k in weights}),
        **{
            k: meta.get(k)
            for k in (
                "photo",
                "steps",
                "early_stopped",
                "invert_config",
                "tune_config",
                "losses",
                "official_losses",
                "before_tuning",
                "after_tuning",
                "identity_similarity",
                "seconds",
                "device",
                "precision",
                "impl",
                "joint_with",
                "imported",
                "init",
                "alignment",
                "video",
                "versions",
            )
        },
        "tuned_with": tuned_with(meta),
    }


def source_photo(path: str | Path) -> tuple[str | None, str | None]:
    """(the photo an identity was tuned from, its sha256), from the header alone; None where not recorded
    (files written before pti recorded them keep only the path as it was given)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    except Exception:  # noqa: BLE001  unreadable: nothing can be told about it
        return None, None
    photo = meta.get("photo_path") or meta.get("photo")
    return (str(photo) if photo else None), meta.get("photo_sha256")
