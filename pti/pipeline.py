"""One photo through PTI, start to end: align, invert, tune, write. Below `pti.api` and `pti.batch`.

- `RunConfig`: everything a photo run needs, frozen and checked, small enough to send to a worker
  process or a Ray task (it names the generator and the weights; it does not hold them).
- `Pipeline.build(config, out)` loads the generator and the losses once; `pipeline.one(photo, name)`
  runs one photo through them, and `align`, `invert`, `finish` are its steps (a joint run calls them
  itself, around one shared tuning).
- Where the files go: `pti.engine.layout.Layout`.

Every file is written atomically. Prints nothing; progress goes to a `ProgressFn`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pti.engine.align import align_photo, resize_prealigned
from pti.engine.checkpoint import BUILTIN_TINY, generator_hash, load_generator
from pti.engine.config import ProgressFn, check_fields, instance_of, one_of, whole
from pti.engine.device import apply_cpu_threads, resolve_device
from pti.engine.faceid import identity_similarity
from pti.engine.identity import Identity, versions
from pti.engine.images import from_uint8, labelled_sheet, save_png, to_uint8
from pti.engine.invert import InvertConfig
from pti.engine.invert import invert as invert_to_pivot
from pti.engine.layout import Layout
from pti.engine.losses import Losses, load_losses
from pti.engine.photo import load_photo, save_photo_atomic
from pti.engine.tune import TuneConfig, TuneResult, image_metrics
from pti.engine.tune import tune as tune_generator
from pti.engine.weights import Registry, WeightEntry
from pti.errors import PTIError, first_line
from pti.fsutil import sha256_file, write_json

# ---------------------------------------------------------------------------- what a run needs


@dataclass(frozen=True)
class Weights:
    """What rebuilds a weights registry in another process (a registry object need not pickle): its
    entries and its cache folder."""

    entries: tuple[WeightEntry, ...]  # the known files, with their checksums
    cache_dir: Path  # where they are cached

    @classmethod
    def of(cls, registry: Registry | None) -> "Weights | None":
        """None for None (each process then uses the user's cache, $PTI_HOME as it finds it)."""
        if registry is None:
            return None
        return cls(tuple(registry.entries.values()), Path(registry.cache_dir))

    def registry(self) -> Registry:
        return Registry(self.entries, self.cache_dir)


@dataclass(frozen=True)
class RunConfig:
    """What a photo run needs, in any process: which generator and weights, and how to align, invert,
    tune and store. The devices, threads and weights are named, not held, so each process resolves them."""

    network: str | None = None  # the generator: a checkpoint path (absolute: the identity records it) or a
    # builtin name; None = the built-in tiny generator
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N": each process resolves it
    align: bool = True  # False: photos are already aligned square crops, only resized (--no-align)
    face: int | None = None  # which face when a photo has several (0 = largest; None = the largest)
    invert_cfg: InvertConfig = InvertConfig()  # step 1, the inversion to a pivot
    tune_cfg: TuneConfig = TuneConfig()  # step 2, the pivotal tuning
    exact: bool = False  # store exact fp32 tuned weights instead of fp16 deltas
    allow_fallback: bool = True  # weight-free losses when the official weights are not cached
    threads: str | int | None = None  # CPU threads: None or "torch" = torch's as set, "auto" = pti's policy, N
    # (checked where it is applied: $PTI_THREADS is a user's setting)
    weights: Weights | None = None  # the weights registry to load the losses from; None = the user's cache

    def __post_init__(self):
        check_fields(
            self,
            {
                "network": instance_of(str, optional=True),
                "device": instance_of(str),
                "align": one_of(True, False),
                "face": whole(0, optional=True),
                "invert_cfg": instance_of(InvertConfig),
                "tune_cfg": instance_of(TuneConfig),
                "exact": one_of(True, False),
                "allow_fallback": one_of(True, False),
                "threads": instance_of(str, int, optional=True),
                "weights": instance_of(Weights, optional=True),
            },
        )

    @property
    def base_hint(self) -> str:
        """Where the generator came from, as the identity records it."""
        return self.network or BUILTIN_TINY

    def registry(self) -> Registry | None:
        return self.weights.registry() if self.weights is not None else None


# ---------------------------------------------------------------------------- one photo's result


@dataclass
class PhotoResult:
    photo: Path
    name: str
    identity: Path | None = None  # the .pti file
    files: dict[str, Path] = field(default_factory=dict)  # aligned, pivot, reconstruction, report, contact
    report: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    target: Any = field(default=None, repr=False)  # [1, 3, R, R] in [-1, 1], the aligned photo
    pivot: Any = field(default=None, repr=False)  # [1, num_ws, w_dim]
    aligned: Any = field(default=None, repr=False)  # the aligned photo (PIL), until it is written
    status: str = "done"  # done | skipped (resumed: done before) | failed
    error: str | None = None  # the one-line reason, when failed
    seconds: float = 0.0  # wall time for this photo in this run

    @classmethod
    def failed(cls, photo: Path, name: str, error: str) -> "PhotoResult":
        return cls(photo=photo, name=name, status="failed", error=error)


def perceptual_key(official: bool) -> str:
    """The perceptual metric's key in reports, manifests and summaries, named after the loss that measured
    it: LPIPS-alex when the losses are the paper's (`Losses.official`), else the weight-free stand-in."""
    return "lpips_alex" if official else "perceptual_weight_free"


def perceptual_key_in(metrics: dict) -> str:
    """The perceptual metric's key among `metrics` (a report's before or after tuning); "" when it has none."""
    return next((k for k in (perceptual_key(True), perceptual_key(False)) if k in metrics), "")


def _log(progress: ProgressFn | None, phase: str, step: int, total: int, **values) -> None:
    if progress is not None:
        progress(phase, step, total, values)


# ---------------------------------------------------------------------------- the pipeline


@dataclass(eq=False)
class Pipeline:
    """One photo's steps on a generator and losses loaded once per process (see `build`)."""

    config: RunConfig
    G: Any = field(repr=False)  # the base generator, on `device`
    losses: Losses = field(repr=False)  # the inversion's metric and the tuning's perceptual term
    out: Path  # the run's output folder (see `Layout`)
    device: torch.device
    base_hash: str  # the generator's content hash, recorded in every identity
    progress: ProgressFn | None = None

    @classmethod
    def build(
        cls,
        config: RunConfig,
        out: str | Path,
        *,
        progress: ProgressFn | None = None,
        workers: int = 1,
        device: torch.device | None = None,
        shared: tuple[Any, Losses, str] | None = None,
    ) -> "Pipeline":
        """Load the generator and the losses once, on `device` (default: the config's, resolved here).

        `shared` is (generator, losses, base hash) already loaded elsewhere (Ray's object store); they
        are moved to the device. `workers` > 1 on the CPU splits the cores between that many processes."""
        dev = device or resolve_device(config.device)
        if shared is None:
            G = load_generator(config.network, dev)
        else:
            G = shared[0].to(dev)
        n = apply_cpu_threads(G, dev, config.threads)
        if dev.type == "cpu" and workers > 1:
            torch.set_num_threads(max(1, min(n, (os.cpu_count() or 1) // workers)))  # split the cores
        if shared is None:
            losses = load_losses(dev, allow_fallback=config.allow_fallback, registry=config.registry())
            base_hash = generator_hash(G)
        else:
            losses, base_hash = shared[1].to(dev), shared[2]
        return cls(config, G, losses, Path(out), dev, base_hash, progress)

    def layout(self, name: str) -> Layout:
        return Layout(self.out, name)

    def one(self, path: Path, name: str) -> PhotoResult:
        """One photo, start to end (single-ID): align, invert, tune, write."""
        res = self.align(path, name)
        self.invert(res)
        tuned = tune_generator(
            self.G, [res.target], [res.pivot], self.losses.perceptual, self.config.tune_cfg, self.progress
        )
        self.finish(res, tuned, [])
        return res

    def attempt(self, path: Path, name: str) -> PhotoResult:
        """`one`, where a PTIError or running out of memory makes a `failed` result instead of an exception;
        the result keeps no tensors or images (it may travel to another process)."""
        t0 = time.perf_counter()
        try:
            res = self.one(path, name)
        except PTIError as e:
            res = PhotoResult.failed(path, name, str(e))
        except (MemoryError, RuntimeError) as e:  # out of memory and kin: this photo fails, the run goes on
            res = PhotoResult.failed(path, name, first_line(e))
        res.seconds = time.perf_counter() - t0
        res.target = res.pivot = res.aligned = None  # tensors and images stay where they were made
        return res

    def align(self, path: Path, name: str, save: bool = True) -> PhotoResult:
        res = PhotoResult(photo=path, name=name)
        t0 = time.perf_counter()
        _log(self.progress, "align", 0, 1, photo=str(path))
        aligned, warning, faces = _aligned(path, self.G.img_resolution, self.config.align, self.config.face)
        res.warnings += [warning] if warning else []
        res.aligned = aligned
        if save:
            self.save_aligned(res)
        res.target = from_uint8(np.asarray(aligned.convert("RGB")), self.device)
        res.report = {
            "photo": str(path),
            "photo_path": str(path.resolve()),
            "photo_sha256": sha256_file(path),
            "faces_found": faces,
            "seconds": {"align": time.perf_counter() - t0},
        }
        _log(self.progress, "align", 1, 1, photo=str(path), faces=faces)
        return res

    def save_aligned(self, res: PhotoResult) -> None:
        res.files["aligned"] = save_photo_atomic(res.aligned, self.layout(res.name).aligned)

    def invert(self, res: PhotoResult) -> None:
        cfg = self.config.invert_cfg
        inv = invert_to_pivot(self.G, res.target, self.losses.projector, cfg, progress=self.progress)
        res.pivot = inv.pivot
        with torch.no_grad():
            pivot_img = self.G.synthesis(inv.pivot, noise_mode="const", force_fp32=True)
        res.files["pivot"] = save_png(to_uint8(pivot_img[0]), self.layout(res.name).pivot)
        res.report["seconds"]["invert"] = inv.seconds
        res.report["impl"] = {"invert": inv.impl}  # what ran: implementation, ops, precision, flags, compile time
        res.report["steps"] = {"invert": cfg.steps}
        res.report["before_tuning"] = self._metrics(pivot_img, res.target)
        res.report["curves"] = {"invert_loss": inv.losses, "invert_dist": inv.dists}

    def finish(self, res: PhotoResult, tuned: TuneResult, joint_with: list[str]) -> None:
        """Render the reconstruction, write the identity file, the report and the contact sheet."""
        cfg, layout = self.config, self.layout(res.name)
        with torch.no_grad():
            recon = tuned.G.synthesis(res.pivot, noise_mode="const", force_fp32=True)
        res.files["reconstruction"] = save_png(to_uint8(recon[0]), layout.reconstruction)
        rep = res.report
        rep["after_tuning"] = self._metrics(recon, res.target)
        rep["seconds"]["tune"] = tuned.seconds
        rep.setdefault("impl", {})["tune"] = tuned.impl
        compiled = [r["compile_seconds"] for r in rep["impl"].values() if r and r.get("compile_seconds") is not None]
        if compiled:  # the one-time cost of impl=compile, apart from the steps (seconds.invert/tune include it)
            rep["seconds"]["compile"] = sum(compiled)
        rep["steps"]["tune"] = tuned.steps
        rep["early_stopped"] = tuned.early_stopped
        rep["joint_with"] = joint_with
        rep["curves"].update({f"tune_{k}": v for k, v in tuned.curves.items()})
        rep.update(
            network=cfg.base_hint,
            base_hash=self.base_hash,
            device=str(self.device),
            precision=cfg.tune_cfg.precision,
            threads=torch.get_num_threads() if self.device.type == "cpu" else None,
            losses=self.losses.names,
            official_losses=self.losses.official,
            notice=self.losses.notice,
            invert_config=asdict(cfg.invert_cfg),
            tune_config=asdict(cfg.tune_cfg),
            versions=versions(),
        )
        rep["identity_similarity"] = _id_similarity(res.files["aligned"], recon)
        meta = {
            k: rep[k]
            for k in (
                "seconds",
                "steps",
                "early_stopped",
                "curves",
                "invert_config",
                "tune_config",
                "versions",
                "losses",
                "official_losses",
                "photo",
                "photo_path",
                "photo_sha256",
                "joint_with",
                "device",
                "precision",
                "impl",
                "before_tuning",
                "after_tuning",
                "identity_similarity",
            )
        }
        ident = Identity.from_tuning(
            self.G, tuned.G, res.pivot, self.base_hash, cfg.base_hint, exact=cfg.exact, meta=meta
        )
        res.identity = ident.save(layout.identity)
        rep["identity_file"] = {
            "path": str(res.identity),
            "bytes": res.identity.stat().st_size,
            "encoding": "weight-fp32" if cfg.exact else "delta-fp16",
        }
        res.files["report"] = write_json(rep, layout.report)
        res.files["contact"] = _contact_sheet(res, layout.contact)

    def _metrics(self, img, target) -> dict:
        m = image_metrics(img, target, self.losses.perceptual)
        m[perceptual_key(self.losses.official)] = m.pop("perceptual")
        return m


# ---------------------------------------------------------------------------- helpers


def _aligned(path: Path, size: int, align: bool, face: int | None):
    img = load_photo(path)
    if not align:
        aligned, warning = resize_prealigned(img, size)
        return aligned, warning, None
    res = align_photo(img, output_size=size, face=face, name=str(path))
    warning = None
    if len(res.faces) > 1:
        warning = (
            f"{path}: {len(res.faces)} faces found; tuned face {res.chosen_index} (largest is 0; choose with --face N)"
        )
    return res.image, warning, len(res.faces)


def _id_similarity(aligned_path: Path, recon) -> float | None:
    """dlib face-embedding cosine similarity of reconstruction vs aligned input, None without a face."""
    try:
        return identity_similarity(Image.open(aligned_path).convert("RGB"), Image.fromarray(to_uint8(recon[0])))
    except Exception:  # noqa: BLE001  a report metric must never sink a finished run
        return None


def _contact_sheet(res: PhotoResult, path: Path) -> Path:
    """input | aligned | pivot | reconstruction, labelled, one row a person can open."""
    aligned = Image.open(res.files["aligned"]).convert("RGB")
    tiles = [
        ("input", load_photo(res.photo)),
        ("aligned", aligned),
        ("pivot (before tuning)", Image.open(res.files["pivot"])),
        ("reconstruction (after)", Image.open(res.files["reconstruction"])),
    ]
    return save_photo_atomic(labelled_sheet([tiles], size=max(aligned.size[0], 256)), path)
