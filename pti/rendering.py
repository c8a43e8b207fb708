"""`pti.render(...)`: edits of a tuned person, rendered through a backend, written as PNGs, grids and GIFs.

(The module is `pti.rendering`, not `pti.render`, so that `pti.render` stays the function.)

Above the engine (edits, identity, generator) and, later, the export backends: a backend is one small
interface, `render(ws [B, L, C]) -> images [B, 3, R, R]` in [-1, 1], so ONNX Runtime, AOTInductor or
TensorRT plug in without touching the edit code. Prints nothing; the CLI's `pti render` adds progress
and a summary.

Outputs in `out/`:
- no edit: `reconstruction.png`;
- single edits (summed): one PNG named after the edit set, e.g. `age+3_smile-1.png`;
- a sweep: `<label>_sweep.png` (a grid of the frames in order) and `<label>_sweep.gif` (and `.mp4` with
  `mp4=True` when imageio-ffmpeg is installed), plus each frame as `frames/<frame label>.png`;
- `compare.png` with `compare=True`: input photo | reconstruction | each output, labelled;
- `render.json`: the identity, base generator, edits, every output with its dlib identity
  similarity to the reconstruction (an edit should keep the person), timings and backend.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from pti import kernels
from pti.engine import edits as E
from pti.engine.config import (
    EXPORT_PRECISIONS,
    IMPLS,
    ProgressFn,
    check_fields,
    instance_of,
    one_of,
    real,
    resolve_impl,
    whole,
)
from pti.engine.device import apply_cpu_threads, resolve_device
from pti.engine.faceid import identity_similarity
from pti.engine.identity import load_base, open_identity
from pti.engine.images import grid, labelled_sheet, save_gif, save_png, to_uint8
from pti.engine.layout import Layout
from pti.engine.photo import load_photo, save_photo_atomic
from pti.engine.speed import compiled_synthesis
from pti.errors import PTIError
from pti.export import CONTRACT, Source, default_export_dir, export
from pti.export.aoti import AotiBackend
from pti.export.config import ExportConfig
from pti.export.onnx import OnnxBackend
from pti.export.tensorrt import TensorRTBackend
from pti.fsutil import atomic_path, ensure_writable_dir, sha256_file
from pti.kernels.precision import PRECISIONS, precision_scope
from pti.kernels.precision import flags as precision_flags


class Backend(Protocol):
    name: str

    def render(self, ws: torch.Tensor) -> torch.Tensor:
        """[B, num_ws, w_dim] -> [B, 3, R, R] in about [-1, 1], float32."""


class TorchBackend:
    """The tuned generator in PyTorch, in batches of `batch` (constant noise: the tuned pixels), run by `impl`
    ("ref": the reference ops, eager; "compile": a compiled synthesis, `pti.engine.speed.compiled_synthesis`;
    "triton": the Triton kernels where they take a layer, `G.impl = "prefer:triton"`) in `precision`
    (fp32 | tf32 | bf16, inside `pti.kernels.precision.precision_scope`)."""

    name = "torch"

    def __init__(self, G, device: torch.device, batch: int = 8, *, impl: str = "ref", precision: str = "fp32"):
        if impl not in ("ref", "compile", "triton"):
            raise ValueError(f"TorchBackend runs impl ref, compile or triton (resolved), not {impl!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"TorchBackend computes in {', '.join(PRECISIONS)}, not {precision!r}")
        self.G, self.device, self.batch = G.to(device).eval(), device, batch
        self.impl, self.precision = impl, precision
        self.G.impl = "prefer:triton" if impl == "triton" else "ref"
        self.synthesis = compiled_synthesis(self.G, device) if impl == "compile" else self.G.synthesis
        self.compile_seconds: float | None = None  # the first call of a compiled synthesis (see `warm`)
        self._compiled_batch: int | None = None  # the batch size it was compiled for (see `_synthesize`)
        self.flags: dict | None = None  # the precision flags in effect in the last render
        self.ops: dict[str, dict[str, int]] = {}  # eager runs: per op, calls per implementation that ran it

    @torch.no_grad()
    def render(self, ws: torch.Tensor) -> torch.Tensor:
        # Compiled code dispatches only while it is traced: nothing to count, and nothing to guard on.
        counting = kernels.recording() if self.impl != "compile" else contextlib.nullcontext({})
        with precision_scope(self.precision, self.device), counting as ops:
            self.flags = precision_flags()
            chunks = [self._synthesize(ws[i : i + self.batch]) for i in range(0, ws.shape[0], self.batch)]
        for op, names in ops.items():
            for name, n in names.items():
                self.ops.setdefault(op, {})[name] = self.ops.get(op, {}).get(name, 0) + n
        return torch.cat(chunks)

    def _synthesize(self, ws: torch.Tensor) -> torch.Tensor:
        """One chunk of at most `batch` frames. Compiled code is compiled for one batch size: a smaller chunk
        (a render's last) is padded to the size compiled first, so it runs without compiling again."""
        n, size = ws.shape[0], self._compiled_batch
        if self.impl == "compile" and size is not None and n < size:
            ws = torch.cat([ws, ws[-1:].expand(size - n, *ws.shape[1:])])
        elif self.impl == "compile" and size is None:
            self._compiled_batch = n
        images = self.synthesis(ws.to(self.device), noise_mode="const", force_fp32=True)
        return images[:n].float().cpu()

    def warm(self, ws: torch.Tensor) -> float | None:
        """Compile a compiled synthesis for the batch of `ws`'s first chunk (its first call; the images are
        dropped), so that its one-time cost is measured apart (`compile_seconds`) and not as rendering time.
        None: nothing to compile."""
        if self.impl != "compile":
            return None
        t0 = time.perf_counter()
        self.render(ws[: self.batch])
        self.compile_seconds = time.perf_counter() - t0
        return self.compile_seconds

    def record(self, requested: str) -> dict[str, Any]:
        """What ran, as render.json records it (`RenderResult.report["impl"]`)."""
        return {
            "requested": requested,
            "impl": self.impl,
            "ops": {op: dict(sorted(n.items())) for op, n in sorted(self.ops.items())},  # which ran, per op
            "precision": self.precision,
            "flags": self.flags,
            "compile_seconds": self.compile_seconds,
        }


BACKENDS = ("torch", "onnx", "aoti", "tensorrt")
# One --precision for every backend: the torch backend's compute precision (fp32, tf32, bf16), or an export
# backend's (fp32, fp16: the precision of its weights and blocks, as the export was built and verified).
RENDER_PRECISIONS = (*PRECISIONS, *(p for p in EXPORT_PRECISIONS if p not in PRECISIONS))


def backend_mismatch(backend: str, impl: str, precision: str) -> tuple[str, str] | None:
    """(field, one-line reason) when `impl` or `precision` does not apply to `backend`; None when they fit."""
    if backend == "torch":
        if precision not in PRECISIONS:
            return "precision", (
                f"{precision} is an export's precision (backend onnx, aoti or tensorrt); the torch backend "
                f"computes in {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}"
            )
        return None
    if precision not in EXPORT_PRECISIONS:
        return "precision", (
            f"{precision} is a precision of the torch backend; the {backend} backend renders an export, whose "
            f"weights are {' or '.join(EXPORT_PRECISIONS)}"
        )
    if impl != "auto":
        return "impl", (
            f"{impl} is for the torch backend; the {backend} backend runs the graph its runtime built "
            "(leave it at auto)"
        )
    return None


@dataclass(frozen=True)
class RenderConfig:
    """How `render` renders and what it writes; `pti render` maps its options onto it."""

    network: str | Path | None = None  # the base generator; None = the one the identity records
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    batch: int = 8  # frames per forward pass (a backend's export must accept it)
    compare: bool = False  # also write compare.png: input | reconstruction | each output
    gif_fps: float = 8.0  # frames per second of a sweep's GIF (and .mp4)
    mp4: bool = False  # also write an .mp4 of a sweep (needs imageio-ffmpeg)
    backend: str = "torch"  # what renders: torch, or an export with the person's weights swapped in
    # (onnx, aoti, tensorrt: BACKENDS)
    engine: str | Path | None = None  # an export folder for that backend; None = the base generator's export,
    # made once into the user cache
    precision: str = "fp32"  # the torch backend: its compute precision, fp32 (TF32 off) | tf32 | bf16 (autocast);
    # an export backend: the cached export's, fp32 | fp16 (RENDER_PRECISIONS; backend_mismatch says what fits)
    impl: str = "auto"  # how the torch backend runs: auto | ref | compile | triton (pti.engine.config.IMPLS);
    # an export backend runs its runtime's graph: auto only
    threads: str | int | None = None  # CPU threads: None or "torch" = torch's as set, "auto" = pti's policy, N
    force: bool = False  # replace renders of another identity (or files pti did not write) in `out`

    def __post_init__(self):
        check_fields(
            self,
            {
                "network": instance_of(str, Path, optional=True),
                "device": instance_of(str),
                "batch": whole(1),
                "compare": one_of(True, False),
                "gif_fps": real(0, above=True),  # a GIF frame lasts 1000 / fps ms
                "mp4": one_of(True, False),
                "backend": one_of(*BACKENDS),
                "engine": instance_of(str, Path, optional=True),
                "precision": one_of(*RENDER_PRECISIONS),
                "impl": one_of(*IMPLS),
                "threads": instance_of(str, int, optional=True),
                "force": one_of(True, False),
            },
        )
        mismatch = backend_mismatch(self.backend, self.impl, self.precision)
        if mismatch is not None:
            raise ValueError(f"{type(self).__name__}.{mismatch[0]}: {mismatch[1]}")


def make_backend(
    name: str,
    G,
    base,
    base_hash: str,
    device: torch.device,
    batch: int = 8,
    *,
    engine=None,
    base_hint: str = "",
    precision: str = "fp32",
    progress: ProgressFn | None = None,
    impl: str = "ref",
):
    """The backend `name` rendering `G` (base + identity). The torch backend runs `impl` (resolved: ref, compile
    or triton) in `precision` (fp32, tf32, bf16). Exported backends use the export in `engine`, else the base
    generator's export in `precision` (fp32, fp16) in the user cache (made on first use from `base`), with `G`'s
    weights swapped in by name: one graph per base generator, whatever the person."""
    if name == "torch":
        return TorchBackend(G, device, batch, impl=impl, precision=precision)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    folder = Path(engine) if engine is not None else default_export_dir(base_hash, name, precision)
    if engine is None and not (folder / CONTRACT).is_file():
        if progress is not None:
            progress(f"export {name} (once per base generator)", 0, 1, {})
        export(name, Source(base, base_hash, base_hint), folder, ExportConfig(precision=precision, device=device))
        if progress is not None:
            progress(f"export {name} (once per base generator)", 1, 1, {})
    if name == "onnx":
        return OnnxBackend(folder, G, base_hash=base_hash)
    if name == "aoti":
        return AotiBackend(folder, G, base_hash=base_hash, device=device)
    return TensorRTBackend(folder, G, base_hash=base_hash)


@dataclass
class RenderResult:
    identity: Path
    out: Path
    labels: list[str] = field(default_factory=list)  # one per rendered frame, in order
    images: list[np.ndarray] = field(default_factory=list, repr=False)  # uint8 [R, R, 3] per frame
    files: dict[str, Path] = field(default_factory=dict)  # what was written, by role
    warnings: list[str] = field(default_factory=list)  # what a person should be told
    report: dict[str, Any] = field(default_factory=dict)  # what render.json holds


def base_generator(ident, network=None, device="cpu"):
    """The identity's base generator (see `pti.engine.identity.load_base`)."""
    return load_base(ident, network, device)


def edit_batch(ident, specs, registry=None):
    """(frames, ws): the edited frames of `ident` and the batch that renders them, the reconstruction first
    when there are edits (for the identity similarity). Everything that renders edits uses this batch, so
    the same edits give the same pixels (float results depend on the batch in the last bits)."""
    num_ws, w_dim = ident.pivot.shape
    directions = [E.resolve(s, num_ws, w_dim, registry) for s in specs]
    frames = E.frames(ident.pivot, specs, directions)
    ws = torch.stack(([ident.pivot] if specs else []) + [f.ws for f in frames])
    return frames, ws


def render(
    identity: str | Path,
    edits: Sequence[str] = (),  # the --edit grammar (pti.engine.edits)
    out: str | Path | None = None,  # default: <identity folder>/<identity name>/edits
    config: RenderConfig | None = None,  # how (default: RenderConfig(), with `options` applied)
    *,
    registry=None,  # weights registry for presets (default: the user's cache)
    progress: ProgressFn | None = None,
    **options,  # RenderConfig fields: network=..., device="cpu", backend="onnx", ...
) -> RenderResult:
    """Render `edits` of the person in `identity`; return the images and the files written."""
    cfg = replace(config or RenderConfig(), **options)
    specs = E.parse_edits(list(edits))  # grammar first: a typo costs nothing
    path = Path(identity)
    dev = resolve_device(cfg.device)
    impl = resolve_impl(cfg.impl, dev) if cfg.backend == "torch" else None  # triton without CUDA: refused here
    ident, base, base_hash, G = open_identity(path, cfg.network, dev)
    apply_cpu_threads(G, dev, cfg.threads)
    frames, ws = edit_batch(ident, specs, registry)
    out = Path(out) if out is not None else Layout.of(path).edits
    ident_key = ident.checksum or sha256_file(path)  # a v2 file's verified checksum: no second read of the file
    if not cfg.force:
        check_render_folder(out, path, ident_key, planned_files(frames, specs, cfg.compare, cfg.mp4))
    ensure_writable_dir(out)

    base_hint = str(cfg.network or ident.base_hint)
    runner = make_backend(
        cfg.backend,
        G,
        base,
        base_hash,
        dev,
        cfg.batch,
        engine=cfg.engine,
        base_hint=base_hint,
        precision=cfg.precision,
        progress=progress,
        impl=impl or "ref",
    )
    recon_needed = bool(specs)
    if impl == "compile":
        if progress is not None:
            progress("compile", 0, 1, {"for": "render"})
        seconds = runner.warm(ws[: cfg.batch])
        if progress is not None:
            progress("compile", 1, 1, {"for": "render", "seconds": seconds})
    t0 = time.perf_counter()
    images = []
    # An export runs under fp32's flags (TF32 off), as it was verified; the torch backend sets its own precision.
    with precision_scope("fp32", dev):
        for i in range(0, ws.shape[0], cfg.batch):
            images.append(runner.render(ws[i : i + cfg.batch]))
            if progress is not None:
                progress("render", min(i + cfg.batch, ws.shape[0]), ws.shape[0], {})
        export_flags = precision_flags()
    seconds = time.perf_counter() - t0
    pixels = torch.cat(images)
    _check_finite(pixels, ["reconstruction"] * recon_needed + [f.label for f in frames])
    rendered = list(to_uint8(pixels))
    recon = rendered.pop(0) if recon_needed else rendered[0]
    result = RenderResult(path, out, [f.label for f in frames], rendered, warnings=list(ident.notes))
    _write(result, frames, specs, recon, cfg.compare, cfg.gif_fps, cfg.mp4, ident)
    result.report.update(
        identity=str(path),
        identity_path=str(path.resolve()),
        identity_checksum=ident_key,
        base_generator=base_hint,
        base_hash=ident.base_hash,
        edits=[s.text for s in specs],
        backend=runner.name,
        impl=runner.record(cfg.impl) if isinstance(runner, TorchBackend) else _export_record(runner, export_flags),
        identity_tuned_with=ident.tuned_with,
        engine=str(getattr(runner, "folder", "")) or None,
        device=str(dev),
        batch=cfg.batch,
        frames=len(frames),
        ms_per_image=1000 * seconds / ws.shape[0],
        warnings=result.warnings,
    )
    result.files["report"] = _write_report(result.report, out / "render.json")
    return result


def _export_record(runner, flags: dict) -> dict[str, Any]:
    """What ran for an export backend, in the torch backend's record's shape: the runtime's graph, in the
    export's precision, under `flags`."""
    contract = getattr(runner, "contract", None) or {}
    return {
        "requested": "auto",
        "impl": runner.name,  # the export's runtime ran its own graph of the reference arithmetic
        "ops": {},
        "precision": contract.get("precision"),
        "flags": flags,
        "compile_seconds": None,
    }


def _check_finite(pixels: torch.Tensor, labels: list[str]) -> None:
    """Refuse images with NaN or infinite pixels (uint8 conversion would turn them into plausible black)."""
    bad = (~torch.isfinite(pixels)).flatten(1).any(1)
    if bool(bad.any()):
        label = labels[int(bad.nonzero()[0])]
        raise PTIError(
            f"{label}: the rendered image is not finite (NaN or infinite pixels): the edit moves w further than "
            "the generator's float32 arithmetic can go, or the identity is damaged; nothing was written"
        )


def _write_report(report: dict, path: Path) -> Path:
    """render.json as standard JSON: a NaN or infinity is refused here instead of written as `NaN`/`Infinity`."""
    text = json.dumps(report, indent=1, default=str, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _write(result: RenderResult, frames, specs, recon: np.ndarray, compare: bool, fps: float, mp4: bool, ident) -> None:
    out, files = result.out, result.files
    if any(s.sweep for s in specs):
        name = _sweep_name(specs)
        for f, img in zip(frames, result.images):
            files[f"frame {f.label}"] = save_png(img, out / "frames" / f"{f.label}.png")
        files["sweep grid"] = save_png(grid(result.images, cols=len(result.images)), out / f"{name}_sweep.png")
        files["sweep gif"] = save_gif(result.images, out / f"{name}_sweep.gif", fps=fps)
        if mp4:
            video = _save_mp4(result.images, out / f"{name}_sweep.mp4", fps)
            if video is None:
                result.warnings.append(
                    "no .mp4: it needs imageio and imageio-ffmpeg (pip install 'pti[video]'); the GIF was written"
                )
            else:
                files["sweep mp4"] = video
        outputs = list(zip(frames, result.images))
    else:
        f, img = frames[0], result.images[0]
        files[f.label] = save_png(img, out / f"{f.label}.png")
        outputs = [(f, img)]
    result.report["outputs"] = [
        {
            "label": f.label,
            "values": f.values,
            "identity_similarity_to_reconstruction": _id_similarity(recon, img) if specs else 1.0,
        }
        for f, img in outputs
    ]
    if compare:
        photo = _input_photo(result.identity, ident)
        if photo is None:
            result.warnings.append(
                "compare.png has no input photo: neither the aligned photo beside the identity nor the recorded "
                "photo was found"
            )
        tiles = (
            ([("input", photo)] if photo is not None else [])
            + [("reconstruction", recon)]
            + [(f.label, img) for f, img in outputs]
        )
        files["compare"] = save_photo_atomic(
            labelled_sheet([tiles], size=max(recon.shape[0], 128)), out / "compare.png"
        )


def planned_files(frames, specs, compare: bool, mp4: bool) -> list[str]:
    """The files `_write` and `render` will write into the output folder, relative to it."""
    if any(s.sweep for s in specs):
        name = _sweep_name(specs)
        files = [f"frames/{f.label}.png" for f in frames] + [f"{name}_sweep.png", f"{name}_sweep.gif"]
        files += [f"{name}_sweep.mp4"] if mp4 else []
    else:
        files = [f"{frames[0].label}.png"]
    return files + (["compare.png"] if compare else []) + ["render.json"]


def check_render_folder(out: Path, identity: Path, identity_key: str, files: list[str]) -> None:
    """Refuse to replace, in `out`, renders of another identity or files pti did not write (see `render`'s `force`).

    A folder's `render.json` says whose renders it holds: the same identity file (by path or content) may
    render into it again; another may not. Without a `render.json`, no file there is replaced."""
    report = out / "render.json"
    if report.is_file():
        try:
            rec = json.loads(report.read_text())
        except (OSError, ValueError):
            rec = {}
        owner = rec.get("identity_path") or rec.get("identity")
        same = rec.get("identity_checksum") == identity_key or (
            owner is not None and Path(owner).resolve() == identity.resolve()
        )
        if not same:
            raise PTIError(
                f"{out} holds renders of {owner or 'another identity'}, not of {identity}; pass --force to "
                "replace them, or choose another --out"
            )
        return
    clash = next((f for f in files if (out / f).exists()), None)
    if clash is not None:
        raise PTIError(
            f"{out / clash} exists and was not written by pti render; pass --force to replace it, "
            "or choose another --out"
        )


def _sweep_name(specs) -> str:
    s = next(s for s in specs if s.sweep)
    return s.label(0.0).replace("+0", "", 1)


def _input_photo(identity: Path, ident):
    """The aligned photo `pti tune` wrote beside the identity, else the photo it records, else None."""
    aligned = Layout.of(identity).aligned
    if aligned.is_file():
        return Image.open(aligned).convert("RGB")
    photo = ident.meta.get("photo")
    if photo and Path(photo).is_file():
        try:
            return load_photo(photo)
        except PTIError:
            return None
    return None


def _id_similarity(recon: np.ndarray, img: np.ndarray) -> float | None:
    try:
        return identity_similarity(recon, img)
    except Exception:  # noqa: BLE001  a report metric must never sink a finished render
        return None


def _save_mp4(frames: Sequence[np.ndarray], path: Path, fps: float) -> Path | None:
    """An H.264 video through imageio-ffmpeg (its wheel ships ffmpeg); None when it is not installed."""
    try:
        import imageio.v2 as imageio  # noqa: PLC0415  optional extra (video)
        import imageio_ffmpeg  # noqa: F401, PLC0415  optional extra (video); imageio's ffmpeg plugin needs it
    except ImportError:
        return None
    with atomic_path(path, suffix=".mp4") as tmp:
        imageio.mimwrite(tmp, list(frames), fps=fps, format="FFMPEG", codec="libx264", macro_block_size=1)
    return path
