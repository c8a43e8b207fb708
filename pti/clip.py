"""A clip through PTI: `pti tune clip.mp4` and `pti render clip.pti`. Beside `pti.pipeline`, on its steps.

Tuning a clip, stage by stage (each stage's files are written once, atomically, and reused by a re-run with
the same settings, so Ctrl-C keeps what is finished and a long clip resumes where it stopped):

1. track: decode the chosen frames (`--frames A-B`, `--every N`) one at a time, find the faces in each, and
   follow one person: the largest face in the first frame that has one, then the face nearest the last one
   (`pti.engine.video.Tracker`). Frames where the face is lost are skipped with a note: they are not tuned,
   and a pasted render keeps the original frame there. `<name>/track-<key>.npz` holds the raw landmarks.
2. smooth: the landmarks filtered with a Gaussian over time (`--smooth` sigma, in frames), so the crop does not
   jitter; the FFHQ quads come from the smoothed landmarks (`pti.engine.video.smooth_landmarks`).
3. align: each frame cut by its smoothed quad (`pti.engine.align.align_face`): `<name>/aligned-<key>/<i>.png`.
4. invert: a pivot per frame (the projector, or an encoder with `--init e4e`; much faster for clips), each
   `<name>/pivots-<key>/<i>.npy`.
5. tune: one generator for all frames (the joint tuning, `pti.engine.tune`), with the clip defaults
   `CLIP_TUNE` (STIT's learning rate, fewer passes); the frames are held as uint8 (a quarter of float32).
6. write: one identity `<name>.pti` with every frame's pivot, quad and landmarks and the shared weights
   (`pti.engine.identity`, format v3), and `<name>/report.json`.

Keys name what a stage's files depend on (the clip's sha256, the frames, the crop size, the smoothing; for
pivots also the generator and the inversion), so a re-run with other settings computes anew instead of reusing.

Rendering a clip (`render_clip`): every frame's pivot with the edits applied (a sweep runs over the clip's
time, in N steps), through the same render backends as photos, in batches; with `paste`, each crop pasted into
its decoded source frame with the smoothed masks; written as `frames/<i>.png`, an MP4 at the source's frame rate
(divided by `--every`) with the source's audio for that span, and `render.json`. Frames already rendered with
the same identity, edits and paste are reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from pti.engine import edits as E
from pti.engine.align import align_face, detect_faces, face_quad
from pti.engine.identity import Identity, versions
from pti.engine.images import from_uint8, save_png, to_uint8
from pti.engine.tune import tune as tune_generator
from pti.errors import FaceNotFoundError, PTIError
from pti.fsutil import atomic_path, sha256_file, write_json

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm"})
# A clip's tuning defaults (pti tune clip.mp4): STIT's learning rate (3e-5, ten times below a photo's), and
# 50 passes over all frames (STIT's configured default; every pass is one step per frame, so F frames take
# 50 F steps: already 2500 for 50 frames). Locality stays on, as in PTI's own recipe.
CLIP_TUNE = {"lr": 3e-5, "max_steps": 50}
# Sigma of the temporal Gaussian over the landmarks, in frames of the chosen sequence: on the synthetic clip
# (tests/videoclip.py, 36 frames) 1.5 took the quads' error from the true motion from 0.81 to 0.58 px and
# their jitter from 1.53 to 0.19 px (the motion's own: 0.18); sigma 2 and 3 lag the motion (0.62, 0.88 px).
DEFAULT_SMOOTH = 1.5
HOLD_BYTES = 2 << 30  # frames held in memory for tuning up to this size; beyond it, read back per step


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class ClipOptions:
    """How the frames are chosen and smoothed (`pti tune clip.mp4 --frames --every --smooth`)."""

    frames: str | None = None  # "A-B" (inclusive), "A-", "A"; None = all
    every: int = 1  # every N-th frame of that range
    smooth: float = DEFAULT_SMOOTH  # the temporal Gaussian's sigma, in frames (0: raw landmarks)

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be a whole number >= 1, not {self.every!r}")
        if not (isinstance(self.smooth, (int, float)) and self.smooth >= 0):
            raise ValueError(f"smooth (sigma in frames) must be >= 0, not {self.smooth!r}")


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ClipLayout:
    """A clip's files: `<out>/<name>.pti` and the folder `<out>/<name>/` with every stage's files."""

    out: Path
    name: str

    @property
    def identity(self) -> Path:
        return self.out / f"{self.name}.pti"

    @property
    def folder(self) -> Path:
        return self.out / self.name

    def track(self, key: str) -> Path:
        return self.folder / f"track-{key}.npz"

    def aligned(self, key: str, index: int) -> Path:
        return self.folder / f"aligned-{key}" / f"{index:06d}.png"

    def pivot(self, key: str, index: int) -> Path:
        return self.folder / f"pivots-{key}" / f"{index:06d}.npy"

    @property
    def report(self) -> Path:
        return self.folder / "report.json"

    @property
    def contact(self) -> Path:
        return self.folder / "contact.png"


@dataclass
class ClipResult:
    clip: Path
    name: str
    identity: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    reused: dict[str, int] = field(default_factory=dict)  # per stage: frames whose files a re-run reused


def _log(progress, phase: str, step: int, total: int, **values) -> None:
    if progress is not None:
        progress(phase, step, total, values)


# ---------------------------------------------------------------------------- tuning


def tune_clip(pipeline, clip: Path, name: str, options: ClipOptions = ClipOptions(), workers: int = 1) -> ClipResult:
    """Stages 1-6 of the module's docstring for `clip`, on the generator and losses of `pipeline`. `workers` > 1
    splits the per-frame stages (detection, alignment, inversion) between that many spawned processes
    (`_in_workers`); tracking and tuning stay in this one."""
    from pti.engine import video as V  # noqa: PLC0415  needs imageio-ffmpeg (pti[video])

    t0 = time.perf_counter()
    cfg, progress = pipeline.config, pipeline.progress
    if not cfg.align:
        raise PTIError("a clip's frames are aligned frame by frame: --no-align is for photos")
    layout = ClipLayout(pipeline.out, name)
    res = ClipResult(clip, name)
    info = V.probe(clip)
    selection = V.select(info.frames, V.parse_frames(options.frames), options.every, name=str(clip))
    indices = selection.indices
    res.warnings += [selection.note] if selection.note else []
    clip_sha = sha256_file(clip)
    size = pipeline.G.img_resolution
    seconds: dict[str, float] = {}

    # 1. track
    t = time.perf_counter()
    track_key = _key("track", clip_sha, indices, cfg.face)
    raw, present = _track(V, clip, indices, layout.track(track_key), cfg.face, progress, res, workers)
    seconds["track"] = time.perf_counter() - t
    if not present.any():
        raise FaceNotFoundError(f"no face found in {clip} ({len(indices)} frames looked at)")
    lost = [i for i, p in zip(indices, present) if not p]
    if lost:
        res.warnings.append(
            f"{clip}: the face was lost in {len(lost)} of {len(indices)} frames ({_spans(lost)}); they are not "
            "tuned, and a pasted render keeps the original frame there"
        )

    # 2. smooth
    smoothed = V.smooth_landmarks(raw, options.smooth, present)
    kept = [k for k in range(len(indices)) if present[k]]
    quads = np.stack([face_quad(smoothed[k])[0] for k in kept])
    kept_indices = [indices[k] for k in kept]

    # 3. align
    t = time.perf_counter()
    align_key = _key("align", clip_sha, kept_indices, size, options.smooth, track_key)
    _align_frames(V, clip, kept_indices, smoothed[kept], size, layout, align_key, progress, res, workers)
    seconds["align"] = time.perf_counter() - t

    # 4. invert
    t = time.perf_counter()
    pivot_key = _key(
        "invert",
        align_key,
        pipeline.base_hash,
        asdict(cfg.invert_cfg),
        cfg.init,
        cfg.init_sha256,
        cfg.restyle_iterations,
        pipeline.losses.names,
    )
    todo = [i for i in kept_indices if not layout.pivot(pivot_key, i).is_file()]
    reused = len(kept_indices) - len(todo)
    jobs = [(layout.aligned(align_key, i), layout.pivot(pivot_key, i), f"{name}:{i}") for i in todo]
    if workers > 1 and len(jobs) > 1:
        before = _in_workers(
            _invert_frames, jobs, workers, progress, "invert frames", reused, len(kept_indices), pipeline=pipeline
        )
    else:
        before = []
        for n, job in enumerate(jobs):
            before += _invert_frames(pipeline, [job])
            _log(progress, "invert frames", reused + n + 1, len(kept_indices))
    pivots = [
        torch.from_numpy(np.load(layout.pivot(pivot_key, i), allow_pickle=False))[None].to(pipeline.device)
        for i in kept_indices
    ]
    res.reused["invert"] = reused
    seconds["invert"] = time.perf_counter() - t

    # 5. tune (an identity a run with the same stages and tuning wrote is kept as it is)
    tune_key = _key("tune", pivot_key, asdict(cfg.tune_cfg), cfg.exact, pipeline.base_hash)
    earlier = _tuned_before(layout, tune_key)
    if earlier is not None:
        res.identity, res.report = layout.identity, earlier
        res.files["report"] = layout.report
        res.reused["tune"] = 1
        res.report["reused"] = res.reused
        return res
    targets = _Targets([layout.aligned(align_key, i) for i in kept_indices], size)
    tuned = tune_generator(pipeline.G, targets, pivots, pipeline.losses.perceptual, cfg.tune_cfg, progress)
    seconds["tune"] = tuned.seconds

    # 6. write
    after = _frame_metrics(pipeline, tuned.G, pivots, targets)
    report = {
        "clip": str(clip),
        "clip_path": str(clip.resolve()),
        "clip_sha256": clip_sha,
        "video": {
            "fps": info.fps,
            "size": [info.width, info.height],
            "frames_in_clip": info.frames,
            "frames": options.frames,
            "every": options.every,
            "smooth_sigma": options.smooth,
            "selected": len(indices),
            "tuned": len(kept_indices),
            "lost": lost,
            "has_audio": info.has_audio,
        },
        "alignment": {
            "aligned": True,
            "clip": True,
            "photo_size": [info.width, info.height],
            "photo_sha256": clip_sha,
            "output_size": size,
            "face": cfg.face,
        },
        "seconds": seconds,
        "steps": {"invert": cfg.invert_cfg.steps, "tune": tuned.steps},
        "reused": res.reused,
        "network": cfg.base_hint,
        "device": str(pipeline.device),
        "precision": cfg.tune_cfg.precision,
        "losses": pipeline.losses.names,
        "official_losses": pipeline.losses.official,
        "invert_config": asdict(cfg.invert_cfg),
        "tune_config": asdict(cfg.tune_cfg),
        "init": {
            "init": cfg.init,
            "path": cfg.init_path,
            "sha256": cfg.init_sha256,
            "refine_steps": cfg.invert_cfg.steps,
        },
        "impl": {"tune": tuned.impl},
        "before_tuning": _mean(before) if before else None,  # over the frames inverted in this run
        "after_tuning": _mean(after),  # means over the frames, as a photo's report has them
        "after_tuning_worst": _worst(after),
        "curves": {f"tune_{k}": v for k, v in tuned.curves.items()},
        "versions": versions(),
    }
    report["stages"] = {"track": track_key, "align": align_key, "invert": pivot_key, "tune": tune_key}
    meta = {k: v for k, v in report.items() if k not in ("reused",)}
    meta["photo"], meta["photo_path"], meta["photo_sha256"] = report["clip"], report["clip_path"], clip_sha
    ident = Identity.from_tuning(
        pipeline.G, tuned.G, pivots[0], pipeline.base_hash, cfg.base_hint, exact=cfg.exact, meta=meta
    )
    ident.frames = {
        "pivots": torch.cat([p.reshape(1, *p.shape[-2:]) for p in pivots]).float().cpu().contiguous(),
        "quad": torch.from_numpy(quads.astype(np.float64)),
        "landmarks": torch.from_numpy(smoothed[kept].astype(np.float64)),
        "index": torch.tensor(kept_indices, dtype=torch.int64),
    }
    res.identity = ident.save(layout.identity)
    seconds["total"] = time.perf_counter() - t0
    report["identity_file"] = {"path": str(res.identity), "bytes": res.identity.stat().st_size}
    res.report = report
    res.files["report"] = write_json(report, layout.report)
    return res


def _tuned_before(layout: ClipLayout, tune_key: str) -> dict | None:
    """The report of the identity a run with the same stages and tuning wrote (its metadata's stage key), or None."""
    if not (layout.identity.is_file() and layout.report.is_file()):
        return None
    try:
        ident = Identity.load(layout.identity)
        report = json.loads(layout.report.read_text())
    except (PTIError, OSError, ValueError):
        return None  # damaged or unreadable: tuned again
    if (ident.meta.get("stages") or {}).get("tune") != tune_key or (report.get("stages") or {}).get("tune") != tune_key:
        return None
    return report


def _track(V, clip: Path, indices, path: Path, face: int | None, progress, res: ClipResult, workers: int = 1):
    """(raw landmarks [F, 68, 2] (NaN where lost), present [F]) of the tracked person, read from `path` when a
    run with the same clip and frames wrote it. Detection runs in `workers` processes; tracking, which follows
    the frames in order, here."""
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            res.reused["track"] = len(indices)
            return f["landmarks"], f["present"]
    if workers > 1 and len(indices) > 1:
        chunks = _chunks(indices, 2 * workers)  # each worker decodes from the clip's start to its chunk's end
        found = _in_workers(
            _detect_frames, [(clip, c) for c in chunks], workers, progress, "track faces", 0, len(chunks)
        )
        detections = iter(found)
    else:
        detections = (detect_faces(Image.fromarray(frame)) for _, frame in V.iter_frames(clip, indices))
    tracker = V.Tracker(face=face or 0)
    raw = np.full((len(indices), 68, 2), np.nan)
    present = np.zeros(len(indices), dtype=bool)
    for n, (index, faces) in enumerate(zip(indices, detections)):
        try:
            chosen = tracker.step(faces)
        except IndexError as e:  # --face N past the faces of the first frame that has any
            raise FaceNotFoundError(f"{clip}, frame {index}: {e} (--face counts from 0, the largest)") from None
        if chosen is not None:
            raw[n], present[n] = chosen.landmarks, True
        if workers <= 1:
            _log(progress, "track faces", n + 1, len(indices), frame=index)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, landmarks=raw, present=present, indices=np.asarray(indices))
    return raw, present


def _align_frames(
    V, clip, indices, landmarks, size, layout: ClipLayout, key: str, progress, res: ClipResult, workers: int = 1
) -> None:
    """Each frame's crop by its smoothed landmarks, written once (frames already cut with `key` are kept)."""
    todo = [(i, landmarks[k], layout.aligned(key, i)) for k, i in enumerate(indices)]
    todo = [t for t in todo if not t[2].is_file()]
    res.reused["align"] = len(indices) - len(todo)
    if workers > 1 and len(todo) > 1:
        chunks = _chunks(todo, 2 * workers)
        jobs = [(clip, chunk, size) for chunk in chunks]
        _in_workers(_align_chunk, jobs, workers, progress, "align frames", 0, len(jobs))
        return
    done = res.reused["align"]
    for path in _align_chunk(clip, todo, size, V):
        done += 1
        _log(progress, "align frames", done, len(indices), frame=path.stem)


def _align_chunk(clip, todo, size: int, V=None) -> list[Path]:
    """Cut frames (index, landmarks, path) of `clip` to `size` and write each PNG atomically; the paths."""
    if V is None:
        from pti.engine import video as V  # noqa: PLC0415, N811  in a worker process
    wanted = {i: (lm, path) for i, lm, path in todo}
    written = []
    for index, frame in V.iter_frames(clip, sorted(wanted)):
        lm, path = wanted[index]
        crop = align_face(Image.fromarray(frame), lm, size)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".png") as tmp:
            crop.save(tmp, format="PNG")
        written.append(path)
    return written


def _detect_frames(clip, indices) -> list[list]:
    """Every face of each of `indices` of `clip` (`detect_faces`), in a worker process."""
    from pti.engine import video as V  # noqa: PLC0415, N812

    return [detect_faces(Image.fromarray(frame)) for _, frame in V.iter_frames(clip, indices)]


def _invert_frames(pipeline, jobs) -> list[dict]:
    """Each job (aligned PNG, pivot path, name) inverted (`Pipeline.invert`) and its pivot written atomically as
    float32 [num_ws, w_dim] .npy; the pivots' metrics before tuning."""
    from pti.pipeline import PhotoResult  # noqa: PLC0415  the per-frame steps reuse the photo pipeline's

    metrics = []
    for aligned_path, pivot_path, name in jobs:
        aligned = Image.open(aligned_path).convert("RGB")
        frame = PhotoResult(photo=aligned_path, name=name, aligned=aligned)
        frame.target = from_uint8(np.asarray(aligned), pipeline.device)
        frame.report = {"seconds": {}}
        pipeline.invert(frame, save=False)
        pivot_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(pivot_path, suffix=".npy") as tmp:
            np.save(tmp, frame.pivot[0].detach().float().cpu().numpy(), allow_pickle=False)
        metrics.append(frame.report["before_tuning"])
    return metrics


def _chunks(items: list, n: int) -> list[list]:
    """`items` in at most `n` contiguous chunks of nearly equal size."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for k in range(n):
        end = start + size + (k < extra)
        out.append(items[start:end])
        start = end
    return out


# ---------------------------------------------------------------------------- worker processes

_WORKER: dict[str, Any] = {}


def _worker_init(config, out: Path, workers: int) -> None:
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from pti.signals import install  # noqa: PLC0415

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the driver decides
    install([signal.SIGTERM])  # SIGTERM from the driver: atomic writes clean up on the way out
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _WORKER.update(config=config, out=out, workers=workers)


def _worker_task(fn, job):
    """`fn(*job)`, or for the inversion `fn(pipeline, [job])` on this process's pipeline (built on first use)."""
    if fn is _invert_frames:
        if "pipeline" not in _WORKER:
            from pti.pipeline import Pipeline  # noqa: PLC0415

            _WORKER["pipeline"] = Pipeline.build(_WORKER["config"], _WORKER["out"], workers=_WORKER["workers"])
        return fn(_WORKER["pipeline"], [job])
    return fn(*job)


def _in_workers(fn, jobs: list, workers: int, progress, phase: str, done: int, total: int, pipeline=None) -> list:
    """`fn` over `jobs` in `workers` spawned processes; the results in the order of `jobs` (each flattened one
    level for the inversion's lists). Progress after each job; Ctrl-C stops the workers (their atomic writes
    clean up) and what they finished stays on disk for the next run."""
    import multiprocessing  # noqa: PLC0415
    from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: PLC0415

    config = pipeline.config if pipeline is not None else None
    out = pipeline.out if pipeline is not None else None
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        min(workers, len(jobs)), mp_context=context, initializer=_worker_init, initargs=(config, out, workers)
    )
    results: list = [None] * len(jobs)
    try:
        futures = {pool.submit(_worker_task, fn, job): k for k, job in enumerate(jobs)}
        for n, f in enumerate(as_completed(futures)):
            results[futures[f]] = f.result()
            _log(progress, phase, done + n + 1, total)
    except BaseException:
        for p in list(getattr(pool, "_processes", {}).values()):  # no public API lists them
            if p.is_alive():
                p.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if fn is _invert_frames:
        return [m for r in results for m in r]
    if fn is _detect_frames:
        return [faces for r in results for faces in r]
    return results


class _Targets(Sequence):
    """The aligned frames as uint8 [1, 3, R, R] tensors (see `pti.engine.tune.tune`): held in memory up to
    HOLD_BYTES, else read back from their PNGs each time their step comes (bounded memory for long clips)."""

    def __init__(self, paths: list[Path], size: int):
        self.paths = paths
        self.hold = len(paths) * 3 * size * size <= HOLD_BYTES
        self._held = [self._read(p) for p in paths] if self.hold else None

    @staticmethod
    def _read(path: Path) -> torch.Tensor:
        arr = np.array(Image.open(path).convert("RGB"))
        return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        return self._held[k] if self._held is not None else self._read(self.paths[k])


@torch.no_grad()
def _frame_metrics(pipeline, G, pivots, targets) -> list[dict]:
    """Each frame's reconstruction metrics, under the names a photo's report uses (`Pipeline.metrics`)."""
    out = []
    for pivot, target in zip(pivots, targets):
        img = G.synthesis(pivot, noise_mode="const", force_fp32=True)
        out.append(pipeline.metrics(img, target.to(pipeline.device).float() / 127.5 - 1))
    return out


def _mean(metrics: list[dict]) -> dict:
    """Per metric: the mean over frames."""
    return {k: float(np.mean([m[k] for m in metrics])) for k in (metrics[0] if metrics else ())}


def _worst(metrics: list[dict]) -> dict:
    """Per metric: the worst frame's value (the lowest MS-SSIM, the highest distance)."""
    return {k: float((min if k == "ms_ssim" else max)(m[k] for m in metrics)) for k in (metrics[0] if metrics else ())}


def _spans(indices: list[int]) -> str:
    """1, 2, 3, 7 -> "1-3, 7" (at most 6 spans, then how many more)."""
    spans, start = [], None
    for a, b in zip([None, *indices], [*indices, None]):
        if start is None:
            start = b
        elif b is None or b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    text = ", ".join(spans[:6])
    return text + (f" and {len(spans) - 6} more" if len(spans) > 6 else "")


# ---------------------------------------------------------------------------- rendering


def clip_frames(ident, specs, directions) -> tuple[list[str], torch.Tensor, list[dict]]:
    """(labels, ws [F, num_ws, w_dim], values per frame): every frame's pivot with the edits; a sweep runs over the
    clip's time in its N steps (frame t of F takes step floor(t N / F))."""
    pivots = ident.frames["pivots"]
    count = pivots.shape[0]
    ws, values = [], []
    for t in range(count):
        frames = E.frames(pivots[t], specs, directions)
        k = min(len(frames) - 1, t * len(frames) // count)
        ws.append(frames[k].ws)
        values.append(frames[k].values)
    label = "_".join(s.label(s.values[0]) if not s.sweep else s.label(s.values[0]) + "~" for s in specs)
    return [label or "reconstruction"] * count, torch.stack(ws), values


@dataclass(frozen=True)
class ClipRenderPlan:
    """What `render_clip` writes for each output frame: (source frame index, tuned position or None if lost)."""

    frames: list[tuple[int, int | None]]
    fps: float


def plan(ident, paste: bool) -> ClipRenderPlan:
    """The output frames: every tuned frame; with `paste` also the frames where the face was lost (kept as they
    were), in order."""
    video = ident.meta.get("video") or {}
    tuned = [int(i) for i in ident.frames["index"].tolist()]
    lost = [int(i) for i in video.get("lost", [])] if paste else []
    pos = {i: k for k, i in enumerate(tuned)}
    frames = sorted([(i, pos[i]) for i in tuned] + [(i, None) for i in lost])
    fps = float(video.get("fps") or 25.0) / int(video.get("every") or 1)
    return ClipRenderPlan(frames, fps)


def render_clip(
    result,
    ident,
    runner,
    ws: torch.Tensor,
    batch: int,
    source_clip: Path | None,
    audio_clip: Path | None,
    progress,
    stitch=None,
    how: str = "",
) -> None:
    """Render every frame of a clip identity (`ws` [F, ...] in tuned order) through `runner`, `batch` frames at a
    time, paste each into its source frame when `source_clip` is given, and write frames/, the MP4 and the report's
    clip part into `result` (a `pti.rendering.RenderResult`). Frames rendered before with the same identity, ws
    and paste are read back, not rendered again. `audio_clip`: the source clip whose audio the MP4 takes (for the
    span the frames cover), when the frames are the clip's without gaps. `stitch` (a
    `pti.engine.stitch.StitchConfig`, with `source_clip` and the torch backend): each pasted frame is rendered by
    a copy of the generator stitching-tuned to its frame first. Pasted frames go to frames/, crops to crops/.
    `how` names the backend, precision and implementation: with the identity, the ws, paste and stitching it
    makes the key a re-run must match to reuse a frame (`.done.json` in the frames' folder holds the key and the
    frames finished under it; another key starts the folder's frames afresh)."""
    from pti.engine import video as V  # noqa: PLC0415  needs imageio-ffmpeg (pti[video])
    from pti.engine.paste import paste  # noqa: PLC0415

    out, todo = result.out, plan(ident, source_clip is not None)
    frames_dir = out / ("frames" if source_clip is not None else "crops")
    frames_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(ws.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(f"{result.report.get('identity_checksum')}|{source_clip is not None}|{stitch}|{how}".encode())
    key = digest.hexdigest()
    done_file = frames_dir / ".done.json"
    done = _done_frames(done_file, key)
    paths = [frames_dir / f"{index:06d}.png" for index, _ in todo.frames]
    fresh = [(i, k) for (i, k), p in zip(todo.frames, paths) if not (i in done and p.is_file())]
    quads, landmarks = ident.frames["quad"].numpy(), ident.frames["landmarks"].numpy()
    decoder = V.iter_frames(source_clip, [i for i, _ in fresh]) if source_clip is not None else None
    t0, rendered, stitched = time.perf_counter(), 0, []
    to_stitch = sum(1 for _, k in fresh if k is not None) if stitch is not None else 0
    for start in range(0, len(fresh), batch):
        chunk = fresh[start : start + batch]
        need = [(i, k) for i, k in chunk if k is not None]
        crops = dict(zip([i for i, _ in need], to_uint8(runner.render(ws[[k for _, k in need]])))) if need else {}
        rendered += len(need)
        for i, k in chunk:
            if decoder is not None:
                src_index, src = next(decoder)
                if src_index != i:
                    raise PTIError(f"{source_clip}: decoding gave frame {src_index} where {i} was expected")
                if k is not None and stitch is not None:
                    crops[i], record = stitched_crop(
                        runner.G, ws[k : k + 1], src, crops[i], quads[k], landmarks[k], stitch
                    )
                    stitched.append(record)
                img = src if k is None else paste(src, crops[i], quads[k], landmarks[k]).image
            else:
                img = crops[i]
            save_png(img, frames_dir / f"{i:06d}.png")
            done.add(i)
            if progress is not None and stitched and k is not None:
                progress("stitch frames", len(stitched), to_stitch, {"band_mse": stitched[-1]["band_mse_after"]})
        with atomic_path(done_file) as tmp:  # what a re-run may reuse, after each batch
            tmp.write_text(json.dumps({"key": key, "frames": sorted(done)}))
        if progress is not None:
            progress("render frames", len(todo.frames) - len(fresh) + start + len(chunk), len(todo.frames), {})
    seconds = time.perf_counter() - t0
    video = ident.meta.get("video") or {}
    audio = {}
    steps = {b[0] - a[0] for a, b in zip(todo.frames, todo.frames[1:])}
    if audio_clip is not None and video.get("has_audio") and len(steps) <= 1:
        start, duration = V.audio_span([i for i, _ in todo.frames], float(video["fps"]))
        audio = {"audio_from": audio_clip, "audio_start_s": start, "audio_duration_s": duration}
    elif len(steps) > 1:
        lost = len(video.get("lost") or [])
        result.warnings.append(
            f"{lost} frames had no face, so the crops' MP4 leaves them out: it is shorter than the clip and has no "
            "sound (--paste keeps every frame, and the sound)"
        )
    video_path = out / ("pasted.mp4" if source_clip is not None else "crops.mp4")
    first = Image.open(paths[0])
    with V.VideoWriter(video_path, todo.fps, first.size, **audio) as writer:
        for path in paths:
            writer.write(np.asarray(Image.open(path).convert("RGB")))
    result.files["video"] = video_path
    result.files.update({f"frame {i}": p for (i, _), p in zip(todo.frames, paths)})
    result.report["clip"] = {
        "frames": len(paths),
        "rendered": rendered,
        "reused": len(paths) - len(fresh),
        "kept_original": sum(1 for _, k in todo.frames if k is None),
        "fps": todo.fps,
        "pasted": source_clip is not None,
        "audio": writer.audio,
        "seconds": seconds,
    }
    if stitch is not None:
        result.report["clip"]["stitch"] = {
            "config": asdict(stitch),
            "frames": len(stitched),
            "steps_mean": float(np.mean([r["steps"] for r in stitched])) if stitched else 0.0,
            "band_mse_before_mean": float(np.mean([r["band_mse_before"] for r in stitched])) if stitched else None,
            "band_mse_after_mean": float(np.mean([r["band_mse_after"] for r in stitched])) if stitched else None,
        }


def _done_frames(done_file: Path, key: str) -> set[int]:
    """The frames a render with `key` finished in this folder; none when the folder's frames were made otherwise
    (the record is dropped first, so a frame is never taken for one made with other edits or settings)."""
    try:
        rec = json.loads(done_file.read_text()) if done_file.is_file() else {}
    except (OSError, ValueError):
        rec = {}
    if isinstance(rec, dict) and rec.get("key") == key and isinstance(rec.get("frames"), list):
        return {int(i) for i in rec["frames"]}
    done_file.unlink(missing_ok=True)
    return set()


def stitched_crop(G, ws, frame: np.ndarray, crop: np.ndarray, quad, landmarks, cfg) -> tuple[np.ndarray, dict]:
    """`crop` (the edited render of `ws`) re-rendered by a copy of `G` stitching-tuned to `frame` (pti.engine.stitch):
    the band round the paste mask's edge pulled onto the frame's own crop, the face kept."""
    from pti.engine.stitch import crop_masks, stitch  # noqa: PLC0415

    size = crop.shape[0]
    original = from_uint8(np.asarray(align_face(Image.fromarray(frame), landmarks, size)))
    inner, band = crop_masks(landmarks, quad, size, band=cfg.band)
    img, record = stitch(G, ws, original, from_uint8(crop), inner, band, cfg)
    return to_uint8(img[0]), record
