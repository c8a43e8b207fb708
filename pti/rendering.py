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

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from pti.engine import edits as E
from pti.engine.config import EXPORT_PRECISIONS, ProgressFn, check_fields, instance_of, one_of, real, whole
from pti.engine.device import apply_cpu_threads, resolve_device
from pti.engine.faceid import identity_similarity
from pti.engine.identity import load_base, open_identity
from pti.engine.images import grid, labelled_sheet, save_gif, save_png, to_uint8
from pti.engine.layout import Layout
from pti.engine.photo import load_photo, save_photo_atomic
from pti.errors import PTIError
from pti.export import CONTRACT, Source, default_export_dir, export
from pti.export.aoti import AotiBackend
from pti.export.config import ExportConfig
from pti.export.onnx import OnnxBackend
from pti.export.tensorrt import TensorRTBackend
from pti.fsutil import atomic_path, ensure_writable_dir, sha256_file


class Backend(Protocol):
    name: str

    def render(self, ws: torch.Tensor) -> torch.Tensor:
        """[B, num_ws, w_dim] -> [B, 3, R, R] in about [-1, 1], float32."""


class TorchBackend:
    """The tuned generator in PyTorch, in batches of `batch` (constant noise, fp32: the tuned pixels)."""

    name = "torch"

    def __init__(self, G, device: torch.device, batch: int = 8):
        self.G, self.device, self.batch = G.to(device).eval(), device, batch

    @torch.no_grad()
    def render(self, ws: torch.Tensor) -> torch.Tensor:
        chunks = [
            self.G.synthesis(ws[i : i + self.batch].to(self.device), noise_mode="const", force_fp32=True).float().cpu()
            for i in range(0, ws.shape[0], self.batch)
        ]
        return torch.cat(chunks)


BACKENDS = ("torch", "onnx", "aoti", "tensorrt")


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
    precision: str = "fp32"  # of that cached export: fp32 or fp16
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
                "precision": one_of(*EXPORT_PRECISIONS),
                "threads": instance_of(str, int, optional=True),
                "force": one_of(True, False),
            },
        )


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
):
    """The backend `name` rendering `G` (base + identity). Exported backends use the export in `engine`, else
    the base generator's export in the user cache (made on first use from `base`), with `G`'s weights swapped
    in by name: one graph per base generator, whatever the person."""
    if name == "torch":
        return TorchBackend(G, device, batch)
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
    )
    recon_needed = bool(specs)
    t0 = time.perf_counter()
    images = []
    for i in range(0, ws.shape[0], cfg.batch):
        images.append(runner.render(ws[i : i + cfg.batch]))
        if progress is not None:
            progress("render", min(i + cfg.batch, ws.shape[0]), ws.shape[0], {})
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
        engine=str(getattr(runner, "folder", "")) or None,
        device=str(dev),
        batch=cfg.batch,
        frames=len(frames),
        ms_per_image=1000 * seconds / ws.shape[0],
        warnings=result.warnings,
    )
    result.files["report"] = _write_report(result.report, out / "render.json")
    return result


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
