"""`pti.tune(...)`: the whole pipeline as a function (align, invert, tune, write), printing nothing.

The CLI's `pti tune` is this function plus a progress bar. Every file is written atomically; if the
run is interrupted, `TuneInterrupted.kept` lists the files that were completely written before.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pti.engine.invert import InvertConfig
from pti.engine.tune import TuneConfig
from pti.errors import Interrupted, PTIError
from pti.fsutil import ensure_writable_dir, mark, write_json, written_since

ProgressFn = Callable[[str, int, int, dict], None]  # (phase, step, total, values)


class TuneInterrupted(Interrupted):
    """Ctrl-C during `tune`: nothing partial was written; `kept` lists the complete files."""


@dataclass
class PhotoResult:
    photo: Path
    name: str
    identity: Path | None = None                    # the .pti file
    files: dict[str, Path] = field(default_factory=dict)  # aligned, pivot, reconstruction, report, contact
    report: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    target: Any = field(default=None, repr=False)   # [1, 3, R, R] in [-1, 1], the aligned photo
    pivot: Any = field(default=None, repr=False)    # [1, num_ws, w_dim]
    aligned: Any = field(default=None, repr=False)  # the aligned photo (PIL), until it is written
    status: str = "done"                            # done | skipped (resumed: done before) | failed
    error: str | None = None                        # the one-line reason, when failed
    seconds: float = 0.0                            # wall time for this photo in this run


def _log(progress: ProgressFn | None, phase: str, step: int, total: int, **values) -> None:
    if progress is not None:
        progress(phase, step, total, values)


def tune(
    photos: Sequence[str | Path],
    network: str | Path | None = None,          # checkpoint path; None = the built-in tiny generator
    out: str | Path = "pti-out",                # output directory
    *,
    device: str = "auto",
    align: bool = True,                          # False: photos are already aligned crops (--no-align)
    face: int | None = None,                     # which face when a photo has several (largest = 0)
    joint: bool = False,                         # tune one generator for all photos (multi-ID PTI)
    invert_cfg: InvertConfig = InvertConfig(),
    tune_cfg: TuneConfig = TuneConfig(),
    exact: bool = False,                         # store exact fp32 weights instead of fp16 deltas
    allow_fallback: bool = True,                 # weight-free losses when the official weights are absent
    progress: ProgressFn | None = None,
    registry=None,                               # weights registry (default: the user's cache)
    threads: str | int | None = None,            # CPU threads: None = torch's as set, "auto" = pti's policy, N
    workers: int = 1,                            # photos in parallel processes (single-ID runs)
    ray: str | None = None,                      # "auto" or a Ray cluster address: one task per photo (pti[ray])
    force: bool = False,                         # redo photos the manifest says are done; allow other settings
) -> list[PhotoResult]:
    """Align, invert and tune each photo (or all jointly); write `<out>/<name>.pti` and a folder per photo.

    Single-ID runs (the default) go through `pti.batch`: `<out>/manifest.jsonl` records every photo, a
    photo that fails is recorded and the rest go on, a re-run skips what is done, and `<out>/summary.csv`
    has one row per photo. The result has one entry per photo, failures included (`status`, `error`).
    Joint runs tune one generator for all photos, so any bad photo stops them before tuning."""
    from pti.engine.checkpoint import generator_hash, load_generator
    from pti.engine.device import apply_cpu_threads, resolve_device
    from pti.engine.losses import load_losses
    from pti.engine.photo import expand_photo_paths, unique_stems
    from pti.engine.tune import tune as tune_generator

    out = Path(out)
    dev = resolve_device(device)
    if network is not None and Path(network).is_file():
        network = str(Path(network).resolve())  # the identity records it: `pti render` works from any folder
    paths = expand_photo_paths(list(photos))
    if not paths:
        raise PTIError("no photos given")
    if workers < 1:
        raise PTIError(f"workers must be 1 or more, not {workers}")
    if joint and (workers > 1 or ray):
        raise PTIError("--joint tunes one generator for all photos in one process; it cannot use --workers or --ray")
    start = mark()
    try:
        G = load_generator(network, dev)
        apply_cpu_threads(G, dev, threads)
        losses = load_losses(dev, allow_fallback=allow_fallback, registry=registry)
        ensure_writable_dir(out)  # inputs first, then the output: a mistyped network creates no folder
        run = _Run(G, losses, out, dev, generator_hash(G), str(network) if network else "builtin:tiny",
                   invert_cfg, tune_cfg, exact, progress)
        names = unique_stems(paths)
        if not joint:
            from pti.batch import Settings, tune_many

            settings = Settings(network=str(network) if network is not None else None, device=device, align=align, face=face,
                                invert_cfg=invert_cfg, tune_cfg=tune_cfg, exact=exact, allow_fallback=allow_fallback,
                                threads=threads)
            return tune_many(run, paths, names, settings, workers=workers, ray=ray, force=force)
        from pti.batch import Manifest, check_identity_slots
        from pti.engine.weights import sha256_file

        if not force:
            check_identity_slots(out, [(p, n, sha256_file(p)) for p, n in zip(paths, names)], Manifest(out))
        # Joint: align every photo first: bad input (no face, unreadable file) fails before anything is written.
        results = [run.align(path, name, align, face, save=False) for path, name in zip(paths, names)]
        # then all pivots, then one shared tuning (the paper's multi-ID PTI).
        for res in results:
            run.save_aligned(res)
            run.invert(res)
        tuned = tune_generator(G, [r.target for r in results], [r.pivot for r in results], losses.perceptual, tune_cfg, progress)
        for res in results:
            run.finish(res, tuned, [r.name for r in results if r is not res])
        return results
    except KeyboardInterrupt:
        raise TuneInterrupted(written_since(start)) from None


# ---------------------------------------------------------------------------- one run's steps


@dataclass
class _Run:
    G: object
    losses: object
    out: Path
    device: object
    base_hash: str
    base_hint: str
    invert_cfg: InvertConfig
    tune_cfg: TuneConfig
    exact: bool
    progress: ProgressFn | None

    def one(self, path: Path, name: str, align: bool, face: int | None) -> PhotoResult:
        """One photo, start to end (single-ID): align, invert, tune, write."""
        from pti.engine.tune import tune as tune_generator

        res = self.align(path, name, align, face)
        self.invert(res)
        tuned = tune_generator(self.G, [res.target], [res.pivot], self.losses.perceptual, self.tune_cfg, self.progress)
        self.finish(res, tuned, [])
        return res

    def align(self, path: Path, name: str, align: bool, face: int | None, save: bool = True) -> PhotoResult:
        from pti.engine.weights import sha256_file

        res = PhotoResult(photo=path, name=name)
        t0 = time.perf_counter()
        _log(self.progress, "align", 0, 1, photo=str(path))
        aligned, warning, faces = _aligned(path, self.G.img_resolution, align, face)
        res.warnings += [warning] if warning else []
        res.aligned = aligned
        if save:
            self.save_aligned(res)
        res.target = _to_tensor(aligned, self.device)
        res.report = {"photo": str(path), "photo_path": str(path.resolve()), "photo_sha256": sha256_file(path),
                      "faces_found": faces, "seconds": {"align": time.perf_counter() - t0}}
        _log(self.progress, "align", 1, 1, photo=str(path), faces=faces)
        return res

    def save_aligned(self, res: PhotoResult) -> None:
        res.files["aligned"] = _save(res.aligned, self.out / res.name / "aligned.png")

    def invert(self, res: PhotoResult) -> None:
        import torch

        from pti.engine.invert import invert

        inv = invert(self.G, res.target, self.losses.projector, self.invert_cfg, progress=self.progress)
        res.pivot = inv.pivot
        with torch.no_grad():
            pivot_img = self.G.synthesis(inv.pivot, noise_mode="const", force_fp32=True)
        res.files["pivot"] = _save_tensor(pivot_img, self.out / res.name / "pivot.png")
        res.report["seconds"]["invert"] = inv.seconds
        res.report["steps"] = {"invert": self.invert_cfg.steps}
        res.report["before_tuning"] = _metrics(pivot_img, res.target, self.losses)
        res.report["curves"] = {"invert_loss": inv.losses, "invert_dist": inv.dists}

    def finish(self, res: PhotoResult, tuned, joint_with: list[str]) -> None:
        """Render the reconstruction, write the identity file, the report and the contact sheet."""
        import torch

        from pti.engine.identity import Identity, versions

        with torch.no_grad():
            recon = tuned.G.synthesis(res.pivot, noise_mode="const", force_fp32=True)
        res.files["reconstruction"] = _save_tensor(recon, self.out / res.name / "reconstruction.png")
        rep = res.report
        rep["after_tuning"] = _metrics(recon, res.target, self.losses)
        rep["seconds"]["tune"] = tuned.seconds
        rep["steps"]["tune"] = tuned.steps
        rep["early_stopped"] = tuned.early_stopped
        rep["joint_with"] = joint_with
        rep["curves"].update({f"tune_{k}": v for k, v in tuned.curves.items()})
        rep.update(
            network=self.base_hint, base_hash=self.base_hash, device=str(self.device), precision=self.tune_cfg.precision,
            threads=torch.get_num_threads() if self.device.type == "cpu" else None,
            losses=self.losses.names, official_losses=self.losses.official, notice=self.losses.notice,
            invert_config=asdict(self.invert_cfg), tune_config=asdict(self.tune_cfg), versions=versions(),
        )
        rep["identity_similarity"] = _id_similarity(res.files["aligned"], recon)
        meta = {k: rep[k] for k in ("seconds", "steps", "early_stopped", "curves", "invert_config", "tune_config",
                                     "versions", "losses", "official_losses", "photo", "photo_path", "photo_sha256",
                                     "joint_with", "device",
                                     "precision", "before_tuning", "after_tuning", "identity_similarity")}
        ident = Identity.from_tuning(self.G, tuned.G, res.pivot, self.base_hash, self.base_hint, exact=self.exact, meta=meta)
        res.identity = ident.save(self.out / f"{res.name}.pti")
        rep["identity_file"] = {"path": str(res.identity), "bytes": res.identity.stat().st_size,
                                "encoding": "weight-fp32" if self.exact else "delta-fp16"}
        res.files["report"] = write_json(rep, self.out / res.name / "report.json")
        res.files["contact"] = _contact_sheet(res, self.out / res.name / "contact.png")


# ---------------------------------------------------------------------------- helpers


def _aligned(path: Path, size: int, align: bool, face: int | None):
    from pti.engine.align import align_photo, resize_prealigned
    from pti.engine.photo import load_photo

    img = load_photo(path)
    if not align:
        aligned, warning = resize_prealigned(img, size)
        return aligned, warning, None
    res = align_photo(img, output_size=size, face=face, name=str(path))
    warning = None
    if len(res.faces) > 1:
        warning = f"{path}: {len(res.faces)} faces found; tuned face {res.chosen_index} (largest is 0; choose with --face N)"
    return res.image, warning, len(res.faces)


def _to_tensor(img, device):
    import numpy as np

    from pti.engine.images import from_uint8

    return from_uint8(np.asarray(img.convert("RGB")), device)


def _save(img, path: Path) -> Path:
    from pti.engine.photo import save_photo_atomic

    return save_photo_atomic(img, path)


def _save_tensor(t, path: Path) -> Path:
    from pti.engine.images import save_png, to_uint8

    return save_png(to_uint8(t[0]), path)


def _metrics(img, target, losses) -> dict:
    from pti.engine.tune import image_metrics

    m = image_metrics(img, target, losses.perceptual)
    m["lpips_alex" if losses.official else "perceptual_weight_free"] = m.pop("perceptual")
    return m


def _id_similarity(aligned_path: Path, recon) -> float | None:
    """dlib face-embedding cosine similarity of reconstruction vs aligned input, None without a face."""
    from PIL import Image

    from pti.engine.align import identity_similarity
    from pti.engine.images import to_uint8

    try:
        return identity_similarity(Image.open(aligned_path).convert("RGB"), Image.fromarray(to_uint8(recon[0])))
    except Exception:  # noqa: BLE001  a report metric must never sink a finished run
        return None


def _contact_sheet(res: PhotoResult, path: Path) -> Path:
    """input | aligned | pivot | reconstruction, labelled, one row a person can open."""
    from PIL import Image

    from pti.engine.images import labelled_sheet
    from pti.engine.photo import load_photo

    aligned = Image.open(res.files["aligned"]).convert("RGB")
    tiles = [("input", load_photo(res.photo)), ("aligned", aligned),
             ("pivot (before tuning)", Image.open(res.files["pivot"])), ("reconstruction (after)", Image.open(res.files["reconstruction"]))]
    return _save(labelled_sheet([tiles], size=max(aligned.size[0], 256)), path)
