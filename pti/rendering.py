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
from dataclasses import asdict, dataclass, field, replace
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
from pti.errors import IdentityError, ImageError, PTIError
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


PASTE_FORMATS = ("auto", "png", "jpeg")  # RenderConfig.paste_format
# Suffixes a pasted photo keeps (Pillow writes them losslessly, or it is JPEG); any other becomes PNG.
KEPT_SUFFIXES = {".jpg": ".jpg", ".jpeg": ".jpg", ".png": ".png", ".bmp": ".bmp", ".tif": ".tif", ".tiff": ".tif"}
JPEG_QUALITY = 95  # a pasted JPEG: quality 95, no chroma subsampling


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
    paste: bool = False  # also paste every output back into the original photo (`paste_source`, pti.engine.paste)
    photo: str | Path | None = None  # the original photo to paste into; None = the one the identity records
    paste_format: str = "auto"  # the pasted photo's format: auto (the original's: JPEG stays JPEG) | png | jpeg
    stitch: bool = False  # with paste, on the torch backend: stitching tuning per output (pti.engine.stitch)
    stitch_steps: int = 50  # its Adam steps at most, per output
    stitch_threshold: float = 0.002  # it stops once the band's MSE is below this

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
                "paste": one_of(True, False),
                "photo": instance_of(str, Path, optional=True),
                "paste_format": one_of(*PASTE_FORMATS),
                "stitch": one_of(True, False),
                "stitch_steps": whole(1, 10_000),
                "stitch_threshold": real(0),
            },
        )
        if self.stitch and not self.paste:
            raise ValueError("RenderConfig.stitch must be False without paste=True, got True")
        if self.stitch and self.backend != "torch":
            raise ValueError(f"RenderConfig.stitch must be False with backend {self.backend!r} (it tunes), got True")
        if self.photo is not None and not self.paste:
            raise ValueError(f"RenderConfig.photo must be None without paste=True, got {self.photo!r}")
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
    pasted: list[np.ndarray] = field(default_factory=list, repr=False)  # with paste: uint8 [H, W, 3] per output


@dataclass(frozen=True)
class PasteSource:
    """The original photo an identity's face was cut from, checked, and how it was cut (`paste_source`)."""

    path: Path
    photo: np.ndarray = field(repr=False)  # uint8 [H, W, 3], as pti tune read it (EXIF rotation applied)
    quad: np.ndarray = field(repr=False)  # [4, 2] the FFHQ quad in the photo's pixels
    landmarks: np.ndarray = field(repr=False)  # [68, 2]
    suffix: str  # what a pasted photo is written as: .jpg, .png, ...
    sha256: str
    icc_profile: bytes | None = field(default=None, repr=False)  # the photo's colour profile, kept in the output
    note: str | None = None  # what the pasted photo cannot keep of the original (its mode was not 8-bit RGB)

    def output(self, stem: str) -> str:
        return f"{stem}_pasted{self.suffix}"


def paste_source(ident, identity: Path, photo: str | Path | None = None, paste_format: str = "auto") -> PasteSource:
    """The photo `ident` (the file `identity`) was tuned from: `photo` if given, else the path it records, which
    must be that photo (sha256); with how its face was cut. IdentityError (one line) when it cannot be pasted."""
    rec = ident.alignment
    if rec is None:
        why = (
            "it was imported from an authors' checkpoint"
            if ident.meta.get("imported")
            else "it was written by an older pti, before identities recorded it"
        )
        raise IdentityError(
            f"{identity}: cannot paste back: {why}, so how the face was cut from the photo is not known; "
            "re-run pti tune on the photo"
        )
    if not rec.get("aligned", True):
        raise IdentityError(
            f"{identity} was tuned with --no-align (the photo was already an aligned crop): there is no original "
            "photo to paste it back into"
        )
    found, digest = _original(ident, identity, photo, "photo", rec.get("photo_sha256"))
    img = load_photo(found)
    with Image.open(found) as raw:  # what the 8-bit RGB photo pti works on leaves out of the file
        mode, icc = raw.mode, raw.info.get("icc_profile")
    note = None
    if mode != "RGB":
        note = (
            f"{found.name} is {mode}, not 8-bit RGB: the pasted photo is 8-bit RGB, as pti tune read it "
            "(transparency composited on white, 16 bits scaled to 8)"
        )
    if list(img.size) != list(rec["photo_size"]):
        raise IdentityError(
            f"{found} reads as {img.size[0]}x{img.size[1]}, not the {rec['photo_size'][0]}x{rec['photo_size'][1]} "
            f"{identity.name} was cut from (a different reader of its EXIF rotation?)"
        )
    if paste_format == "auto":
        suffix = KEPT_SUFFIXES.get(found.suffix.lower(), ".png")
    else:
        suffix = ".png" if paste_format == "png" else ".jpg"
    return PasteSource(
        found,
        np.asarray(img),
        np.asarray(rec["quad"], dtype=np.float64),
        np.asarray(rec["landmarks"], dtype=np.float64),
        suffix,
        digest,
        icc if isinstance(icc, bytes) else None,
        note,
    )


def save_pasted(img: np.ndarray, path: Path, icc_profile: bytes | None = None) -> Path:
    """A pasted photo, atomically: JPEG at quality 95 without chroma subsampling, any other suffix losslessly;
    with the original's colour profile where the format carries one (JPEG, PNG, TIFF)."""
    path = Path(path)
    suffix = path.suffix.lower()
    options = {"icc_profile": icc_profile} if icc_profile and suffix in (".jpg", ".jpeg", ".png", ".tif") else {}
    if suffix in (".jpg", ".jpeg"):
        options.update(format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        options["format"] = Image.registered_extensions().get(suffix, "PNG")
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, **options)
    return path


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
    if ident.is_clip:
        return _render_clip(path, ident, base, base_hash, G, specs, out, cfg, dev, impl, registry, progress)
    frames, ws = edit_batch(ident, specs, registry)
    source = paste_source(ident, path, cfg.photo, cfg.paste_format) if cfg.paste else None  # before any work
    out = Path(out) if out is not None else Layout.of(path).edits
    ident_key = ident.checksum or sha256_file(path)  # a v2 file's verified checksum: no second read of the file
    if not cfg.force:
        check_render_folder(
            out, path, ident_key, planned_files(frames, specs, cfg.compare, cfg.mp4, source, cfg.stitch)
        )
    ensure_writable_dir(out)

    base_hint, runner = _runner(cfg, ident, G, base, base_hash, dev, impl, progress)
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
    if source is not None:
        stitch_ws = ws[1:] if recon_needed else ws  # the outputs' ws, in the order of result.images
        _write_pasted(result, frames, specs, source, cfg.compare, progress, (runner, stitch_ws, _stitch_config(cfg)))
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


def clip_source(ident, identity: Path, clip: str | Path | None = None) -> Path:
    """The clip a clip identity was tuned from (`clip`, else the path it records), checked by its sha256."""
    return _original(ident, identity, clip, "clip", ident.meta.get("clip_sha256"))[0]


def _original(ident, identity: Path, given, what: str, sha256: str | None) -> tuple[Path, str]:
    """(the photo or clip `ident` was tuned from: `given`, else the path its metadata records, its sha256), checked
    to be that file by its sha256; IdentityError or ImageError (one line) otherwise."""
    recorded = [c for c in (ident.meta.get(f"{what}_path"), ident.meta.get(what)) if c]
    if given is None:
        found = next((Path(c) for c in recorded if Path(c).is_file()), None)
        if found is None:
            raise IdentityError(
                f"{identity}: the {what} it was tuned from ({recorded[0] if recorded else 'not recorded'}) is not "
                "there; pass it with --photo"
            )
    else:
        found = Path(given)
        if not found.is_file():
            missing = "photo not found" if what == "photo" else "video not found"
            raise ImageError(f"{missing}: {found}" if not found.exists() else f"{found} is not a file")
    digest = sha256_file(found)
    if digest != sha256:
        raise IdentityError(
            f"{found} is not the {what} {identity.name} was tuned from (its sha256 differs); pass the original "
            "with --photo"
        )
    return found, digest


def _render_clip(path, ident, base, base_hash, G, specs, out, cfg, dev, impl, registry, progress) -> RenderResult:
    """`render` for a clip identity (`pti.clip.render_clip`): every frame, an MP4, frames/ and render.json."""
    from pti.clip import clip_frames, render_clip  # noqa: PLC0415

    if cfg.compare:
        raise PTIError("--compare is for photos; a clip renders frames/ and an MP4 (open them side by side)")
    if cfg.paste_format != "auto":
        raise PTIError("--paste-format is for photos; a clip's frames are PNG (exact) and its video MP4")
    num_ws, w_dim = ident.pivot.shape
    directions = [E.resolve(s, num_ws, w_dim, registry) for s in specs]
    labels, ws, values = clip_frames(ident, specs, directions)
    source = clip_source(ident, path, cfg.photo) if cfg.paste else None
    out = Path(out) if out is not None else Layout.of(path).edits
    ident_key = ident.checksum or sha256_file(path)
    if not cfg.force:
        from pti.clip import plan  # noqa: PLC0415

        folder, video = ("frames", "pasted.mp4") if source is not None else ("crops", "crops.mp4")
        pngs = [f"{folder}/{i:06d}.png" for i, _ in plan(ident, source is not None).frames]
        check_render_folder(out, path, ident_key, [video, "render.json", *pngs])
    ensure_writable_dir(out)
    base_hint, runner = _runner(cfg, ident, G, base, base_hash, dev, impl, progress)
    result = RenderResult(path, out, labels, [], warnings=list(ident.notes))
    result.report.update(identity_checksum=ident_key)
    audio = source
    if audio is None and (ident.meta.get("video") or {}).get("has_audio"):
        try:  # the crops' MP4 takes the clip's sound too, when the clip is still there
            audio = clip_source(ident, path)
        except PTIError:
            result.warnings.append("the clip it was tuned from is not there: the MP4 has no sound")
    with precision_scope("fp32", dev):
        how = f"{runner.name}|{cfg.precision}|{impl}|{cfg.engine}"
        render_clip(result, ident, runner, ws, cfg.batch, source, audio, progress, _stitch_config(cfg), how)
        export_flags = precision_flags()
    clip = result.report["clip"]
    result.report.update(
        identity=str(path),
        identity_path=str(path.resolve()),
        base_generator=base_hint,
        base_hash=ident.base_hash,
        edits=[s.text for s in specs],
        backend=runner.name,
        impl=runner.record(cfg.impl) if isinstance(runner, TorchBackend) else _export_record(runner, export_flags),
        identity_tuned_with=ident.tuned_with,
        device=str(dev),
        batch=cfg.batch,
        frames=clip["frames"],
        ms_per_image=1000 * clip["seconds"] / max(1, clip["rendered"]),  # the frames rendered in this run
        outputs=[{"label": labels[0] if labels else "reconstruction", "values": values[0] if values else {}}],
        warnings=result.warnings,
    )
    result.files["report"] = _write_report(result.report, out / "render.json")
    return result


def _runner(cfg: RenderConfig, ident, G, base, base_hash: str, dev, impl: str | None, progress):
    """(the base generator's name as render.json records it, the backend `cfg` asks for, rendering `G`)."""
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
    return base_hint, runner


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


def planned_files(
    frames, specs, compare: bool, mp4: bool, source: PasteSource | None = None, stitch: bool = False
) -> list[str]:
    """The files `_write`, `_write_pasted` and `render` will write into the output folder, relative to it."""
    if any(s.sweep for s in specs):
        name = _sweep_name(specs)
        files = [f"frames/{f.label}.png" for f in frames] + [f"{name}_sweep.png", f"{name}_sweep.gif"]
        files += [f"{name}_sweep.mp4"] if mp4 else []
    else:
        files = [f"{frames[0].label}.png"]
    files += ["compare.png"] if compare else []
    if source is not None:
        files += [_pasted_name(f, specs, source) for f in frames] + (["compare_pasted.png"] if compare else [])
        files += [f"{f.label}_stitched.png" for f in frames] if stitch else []
    return files + ["render.json"]


def _pasted_name(frame, specs, source: PasteSource) -> str:
    """Where `frame`'s pasted photo goes, relative to the output folder: beside its crop."""
    return ("frames/" if any(s.sweep for s in specs) else "") + source.output(frame.label)


def _stitch_config(cfg: RenderConfig):
    """The stitching tuning's settings (pti.engine.stitch) when `cfg.stitch`, else None."""
    if not cfg.stitch:
        return None
    from pti.engine.stitch import StitchConfig  # noqa: PLC0415

    return StitchConfig(steps=cfg.stitch_steps, threshold=cfg.stitch_threshold)


def _write_pasted(
    result: RenderResult, frames, specs, source: PasteSource, compare: bool, progress, stitching=(None, None, None)
) -> None:
    """Every output pasted back into the original photo (pti.engine.paste), beside its crop; with `compare`,
    compare_pasted.png: original | each pasted output. `stitching` = (runner, the outputs' ws, StitchConfig or
    None): with a config, each crop is first re-rendered by a copy of the generator stitching-tuned to the photo."""
    from pti.clip import stitched_crop  # noqa: PLC0415
    from pti.engine.paste import paste  # noqa: PLC0415  only pasting renders need it

    t0 = time.perf_counter()
    runner, ws, stitch = stitching
    records = []
    outputs = frames if any(s.sweep for s in specs) else frames[:1]
    for k, (f, img) in enumerate(zip(outputs, result.images)):
        if stitch is not None:
            img, record = stitched_crop(
                runner.G, ws[k : k + 1], source.photo, img, source.quad, source.landmarks, stitch
            )
            records.append(record)
            result.files[f"stitched {f.label}"] = save_png(img, result.out / f"{f.label}_stitched.png")
        pasted = paste(source.photo, img, source.quad, source.landmarks)
        result.pasted.append(pasted.image)
        target = result.out / _pasted_name(f, specs, source)
        result.files[f"pasted {f.label}"] = save_pasted(pasted.image, target, source.icc_profile)
        if progress is not None:
            progress("paste", k + 1, len(outputs), {})
    if compare:
        tiles = [("original", source.photo)] + [(f"{f.label}, pasted", p) for f, p in zip(outputs, result.pasted)]
        size = max(256, min(1024, max(source.photo.shape[:2])))
        result.files["compare pasted"] = save_photo_atomic(
            labelled_sheet([tiles], size=size), result.out / "compare_pasted.png"
        )
    result.report["paste"] = {
        "photo": str(source.path),
        "photo_sha256": source.sha256,
        "size": [int(source.photo.shape[1]), int(source.photo.shape[0])],
        "format": source.suffix.lstrip("."),
        "exact_outside_mask": source.suffix != ".jpg",  # a JPEG re-encodes every pixel
        "mask_box": [int(v) for v in pasted.box],
        "seconds": time.perf_counter() - t0,
        "stitch": None if stitch is None else {"config": asdict(stitch), "outputs": records},
    }
    if source.note:
        result.warnings.append(source.note)
    if source.suffix == ".jpg":
        result.warnings.append(
            "the pasted photos are JPEG, like the original: re-encoding changes pixels outside the face by JPEG's "
            "rounding; --paste-format png keeps them bit for bit"
        )


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
