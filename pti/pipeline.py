"""One photo through PTI, start to end: align, invert, tune, write. Below `pti.api` and `pti.batch`.

- `RunConfig`: everything a photo run needs, frozen and checked, small enough to send to a worker
  process or a Ray task (it names the generator and the weights; it does not hold them).
- `Pipeline.build(config, out)` loads the generator, the losses and the encoder (`--init e4e|restyle`)
  once; `pipeline.one(photo, name)`
  runs one photo through them, and `align`, `invert`, `finish` are its steps (a joint run calls them
  itself, around one shared tuning).
- Where the files go: `pti.engine.layout.Layout`.
- Where the pivot starts (`RunConfig.init`): the projector from w_avg (the paper); an encoder's W+ codes
  (e4e, ReStyle-e4e: `pti.engine.encoders`); or a pivot file the user has (`pti.engine.pivots`). After an
  encoder or a file, `invert_cfg.steps` projector steps refine it (0: the start is the pivot, bit for bit;
  how a start changes the projector: `pti.engine.invert`). Every report and identity records how its
  pivot was made (`report["init"]`).

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
from pti.engine.identity import NOT_ALIGNED, Identity, alignment_record, versions
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

INIT_KINDS = ("projector", "e4e", "restyle", "file")  # where the pivot starts (RunConfig.init)
ENCODER_INITS = ("e4e", "restyle")  # the starts that are an encoder (pti.engine.encoders.ENCODER_KINDS)
# The registry's default encoder checkpoint per kind, when no --encoder is given (pti.engine.weights).
DEFAULT_ENCODERS = {"e4e": "e4e-ffhq", "restyle": "restyle-e4e-ffhq"}


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
    init: str = "projector"  # where the pivot starts: projector (w_avg), e4e, restyle (encoders), file
    init_path: str | None = None  # the encoder checkpoint or the pivot file (absolute: the identity records it);
    # None with an encoder = the registry's default (pti.api resolves it before the run)
    init_sha256: str | None = None  # that file's sha256 (the manifest's fingerprint; pti.api hashes it once)
    restyle_iterations: int = 5  # ReStyle's refinement steps (its inference default); only with init "restyle"

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
                "init": one_of(*INIT_KINDS),
                "init_path": instance_of(str, optional=True),
                "init_sha256": instance_of(str, optional=True),
                "restyle_iterations": whole(1, 1000),
            },
        )
        if self.init == "projector" and self.invert_cfg.steps < 1:
            raise ValueError("RunConfig.invert_cfg.steps must be >= 1 with init 'projector' (0 needs a start)")
        if self.init == "projector" and self.init_path is not None:
            raise ValueError("RunConfig.init_path must be None with init 'projector'")
        if self.init == "file" and self.init_path is None:
            raise ValueError("RunConfig.init_path must name the pivot file with init 'file'")

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
    encoder: Any = field(default=None, repr=False)  # pti.engine.encoders.Encoder for init e4e|restyle, on `device`
    encoder_load: dict = field(default_factory=dict)  # this process's one load of it: id, pid, seconds

    @classmethod
    def build(
        cls,
        config: RunConfig,
        out: str | Path,
        *,
        progress: ProgressFn | None = None,
        workers: int = 1,
        device: torch.device | None = None,
        shared: tuple | None = None,
    ) -> "Pipeline":
        """Load the generator, the losses and the encoder (init e4e|restyle) once, on `device` (default: the
        config's, resolved here).

        `shared` is (generator, losses, base hash[, encoder]) already loaded elsewhere (Ray's object store);
        they are moved to the device. `workers` > 1 on the CPU splits the cores between that many processes."""
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
        pipeline = cls(config, G, losses, Path(out), dev, base_hash, progress)
        if config.init in ENCODER_INITS:
            pipeline._load_encoder(shared[3] if shared is not None and len(shared) > 3 else None)
        return pipeline

    def _load_encoder(self, shared=None) -> None:
        """The encoder, once per process (or from `shared`), checked against the base generator."""
        from pti.engine.encoders import check_encoder_fits, load_encoder  # noqa: PLC0415  only runs that use one

        t0 = time.perf_counter()
        path = self.config.init_path
        if path is None:
            raise PTIError(f"init {self.config.init}: no encoder checkpoint given (pti.api resolves the default)")
        if shared is not None:
            enc = shared.to(self.device)
        else:
            enc = load_encoder(path, kind=self.config.init, device=self.device)
        if enc.kind != self.config.init:
            raise PTIError(f"{path} is a {enc.kind} encoder, not {self.config.init}; pass --init {enc.kind}")
        check_encoder_fits(enc, self.G)
        self.encoder = enc
        self.encoder_load = {
            "id": f"{os.getpid()}-{time.time_ns()}",  # one per load: photos of one worker share it
            "pid": os.getpid(),
            "seconds": time.perf_counter() - t0,
            "shared": shared is not None,
        }

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
        aligned, warning, faces, cut = _aligned(path, self.G.img_resolution, self.config.align, self.config.face)
        res.warnings += [warning] if warning else []
        res.aligned = aligned
        if save:
            self.save_aligned(res)
        res.target = from_uint8(np.asarray(aligned.convert("RGB")), self.device)
        photo_sha256 = sha256_file(path)
        res.report = {
            "photo": str(path),
            "photo_path": str(path.resolve()),
            "photo_sha256": photo_sha256,
            "faces_found": faces,
            "alignment": NOT_ALIGNED if cut is None else alignment_record(**cut, photo_sha256=photo_sha256),
            "seconds": {"align": time.perf_counter() - t0},
        }
        _log(self.progress, "align", 1, 1, photo=str(path), faces=faces)
        return res

    def save_aligned(self, res: PhotoResult) -> None:
        res.files["aligned"] = save_photo_atomic(res.aligned, self.layout(res.name).aligned)

    def invert(self, res: PhotoResult, save: bool = True) -> None:
        """The pivot: from the start (`RunConfig.init`), then `invert_cfg.steps` projector steps. `before_tuning`
        always measures the pivot that the tuning gets (after any refine); `init.start_metrics` the start's.
        `save`: write the pivot's render (a clip's frames do not)."""
        cfg, init = self.config.invert_cfg, self.config.init
        start, record = self._start(res)
        if start is None or cfg.steps > 0:
            inv = invert_to_pivot(self.G, res.target, self.losses.projector, cfg, progress=self.progress, start=start)
            pivot, seconds, impl, curves = inv.pivot, inv.seconds, inv.impl, (inv.losses, inv.dists)
        else:  # the start as given: bit for bit
            pivot, seconds, impl, curves = start, 0.0, None, ([], [])
        res.pivot = pivot
        with torch.no_grad():
            pivot_img = self.G.synthesis(pivot, noise_mode="const", force_fp32=True)
        if save:
            res.files["pivot"] = save_png(to_uint8(pivot_img[0]), self.layout(res.name).pivot)
        res.report["seconds"]["invert"] = seconds
        if init in ENCODER_INITS:
            res.report["seconds"]["encode"] = record["seconds"]
        res.report["impl"] = {"invert": impl}  # what ran: implementation, ops, precision, flags, compile time
        res.report["steps"] = {"invert": cfg.steps}
        res.report["before_tuning"] = self.metrics(pivot_img, res.target)
        res.report["curves"] = {"invert_loss": curves[0], "invert_dist": curves[1]}
        if record is not None:
            record["refine_steps"] = cfg.steps
            if cfg.steps > 0:  # the start itself, before the projector refined it
                with torch.no_grad():
                    start_img = self.G.synthesis(start, noise_mode="const", force_fp32=True)
                record["start_metrics"] = self.metrics(start_img, res.target)
            else:
                record["start_metrics"] = res.report["before_tuning"]
        res.report["init"] = record or {"init": "projector", "refine_steps": cfg.steps, "seconds": seconds}

    def _start(self, res: PhotoResult) -> tuple[torch.Tensor | None, dict | None]:
        """(the start pivot [1, num_ws, w_dim] on the device, its record), or (None, None) for the projector."""
        cfg = self.config
        if cfg.init == "projector":
            return None, None
        t0 = time.perf_counter()
        record = {"init": cfg.init, "path": cfg.init_path, "sha256": cfg.init_sha256}
        if cfg.init == "file":
            from pti.engine.pivots import read_pivot  # noqa: PLC0415

            _log(self.progress, "pivot file", 0, 1, path=cfg.init_path)
            start = read_pivot(cfg.init_path, self.G.num_ws, self.G.w_dim)[None].to(self.device)
            record["seconds"] = time.perf_counter() - t0
            _log(self.progress, "pivot file", 1, 1, path=cfg.init_path)
            return start, record
        from pti.engine.encoders import encode  # noqa: PLC0415  only runs that use an encoder

        what = f"{cfg.init} ({Path(cfg.init_path).name})"
        _log(self.progress, "encode", 0, 1, encoder=what)
        img = torch.from_numpy(np.array(res.aligned.convert("RGB"))).permute(2, 0, 1)[None].to(self.device)
        iterations = cfg.restyle_iterations if cfg.init == "restyle" else 1
        codes = encode(self.encoder, img, G=self.G, iterations=iterations)
        start = codes.to(self.device, torch.float32).reshape(1, self.G.num_ws, self.G.w_dim)
        record["seconds"] = time.perf_counter() - t0
        if cfg.init == "restyle":
            record["restyle_iterations"] = cfg.restyle_iterations
        record["encoder_load"] = dict(self.encoder_load)
        _log(self.progress, "encode", 1, 1, encoder=what, ms=record["seconds"] * 1e3)
        return start, record

    def finish(self, res: PhotoResult, tuned: TuneResult, joint_with: list[str]) -> None:
        """Render the reconstruction, write the identity file, the report and the contact sheet."""
        cfg, layout = self.config, self.layout(res.name)
        with torch.no_grad():
            recon = tuned.G.synthesis(res.pivot, noise_mode="const", force_fp32=True)
        res.files["reconstruction"] = save_png(to_uint8(recon[0]), layout.reconstruction)
        rep = res.report
        rep["after_tuning"] = self.metrics(recon, res.target)
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
            init=rep.get("init"),
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
                "alignment",
                "joint_with",
                "device",
                "precision",
                "impl",
                "before_tuning",
                "after_tuning",
                "identity_similarity",
                "init",
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

    def metrics(self, img, target) -> dict:
        """MSE, MS-SSIM and the perceptual distance (under `perceptual_key`) of `img` against `target`."""
        m = image_metrics(img, target, self.losses.perceptual)
        m[perceptual_key(self.losses.official)] = m.pop("perceptual")
        return m


# ---------------------------------------------------------------------------- helpers


def _aligned(path: Path, size: int, align: bool, face: int | None):
    """(the aligned crop, a warning or None, faces found or None, how the face was cut or None for --no-align:
    `alignment_record`'s arguments but the photo's hash)."""
    img = load_photo(path)
    if not align:
        aligned, warning = resize_prealigned(img, size)
        return aligned, warning, None, None
    res = align_photo(img, output_size=size, face=face, name=str(path))
    warning = None
    if len(res.faces) > 1:
        warning = (
            f"{path}: {len(res.faces)} faces found; tuned face {res.chosen_index} (largest is 0; choose with --face N)"
        )
    cut = {
        "quad": res.quad,
        "landmarks": res.faces[res.chosen_index].landmarks,
        "photo_size": img.size,
        "output_size": size,
        "face": res.chosen_index,
    }
    return res.image, warning, len(res.faces), cut


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
