"""`pti tune`: align, invert and tune photos; write one `.pti` identity file per person."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pti.commands.common import DeviceOption, NetworkOption, console, network_label


def tune(
    photos: Annotated[list[Path], typer.Argument(help="Photos (or folders of photos) of faces.", show_default=False)],
    network: NetworkOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: <name>.pti plus a <name>/ folder per photo.")] = Path("pti-out"),
    joint: Annotated[bool, typer.Option("--joint", help="Tune one generator for all photos together (multi-ID PTI).")] = False,
    no_locality: Annotated[bool, typer.Option("--no-locality", help="Skip locality regularization: faster (the authors' repo default), but edits of the tuned identity degrade more.")] = False,
    exact: Annotated[bool, typer.Option("--exact", help="Store exact fp32 tuned weights instead of fp16 deltas (about 2x larger).")] = False,
    no_align: Annotated[bool, typer.Option("--no-align", help="Photos are already aligned square face crops: only resize them.")] = False,
    face: Annotated[Optional[int], typer.Option("--face", help="Which face when a photo has several (0 = largest).")] = None,
    space: Annotated[str, typer.Option("--space", help="Inversion space: w (the paper) or w+ (one w per layer).")] = "w",
    invert_steps: Annotated[int, typer.Option("--invert-steps", help="Inversion steps.")] = 450,
    tune_steps: Annotated[int, typer.Option("--tune-steps", help="Maximum tuning steps (passes over all photos with --joint).")] = 350,
    lpips_threshold: Annotated[float, typer.Option("--lpips-threshold", help="Stop tuning once the perceptual loss reaches this.")] = 0.06,
    locality_samples: Annotated[int, typer.Option("--locality-samples", help="Sampled latents per locality-regularized step.")] = 1,
    locality_interval: Annotated[int, typer.Option("--locality-interval", help="Regularize every N-th step.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed for inversion noise and locality samples (same seed, same result).")] = 0,
    strict_losses: Annotated[bool, typer.Option("--strict-losses", help="Fail instead of falling back to weight-free losses when the VGG16/LPIPS weights are not cached.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Tune a generator to each photo (PTI) and write its identity file, renders and report."""
    from pti.engine.invert import InvertConfig
    from pti.engine.tune import TuneConfig
    from pti.errors import PTIError

    if space not in ("w", "w+"):
        raise PTIError(f"--space must be w or w+, not {space!r}")
    invert_cfg = InvertConfig(steps=invert_steps, space=space, seed=seed)
    tune_cfg = TuneConfig(max_steps=tune_steps, lpips_threshold=lpips_threshold, locality=not no_locality,
                          locality_samples=locality_samples, locality_interval=locality_interval, seed=seed)
    run_tune(photos, network=network, out=out, device=device, align=not no_align, face=face, joint=joint,
             invert_cfg=invert_cfg, tune_cfg=tune_cfg, exact=exact, allow_fallback=not strict_losses)


def run_tune(photos, **kwargs):
    """Run `pti.api.tune` with a live progress bar per phase, then print what was written."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    import pti.api
    from pti.errors import PTIError

    _check_options(kwargs["invert_cfg"], kwargs["tune_cfg"])
    console.print(f"generator: {network_label(kwargs.get('network'))}")
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    tasks: dict[str, int] = {}
    with Progress(*columns, console=console, transient=False) as bar:
        def progress(phase: str, step: int, total: int, values: dict) -> None:
            if phase == "align":
                if step == 0:
                    console.print(f"aligning {values.get('photo')}")
                return
            if step == 1 or phase not in tasks:  # a new bar for each photo's phase
                tasks[phase] = bar.add_task(phase, total=total, info="")
            info = "  ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
            bar.update(tasks[phase], completed=step, total=total, info=info)

        results = pti.api.tune(photos, progress=progress, **kwargs)
        for task in bar.tasks:  # early stop: close the bar where tuning ended
            bar.update(task.id, total=task.completed)
    if not results:
        raise PTIError("nothing was tuned")
    _summary(results)


def _check_options(invert_cfg, tune_cfg) -> None:
    from pti.errors import PTIError

    if invert_cfg.steps < 1 or tune_cfg.max_steps < 1:
        raise PTIError("--invert-steps and --tune-steps must be at least 1")
    if tune_cfg.locality_samples < 1 or tune_cfg.locality_interval < 1:
        raise PTIError("--locality-samples and --locality-interval must be at least 1")


def _summary(results) -> None:
    from rich.table import Table

    first = results[0].report
    if first.get("notice"):
        console.print(f"[yellow]note:[/] {first['notice']}")
    table = Table(title="pti tune", show_lines=False)
    for col in ("photo", "identity", "size", "steps inv/tune", "MSE before->after", "perceptual before->after", "ID sim"):
        table.add_column(col)
    for r in results:
        rep = r.report
        b, a = rep["before_tuning"], rep["after_tuning"]
        pkey = "lpips_alex" if "lpips_alex" in a else "perceptual_weight_free"
        idsim = rep.get("identity_similarity")
        table.add_row(
            r.photo.name, r.identity.name, f"{rep['identity_file']['bytes'] / 1e6:.1f} MB",
            f"{rep['steps']['invert']}/{rep['steps']['tune']}{' (early stop)' if rep.get('early_stopped') else ''}",
            f"{b['mse']:.4f}->{a['mse']:.4f}", f"{b[pkey]:.3f}->{a[pkey]:.3f}",
            "-" if idsim is None else f"{idsim:.3f}",
        )
    console.print(table)
    for r in results:
        for w in r.warnings:
            console.print(f"[yellow]warning:[/] {w}")
        files = ", ".join(p.name for p in r.files.values())
        console.print(f"{r.name}: wrote {r.identity} and {r.files['report'].parent}/ ({files})")


def register(app: typer.Typer) -> None:
    app.command("tune")(tune)
