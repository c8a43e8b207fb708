"""`pti.tune(...)`: the whole pipeline as a function (align, invert, tune, write), printing nothing.

The CLI's `pti tune` is this function plus a progress bar. Every file is written atomically; if the
run is interrupted, `TuneInterrupted.kept` lists the files that were completely written before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pti.batch import tune_many
from pti.batch.manifest import Manifest, check_identity_slots
from pti.engine.config import ProgressFn, resolve_impl
from pti.engine.device import resolve_device
from pti.engine.invert import InvertConfig
from pti.engine.photo import expand_photo_paths, unique_stems
from pti.engine.tune import TuneConfig
from pti.engine.tune import tune as tune_generator
from pti.clip import DEFAULT_SMOOTH, is_video
from pti.errors import ImageError, Interrupted, PTIError
from pti.fsutil import ensure_writable_dir, mark, sha256_file, written_since
from pti.engine.pivots import read_pivot
from pti.engine.weights import default_registry
from pti.pipeline import DEFAULT_ENCODERS, INIT_KINDS, PhotoResult, Pipeline, RunConfig, Weights


class TuneInterrupted(Interrupted):
    """Ctrl-C during `tune`: nothing partial was written; `kept` lists the complete files."""


def tune(
    photos: Sequence[str | Path],
    network: str | Path | None = None,  # checkpoint path; None = the built-in tiny generator
    out: str | Path = "pti-out",  # output directory
    *,
    device: str = "auto",
    align: bool = True,  # False: photos are already aligned crops (--no-align)
    face: int | None = None,  # which face when a photo has several (largest = 0)
    joint: bool = False,  # tune one generator for all photos (multi-ID PTI)
    invert_cfg: InvertConfig | None = None,  # the inversion: steps, space, seed, precision, impl (auto|ref|...);
    # None = the paper's 450 projector steps, or 0 (the start as given) after an encoder or a file
    init: str = "projector",  # where the pivot starts: projector | e4e | restyle | file (pti.pipeline)
    init_path: str | Path | None = None,  # the pivot file (init "file"), or the encoder checkpoint (None = the
    # registry's e4e-ffhq / restyle-e4e-ffhq)
    restyle_iterations: int = 5,  # ReStyle's refinement iterations (init "restyle")
    tune_cfg: TuneConfig = TuneConfig(),  # the tuning: steps, locality, seed, precision, impl
    exact: bool = False,  # store exact fp32 weights instead of fp16 deltas
    allow_fallback: bool = True,  # weight-free losses when the official weights are absent
    progress: ProgressFn | None = None,
    registry=None,  # weights registry (default: the user's cache)
    threads: str | int | None = None,  # CPU threads: None = torch's as set, "auto" = pti's policy, N
    workers: int = 1,  # photos in parallel processes (single-ID runs)
    ray: str | None = None,  # "auto" or a Ray cluster address: one task per photo (pti[ray])
    force: bool = False,  # redo photos the manifest says are done; allow other settings
) -> list[PhotoResult]:
    """Align, invert and tune each photo (or all jointly); write `<out>/<name>.pti` and a folder per photo.

    Single-ID runs (the default) go through `pti.batch`: `<out>/manifest.jsonl` records every photo, a
    photo that fails is recorded and the rest go on, a re-run skips what is done, and `<out>/summary.csv`
    has one row per photo. The result has one entry per photo, failures included (`status`, `error`).
    Joint runs tune one generator for all photos, so any bad photo stops them before tuning.

    `init` "e4e"/"restyle" starts each pivot from the encoder's W+ codes (loaded once per process), "file" from
    `init_path` (one pivot file, so one photo); `invert_cfg.steps` projector steps then refine it."""
    out = Path(out)
    if invert_cfg is None:
        invert_cfg = InvertConfig() if init == "projector" else InvertConfig(steps=0)
    dev = resolve_device(device)  # a device that is not there fails first
    for cfg in (invert_cfg, tune_cfg):
        resolve_impl(cfg.impl, dev)  # then an implementation it cannot run (triton without CUDA)
    if network is not None and Path(network).is_file():
        network = str(Path(network).resolve())  # the identity records it: `pti render` works from any folder
    videos = [p for p in photos if is_video(p)]
    if videos:
        raise PTIError(f"{videos[0]} is a video: tune it with pti.tune_clip (pti tune clip.mp4 on the command line)")
    paths = expand_photo_paths(list(photos))
    if not paths:
        raise PTIError("no photos given")
    if workers < 1:
        raise PTIError(f"workers must be 1 or more, not {workers}")
    if joint and (workers > 1 or ray):
        raise PTIError("--joint tunes one generator for all photos in one process; it cannot use --workers or --ray")
    init_path, init_sha256 = _init_file(init, init_path, len(paths), registry)
    config = RunConfig(
        network=str(network) if network is not None else None,
        device=str(device),
        align=align,
        face=face,
        invert_cfg=invert_cfg,
        tune_cfg=tune_cfg,
        exact=exact,
        allow_fallback=allow_fallback,
        threads=threads,
        weights=Weights.of(registry),
        init=init,
        init_path=init_path,
        init_sha256=init_sha256,
        restyle_iterations=restyle_iterations,
    )
    start = mark()
    try:
        pipeline = Pipeline.build(config, out, progress=progress, device=dev)
        if init == "file":  # the file fits this generator, before any work
            read_pivot(init_path, pipeline.G.num_ws, pipeline.G.w_dim)
        ensure_writable_dir(out)  # inputs first, then the output: a mistyped network creates no folder
        names = unique_stems(paths)
        if not joint:
            return tune_many(pipeline, paths, names, workers=workers, ray=ray, force=force)
        return _tune_joint(pipeline, paths, names, force)
    except KeyboardInterrupt:
        raise TuneInterrupted(written_since(start)) from None


def tune_clip(
    clip: str | Path,
    network: str | Path | None = None,
    out: str | Path = "pti-out",
    *,
    frames: str | None = None,  # "A-B" (inclusive), "A-", "A"; None = every frame
    every: int = 1,  # every N-th frame of that range
    smooth: float = DEFAULT_SMOOTH,  # sigma of the temporal smoothing of the landmarks, in frames (0 = off)
    device: str = "auto",
    face: int | None = None,  # which face to follow in the first frame with faces (0 = the largest)
    invert_cfg: InvertConfig | None = None,  # None: 450 projector steps, or 0 after an encoder
    init: str = "projector",  # projector | e4e | restyle (a clip's frames each need their own start)
    init_path: str | Path | None = None,  # the encoder checkpoint (None = the registry's default)
    restyle_iterations: int = 5,
    tune_cfg: TuneConfig | None = None,  # None: the clip defaults (pti.clip.CLIP_TUNE)
    exact: bool = False,
    allow_fallback: bool = True,
    progress: ProgressFn | None = None,
    registry=None,
    threads: str | int | None = None,
    workers: int = 1,  # processes for the per-frame stages (detection, alignment, inversion)
    force: bool = False,  # replace an identity in `out` of the same name tuned from another photo or clip
):
    """Track, smooth, align and invert every chosen frame of `clip`, tune one generator on all of them, and write
    `<out>/<name>.pti` holding every frame's pivot and cut (`pti.clip`). A re-run with the same settings reuses
    every stage's finished files; Ctrl-C raises `TuneInterrupted` listing them."""
    from pti.clip import CLIP_TUNE, ClipOptions, tune_clip as run_clip  # noqa: PLC0415

    out, clip = Path(out), Path(clip)
    from pti.engine.video import parse_frames  # noqa: PLC0415

    try:
        options = ClipOptions(frames=frames, every=every, smooth=smooth)  # nonsense fails before any work
        parse_frames(frames)
    except ValueError as e:
        raise PTIError(str(e)) from None
    if not clip.is_file():
        raise ImageError(f"video not found: {clip}" if not clip.exists() else f"{clip} is not a file")
    if workers < 1:
        raise PTIError(f"workers must be 1 or more, not {workers}")
    if init == "file":
        raise PTIError("a clip needs a start per frame: --init projector, e4e or restyle, not a pivot file")
    if invert_cfg is None:
        invert_cfg = InvertConfig() if init == "projector" else InvertConfig(steps=0)
    tune_cfg = tune_cfg if tune_cfg is not None else TuneConfig(**CLIP_TUNE)
    dev = resolve_device(device)
    for cfg in (invert_cfg, tune_cfg):
        resolve_impl(cfg.impl, dev)
    if network is not None and Path(network).is_file():
        network = str(Path(network).resolve())
    init_path, init_sha256 = _init_file(init, init_path, 1, registry)
    config = RunConfig(
        network=str(network) if network is not None else None,
        device=str(device),
        face=face,
        invert_cfg=invert_cfg,
        tune_cfg=tune_cfg,
        exact=exact,
        allow_fallback=allow_fallback,
        threads=threads,
        weights=Weights.of(registry),
        init=init,
        init_path=init_path,
        init_sha256=init_sha256,
        restyle_iterations=restyle_iterations,
    )
    start = mark()
    try:
        from pti.engine.video import probe  # noqa: PLC0415  needs imageio-ffmpeg: a missing extra fails first

        probe(clip)  # not a video: one line, before the generator loads
        name = clip.stem or "clip"
        if not force:  # an identity of that name from another photo or clip is not replaced
            check_identity_slots(out, [(clip.resolve(), name, sha256_file(clip))], Manifest(out))
        pipeline = Pipeline.build(config, out, progress=progress, device=dev)
        ensure_writable_dir(out)
        return run_clip(pipeline, clip, name, options, workers=workers)
    except KeyboardInterrupt:
        raise TuneInterrupted(written_since(start)) from None


def _init_file(init: str, path, photos: int, registry) -> tuple[str | None, str | None]:
    """(the absolute path of the init's file, its sha256), checked: a pivot file exists and there is one photo;
    an encoder is the given checkpoint or the registry's default (offline: the `pti weights import` hint)."""
    if init not in INIT_KINDS:
        raise PTIError(f"init must be one of {', '.join(INIT_KINDS)}, not {init!r}")
    if init == "projector":
        if path is not None:
            raise PTIError("init_path is for init 'file' or an encoder, not the projector")
        return None, None
    if init == "file":
        if path is None:
            raise PTIError("init 'file' needs init_path: the pivot file")
        if photos > 1:
            raise PTIError(
                f"--init {path}: one pivot file is one photo's pivot, and {photos} photos were given; "
                "tune them one at a time, or start them from an encoder (--init e4e)"
            )
    if path is None:
        reg = registry if registry is not None else default_registry()
        name = DEFAULT_ENCODERS[init]
        resolved = reg.resolve(name)
        rec = reg.record(name)
        return str(resolved.resolve()), rec.sha256 if rec is not None else sha256_file(resolved)
    path = Path(path)
    if not path.is_file():
        what = "pivot file" if init == "file" else f"{init} encoder checkpoint"
        raise PTIError(f"{path}: no such {what}" if not path.exists() else f"{path} is not a file")
    return str(path.resolve()), sha256_file(path)


def _tune_joint(pipeline: Pipeline, paths: list[Path], names: list[str], force: bool) -> list[PhotoResult]:
    """The paper's multi-ID PTI: every photo aligned first (bad input fails before anything is written), then
    every pivot, then one generator tuned for all of them."""
    if not force:
        slots = [(p, n, sha256_file(p)) for p, n in zip(paths, names)]
        check_identity_slots(pipeline.out, slots, Manifest(pipeline.out))
    results = [pipeline.align(path, name, save=False) for path, name in zip(paths, names)]
    for res in results:
        pipeline.save_aligned(res)
        pipeline.invert(res)
    tuned = tune_generator(
        pipeline.G,
        [r.target for r in results],
        [r.pivot for r in results],
        pipeline.losses.perceptual,
        pipeline.config.tune_cfg,
        pipeline.progress,
    )
    for res in results:
        pipeline.finish(res, tuned, [r.name for r in results if r is not res])
    return results
