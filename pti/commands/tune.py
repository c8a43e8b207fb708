"""`pti tune`: align, invert and tune photos; write one `.pti` identity file per person."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from pti.commands.common import (
    PRECISION_HELP,
    SEED_MAX,
    DeviceOption,
    Impl,
    NetworkOption,
    PhaseProgress,
    Precision,
    compile_line,
    console,
    help_text,
    impl_help,
    network_label,
    plural,
    thread_setting,
)


def _check_ray(value: str | None) -> str | None:
    import re

    if value is None or value == "auto" or re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", value):
        return value
    raise typer.BadParameter(f"{value!r}: give 'auto' or a cluster address HOST:PORT (or ray://HOST:PORT)")


def _check_finite(value: float) -> float:
    import math

    if not math.isfinite(value):  # click's range check lets NaN and (with no max) infinity through
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


class Space(str, Enum):
    w = "w"
    w_plus = "w+"


def tune(
    photos: Annotated[
        list[Path], typer.Argument(metavar="PHOTO", help="Photos (or folders of photos) of faces.", show_default=False)
    ],
    network: NetworkOption = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder: <name>.pti plus a <name>/ folder per photo.")
    ] = Path("pti-out"),
    joint: Annotated[
        bool, typer.Option("--joint", help="Tune one generator for all photos together (multi-ID PTI).")
    ] = False,
    no_locality: Annotated[
        bool,
        typer.Option(
            "--no-locality",
            help=(
                "Skip locality regularization: faster (the authors' repo default), but edits of the tuned identity "
                "degrade more."
            ),
        ),
    ] = False,
    exact: Annotated[
        bool, typer.Option("--exact", help="Store exact fp32 tuned weights instead of fp16 deltas (about 2x larger).")
    ] = False,
    no_align: Annotated[
        bool, typer.Option("--no-align", help="Photos are already aligned square face crops: only resize them.")
    ] = False,
    face: Annotated[
        Optional[int], typer.Option("--face", min=0, help="Which face when a photo has several (0 = largest).")
    ] = None,
    space: Annotated[
        Space, typer.Option("--space", help="Inversion space: w (the paper) or w+ (one w per layer).")
    ] = Space.w,
    invert_steps: Annotated[
        Optional[int],
        typer.Option(
            "--invert-steps",
            min=0,
            help=(
                "Projector steps: the inversion (default 450), or after an --init encoder or file the refine "
                "of its pivot (default 0: the start is the pivot)."
            ),
            show_default=False,
        ),
    ] = None,
    init: Annotated[
        str,
        typer.Option(
            "--init",
            metavar="projector|e4e|restyle|FILE",
            help=(
                "Where the pivot starts: the projector from the average w (the paper), an e4e or ReStyle-e4e "
                "encoder's W+ codes in one pass, or a pivot FILE you have (NVIDIA's projected_w.npz, a .npy, "
                "or a .pt of [1, 512], [18, 512] or [1, 18, 512] at 1024 px; one photo)."
            ),
        ),
    ] = "projector",
    encoder: Annotated[
        Optional[Path],
        typer.Option(
            "--encoder",
            help=(
                "The encoder checkpoint for --init e4e|restyle (e4e_ffhq_encode.pt, restyle_e4e_ffhq_encode.pt); "
                "default: the weights cache's e4e-ffhq / restyle-e4e-ffhq (pti weights)."
            ),
            show_default=False,
        ),
    ] = None,
    restyle_iters: Annotated[
        Optional[int],
        typer.Option(
            "--restyle-iters",
            min=1,
            max=1000,
            help="ReStyle's refinement iterations for --init restyle (default 5, its authors' inference default).",
            show_default=False,
        ),
    ] = None,
    tune_steps: Annotated[
        Optional[int],
        typer.Option(
            "--tune-steps",
            min=1,
            help=(
                "Maximum tuning steps (default 350), or passes over all photos with --joint or over all frames of "
                "a clip (default 50)."
            ),
            show_default=False,
        ),
    ] = None,
    tune_lr: Annotated[
        Optional[float],
        typer.Option(
            "--tune-lr",
            min=1e-8,
            max=1.0,
            help="The tuning's Adam learning rate (default 3e-4, the paper's; 3e-5 for a clip, STIT's).",
            show_default=False,
        ),
    ] = None,
    frames: Annotated[
        Optional[str],
        typer.Option(
            "--frames",
            metavar="A-B",
            help="A clip's frames to use: A-B (inclusive, from 0), A- (to the end) or A (default: all).",
            show_default=False,
        ),
    ] = None,
    every: Annotated[int, typer.Option("--every", min=1, help="Use every N-th frame of a clip.")] = 1,
    smooth: Annotated[
        Optional[float],
        typer.Option(
            "--smooth",
            min=0.0,
            max=100.0,
            help=(
                "Sigma (in chosen frames) of the Gaussian over time that steadies a clip's face landmarks "
                "(default 1.5); 0 = none."
            ),
            show_default=False,
        ),
    ] = None,
    lpips_threshold: Annotated[
        float,
        typer.Option(
            "--lpips-threshold",
            min=0.0,
            callback=_check_finite,
            help="Stop tuning once the perceptual loss reaches this (0 = never stop early).",
        ),
    ] = 0.06,
    locality_samples: Annotated[
        int, typer.Option("--locality-samples", min=1, max=64, help="Sampled latents per locality-regularized step.")
    ] = 1,
    locality_interval: Annotated[
        int, typer.Option("--locality-interval", min=1, help="Regularize every N-th step.")
    ] = 1,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            min=0,
            max=SEED_MAX,
            help="Seed for inversion noise and locality samples (same seed, same result).",
        ),
    ] = 0,
    strict_losses: Annotated[
        bool,
        typer.Option(
            "--strict-losses",
            help="Fail instead of falling back to weight-free losses when the VGG16/LPIPS weights are not cached.",
        ),
    ] = False,
    precision: Annotated[
        Precision, typer.Option("--precision", help="The inversion's and the tuning's precision: " + PRECISION_HELP)
    ] = Precision.fp32,
    impl: Annotated[Impl, typer.Option("--impl", help=impl_help("the inversion and the tuning"))] = Impl.auto,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            "-j",
            min=1,
            max=256,
            help=(
                "Photos tuned in parallel processes (the CPU's cores are split between them); for a clip, the "
                "processes that detect, align and invert its frames."
            ),
        ),
    ] = 1,
    ray: Annotated[
        Optional[str],
        typer.Option(
            "--ray",
            callback=_check_ray,
            help=help_text(
                "Tune on a Ray cluster, one task per photo: 'auto' (the running one, else a local one) or its "
                "address. Needs pip install 'pti[ray]'."
            ),
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help=(
                "Redo photos that out/manifest.jsonl says are done, even with other settings, and replace "
                "identities in --out tuned from other photos of the same name."
            ),
        ),
    ] = False,
    device: DeviceOption = "auto",
) -> None:
    """Tune a generator to each photo (PTI) and write its identity file, renders and report.

    Folders of photos work too: out/manifest.jsonl records each photo, a photo that fails is recorded and
    the rest go on, re-running the same command skips what is done, and out/summary.csv has a row per photo."""
    from pti.engine.invert import InvertConfig
    from pti.engine.tune import TuneConfig

    kind = init if init in ("projector", "e4e", "restyle") else "file"  # anything else is a pivot file's path
    if encoder is not None and kind not in ("e4e", "restyle"):
        raise typer.BadParameter("--encoder is the checkpoint of --init e4e or --init restyle", param_hint="--encoder")
    if restyle_iters is not None and kind != "restyle":
        raise typer.BadParameter("--restyle-iters is for --init restyle", param_hint="--restyle-iters")
    if invert_steps is None:
        invert_steps = 450 if kind == "projector" else 0
    elif invert_steps == 0 and kind == "projector":
        raise typer.BadParameter(
            "0 steps leaves no pivot to tune: 0 is for a start (--init e4e|restyle|FILE)", param_hint="--invert-steps"
        )
    invert_cfg = InvertConfig(
        steps=invert_steps, space=space.value, seed=seed, precision=precision.value, impl=impl.value
    )
    from pti.clip import CLIP_TUNE, is_video

    clip = len(photos) == 1 and is_video(photos[0])
    if not clip and any(is_video(p) for p in photos):
        raise typer.BadParameter("a clip is tuned on its own: give one video, or photos", param_hint="PHOTO")
    if not clip and (frames is not None or every != 1 or smooth is not None):
        raise typer.BadParameter("--frames, --every and --smooth are for a clip (pti tune clip.mp4)")
    if clip and (joint or ray):
        raise typer.BadParameter(
            "a clip is one person whose frames are tuned jointly already; --workers splits its per-frame stages "
            "(Ray does not run clips)",
            param_hint="--joint/--ray",
        )
    if clip and frames is not None:
        from pti.engine.video import parse_frames

        try:
            parse_frames(frames)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--frames") from None
    if clip and kind == "file":
        raise typer.BadParameter("a clip needs a start per frame: projector, e4e or restyle", param_hint="--init")
    defaults = CLIP_TUNE if clip else {"lr": 3e-4, "max_steps": 350}
    tune_cfg = TuneConfig(
        lr=tune_lr if tune_lr is not None else defaults["lr"],
        max_steps=tune_steps if tune_steps is not None else defaults["max_steps"],
        lpips_threshold=lpips_threshold,
        locality=not no_locality,
        locality_samples=locality_samples,
        locality_interval=locality_interval,
        seed=seed,
        precision=precision.value,
        impl=impl.value,
    )
    if joint and (workers > 1 or ray):
        raise typer.BadParameter(
            "--joint tunes one generator for all photos in one process", param_hint="--workers/--ray"
        )
    if ray is not None and workers > 1:
        raise typer.BadParameter("choose --workers or --ray, not both", param_hint="--workers")
    if clip:
        return run_tune_clip(
            photos[0],
            network=network,
            out=out,
            frames=frames,
            every=every,
            **({"smooth": smooth} if smooth is not None else {}),
            device=device,
            face=face,
            invert_cfg=invert_cfg,
            tune_cfg=tune_cfg,
            exact=exact,
            allow_fallback=not strict_losses,
            init=kind,
            init_path=str(encoder) if encoder is not None else None,
            restyle_iterations=restyle_iters or 5,
            workers=workers,
            force=force,
        )
    extra = {} if joint else dict(workers=workers, ray=ray, force=force)
    run_tune(
        photos,
        network=network,
        out=out,
        device=device,
        align=not no_align,
        face=face,
        joint=joint,
        invert_cfg=invert_cfg,
        tune_cfg=tune_cfg,
        exact=exact,
        allow_fallback=not strict_losses,
        init=kind,
        init_path=init if kind == "file" else (str(encoder) if encoder is not None else None),
        restyle_iterations=restyle_iters or 5,
        **extra,
    )


def run_tune(photos, **kwargs):
    """Run `pti.api.tune` with live progress per phase, then print what was written."""
    import pti.api

    kwargs.setdefault("threads", thread_setting())
    console.print(f"generator: {network_label(kwargs.get('network'))}", markup=False)
    with PhaseProgress() as bar:

        def progress(phase: str, step: int, total: int, values: dict) -> None:
            if phase == "align":
                if step == 0:
                    console.print(f"aligning {values.get('photo')}", markup=False)
                return
            if phase.endswith("encode") or phase.endswith("pivot file"):
                _start_line(phase, step, values)
                return
            if compile_line(phase, step, values):
                return
            bar.update(phase, step, total, values)

        results = pti.api.tune(photos, progress=progress, **kwargs)
    _summary(results, None if kwargs.get("joint") else kwargs.get("out"))  # joint runs keep no manifest
    failed = [r for r in results if r.status == "failed"]
    if failed:
        from pti.errors import PTIError

        if len(results) == 1:
            raise PTIError(failed[0].error)
        raise PTIError(
            f"{len(failed)} of {len(results)} photos failed (the others are written; rerun the same command "
            f"to retry only these): {failed[0].photo}: {failed[0].error}" + (" ..." if len(failed) > 1 else "")
        )


def run_tune_clip(clip, **kwargs):
    """Run `pti.api.tune_clip` with live progress per stage, then print what was written."""
    import pti.api

    kwargs.setdefault("threads", thread_setting())
    console.print(f"generator: {network_label(kwargs.get('network'))}", markup=False)
    with PhaseProgress() as bar:

        def progress(phase: str, step: int, total: int, values: dict) -> None:
            if phase in ("align", "encode", "pivot file") or compile_line(phase, step, values):
                return  # per frame: the stage's bar says it
            bar.update(phase, step, total, values)

        res = pti.api.tune_clip(clip, progress=progress, **kwargs)
    rep = res.report
    video, after, worst = rep["video"], rep["after_tuning"], rep["after_tuning_worst"]
    perceptual = next((k for k in after if k not in ("mse", "ms_ssim")), None)
    console.print(
        f"{clip}: {video['tuned']} of {video['selected']} frames tuned ({video['frames_in_clip']} in the clip, "
        f"{video['fps']:g} fps), {rep['steps']['tune']} tuning steps in {rep['seconds']['tune']:.1f} s",
        markup=False,
    )
    console.print(
        f"  after tuning, over the frames: MSE mean {after['mse']:.4f} (worst {worst['mse']:.4f})"
        + (f", {perceptual} mean {after[perceptual]:.4f} (worst {worst[perceptual]:.4f})" if perceptual else ""),
        markup=False,
    )
    reused = {k: v for k, v in res.reused.items() if v}
    if reused:
        console.print("  reused from an earlier run: " + ", ".join(f"{k} {v}" for k, v in reused.items()), markup=False)
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")
    size = res.identity.stat().st_size / 1e6
    console.print(f"wrote {res.identity} ({size:.1f} MB) and {res.files['report']}", markup=False)


def _start_line(phase: str, step: int, values: dict) -> None:
    """The start of a pivot: "encoding with e4e (e4e_ffhq_encode.pt) ..." then its time, or the pivot file read."""
    base = "pivot file" if phase.endswith("pivot file") else "encode"
    name = phase[: -len(base)].strip()  # a worker's events are named after their photo
    who = f"{name}: " if name else ""
    if base == "pivot file":
        if step == 0:
            console.print(f"{who}pivot from {values.get('path')}", markup=False)
    elif step == 0:
        console.print(f"{who}encoding with {values.get('encoder')} ...", markup=False)
    else:
        console.print(f"{who}encoded with {values.get('encoder')} in {values.get('ms', 0.0):.0f} ms", markup=False)


def _rows(results) -> list[dict[str, str]]:
    """Every value of the summary, as text, one dict per photo."""
    from pti.pipeline import perceptual_key_in

    rows = []
    for r in results:
        if r.status != "done":
            continue
        rep = r.report
        b, a = rep["before_tuning"], rep["after_tuning"]
        pkey = perceptual_key_in(a)
        idsim = rep.get("identity_similarity")
        rows.append(
            {
                "photo": str(r.photo),
                "identity": str(r.identity),
                "size": f"{rep['identity_file']['bytes'] / 1e6:.1f} MB",
                "steps inv/tune": (
                    _start_label(rep.get("init")) + f"{rep['steps']['invert']}/{rep['steps']['tune']}"
                    f"{' (early stop)' if rep.get('early_stopped') else ''}"
                ),
                "MSE before->after": f"{b['mse']:.4f}->{a['mse']:.4f}",
                f"{pkey} before->after": f"{b[pkey]:.4f}->{a[pkey]:.4f}",
                "ID sim": "-" if idsim is None else f"{idsim:.3f}",
            }
        )
    return rows


def _start_label(init: dict | None) -> str:
    """ "e4e+" before the steps when the pivot started from an encoder or a file."""
    kind = (init or {}).get("init", "projector")
    return "" if kind == "projector" else f"{kind}+"


def _summary(results, out=None) -> None:
    """A table in a terminal; in a log, one line per photo with every value whole; then skips and failures."""
    done = [r for r in results if r.status == "done"]
    if done and done[0].report.get("notice"):
        console.print(f"[yellow]note:[/] {escape(done[0].report['notice'])}")
    ran = _ran(done[0].report) if done else None
    if ran:
        console.print(ran, markup=False)
    rows = _rows(results)
    if not (rows and console.is_terminal and _print_table(done, rows, out)):
        for row in rows:
            console.print("  ".join(f"{k}: {v}" for k, v in row.items()), markup=False)
    for r in done:
        for w in r.warnings:
            console.print(f"[yellow]warning:[/] {escape(w)}")
        files = ", ".join(p.name for p in r.files.values())
        console.print(f"{r.name}: wrote {r.identity} and {r.files['report'].parent}/ ({files})", markup=False)
    for r in results:
        if r.status == "skipped":
            console.print(f"{r.name}: done before, skipped ({r.identity}; --force redoes it)", markup=False)
        elif r.status == "failed":
            console.print(f"[red]failed:[/] {escape(f'{r.photo}: {r.error}')}")
    if len(results) > 1 or any(r.status != "done" for r in results):
        counts = {k: sum(r.status == k for r in results) for k in ("done", "skipped", "failed")}
        where = f"; {Path(out) / 'manifest.jsonl'} and {Path(out) / 'summary.csv'}" if out is not None else ""
        console.print(
            f"{plural(len(results), 'photo')}: {counts['done']} done, {counts['skipped']} skipped, "
            f"{counts['failed']} failed{where}",
            markup=False,
        )


def _ran(report: dict) -> str | None:
    """What ran, from a report's `impl` record: "ran the inversion and the tuning with compile, fp32; compiled once
    in 41.0 s (inversion) + 30.2 s (tuning)"; None when the report has no record."""
    impl = report.get("impl") or {}
    steps = [(label, impl[k]) for k, label in (("invert", "the inversion"), ("tune", "the tuning")) if impl.get(k)]
    if not steps:
        return None

    def how(r: dict) -> str:
        return f"{r.get('impl')}, {r.get('precision')}" + (" (--impl auto)" if r.get("requested") == "auto" else "")

    if len({how(r) for _, r in steps}) == 1:
        line = f"ran {' and '.join(label for label, _ in steps)} with {how(steps[0][1])}"
    else:
        line = "ran " + ", ".join(f"{label} with {how(r)}" for label, r in steps)
    ops: dict[str, set] = {}  # under triton, which implementations ran each op (the reference where no kernel fits)
    for _, r in steps:
        for op, names in (r.get("ops") or {}).items() if r.get("impl") == "triton" else ():
            ops.setdefault(op, set()).update(names)
    if ops:
        line += "; ops: " + ", ".join(f"{op} {'+'.join(sorted(names))}" for op, names in sorted(ops.items()))
    compiled = [(label.removeprefix("the "), r["compile_seconds"]) for label, r in steps if r.get("compile_seconds")]
    if compiled:
        line += "; compiled once in " + " + ".join(f"{s:.1f} s ({what})" for what, s in compiled)
    return line


def _print_table(done, rows, out) -> bool:
    """The summary laid out for the terminal: photo and losses always, then ID similarity, steps, size and identity
    while they fit (no value is broken; what is left out is named, with where to find it). False: too narrow."""
    from rich.text import Text

    from pti.commands.tables import ALWAYS, Column, fit_table, print_wrapped

    keys = list(rows[0])
    keep = {"photo": ALWAYS, "ID sim": 4, "steps inv/tune": 3, "size": 2, "identity": 1}  # the rest: the losses
    columns = [Column(k, k, keep.get(k, ALWAYS)) for k in keys]
    cells = [{**row, "photo": Text(r.photo.name), "identity": Text(r.identity.name)} for r, row in zip(done, rows)]
    table, left_out = fit_table(console, columns, cells, title="pti tune")
    if table is None:
        return False
    console.print(table)
    if left_out:
        where = Path(out) / "summary.csv" if out is not None else "each photo's report.json"
        print_wrapped(
            console,
            f"not shown at this width: {', '.join(c.head for c in left_out)} (every value: {where})",
            style="dim",
        )
    return True


def register(app: typer.Typer) -> None:
    app.command("tune")(tune)
