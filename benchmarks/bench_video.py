"""Seconds per frame of each stage of a clip, and how the total grows with its length (1, 10, 50 frames).

    python -m benchmarks.bench_video [--frames 1,10,50] [--invert-steps 20] [--tune-steps 2]
    python -m benchmarks.bench_video --recipes      # the clip's tuning defaults: fit against locality, per setting

What runs: the real `pti.api.tune_clip` and `pti.render` (paste=True), in this process, on synthetic clips of
the public-domain astronaut moving by a known transform (tests/videoclip.py: 320x256, 12 fps, with sound), with
the built-in generator (64 px) and the weight-free losses, on the CPU in fp32 with the reference ops. Each clip
is tuned into a fresh folder (nothing reused), then rendered with paste-back into an MP4.

The stages are those of `pti.clip`: track (decode + dlib detection + landmarks per frame), align (decode + the
FFHQ cut per frame), invert (the projector, --invert-steps per frame; an encoder would replace it), tune (one
generator for all frames: --tune-steps passes, each one step per frame) and render (render + paste + PNG per
frame, then the MP4 with the audio muxed in). Per frame = the stage's seconds / frames.

The step counts are smaller than the clip defaults (450 projector steps, 50 passes) to keep the run short; the
per-step times are recorded too, so the defaults' cost is `frames x (450 x invert step + 50 x tune step)`.

`--recipes` tunes one 10-frame clip (the same pivots for every setting: the stages are reused) with each
(learning rate, passes) of RECIPES and measures what the choice trades: the fit (the frames' mean MSE after
tuning) against locality (the mean MSE between the tuned and the base generator's renders of 16 random w's at
psi 0.5: how much of the rest of the latent space the tuning moved; 0 = untouched), and the seconds. With
random weights the absolute values say nothing about faces; the trade's direction does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "video_cpu.json"
RECIPE_RESULTS = Path(__file__).parent / "results" / "video_recipe_cpu.json"
RECIPES = ((3e-4, 10), (3e-4, 50), (3e-5, 10), (3e-5, 50), (3e-5, 150))  # (lr, passes over the frames)


def run(frames: int, invert_steps: int, tune_steps: int, root: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from videoclip import make_clip  # noqa: PLC0415  the tests' synthetic clip

    import pti  # noqa: PLC0415
    from pti.engine.invert import InvertConfig  # noqa: PLC0415
    from pti.engine.tune import TuneConfig  # noqa: PLC0415

    folder = root / f"clip{frames}"
    folder.mkdir()
    truth = make_clip(folder / "clip.mp4", n=frames, fps=12, noise=2.0, audio=True)
    t0 = time.perf_counter()
    res = pti.tune_clip(
        truth.path,
        out=folder / "out",
        device="cpu",
        invert_cfg=InvertConfig(steps=invert_steps),
        tune_cfg=TuneConfig(lr=3e-5, max_steps=tune_steps),
        threads="auto",
    )
    tuned_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rendered = pti.render(res.identity, [], folder / "render", paste=True, device="cpu", threads="auto")
    render_s = time.perf_counter() - t0
    seconds = dict(res.report["seconds"])
    stages = {k: seconds[k] for k in ("track", "align", "invert", "tune")}
    stages["render"] = render_s
    clip = rendered.report["clip"]
    tuned = res.report["video"]["tuned"]
    return {
        "frames": frames,
        "tuned_frames": tuned,
        "seconds": {k: round(v, 3) for k, v in stages.items()},
        "seconds_per_frame": {k: round(v / frames, 4) for k, v in stages.items()},
        "total_seconds": round(tuned_s + render_s, 3),
        "invert_step_ms": round(1e3 * seconds["invert"] / max(1, tuned * invert_steps), 2),
        "tune_step_ms": round(1e3 * seconds["tune"] / max(1, res.report["steps"]["tune"]), 2),
        "render": {"frames": clip["frames"], "fps": clip["fps"], "audio": clip["audio"]},
        "identity_bytes": res.identity.stat().st_size,
    }


def recipes(root: Path, frames: int = 10, invert_steps: int = 20) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from videoclip import make_clip  # noqa: PLC0415

    import pti  # noqa: PLC0415
    from pti.engine.identity import open_identity  # noqa: PLC0415
    from pti.engine.invert import InvertConfig  # noqa: PLC0415
    from pti.engine.tune import TuneConfig  # noqa: PLC0415

    truth = make_clip(root / "clip.mp4", n=frames, fps=12, noise=2.0, audio=False)
    rows = []
    for lr, passes in RECIPES:
        res = pti.tune_clip(
            truth.path,
            out=root / "out",
            device="cpu",
            invert_cfg=InvertConfig(steps=invert_steps),
            tune_cfg=TuneConfig(lr=lr, max_steps=passes),
            threads="auto",
        )
        _, base, _, G = open_identity(res.identity, device="cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            w = base.mapping(torch.randn(16, base.z_dim, generator=g), truncation_psi=0.5)
            drift = float(
                (
                    (G.synthesis(w, noise_mode="const", force_fp32=True) - base.synthesis(w, noise_mode="const")) ** 2
                ).mean()
            )
        rows.append(
            {
                "lr": lr,
                "passes": passes,
                "steps": res.report["steps"]["tune"],
                "fit_mse": round(res.report["after_tuning"]["mse"], 5),
                "fit_mse_worst_frame": round(res.report["after_tuning_worst"]["mse"], 5),
                "locality_drift_mse": round(drift, 6),
                "tune_seconds": round(res.report["seconds"]["tune"], 2),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", default="1,10,50", help="clip lengths, comma separated")
    ap.add_argument("--invert-steps", type=int, default=20)
    ap.add_argument("--tune-steps", type=int, default=2, help="passes over all frames")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--recipes", action="store_true", help="the tuning-defaults comparison instead")
    args = ap.parse_args(argv)
    from pti.benchmark import environment  # noqa: PLC0415

    if args.recipes:
        with tempfile.TemporaryDirectory() as tmp:
            rows = recipes(Path(tmp))
        out = args.out or RECIPE_RESULTS
        result = {
            "benchmark": "bench_video --recipes",
            "environment": environment(torch.device("cpu")),
            "settings": {"generator": "builtin:tiny (64 px)", "frames": 10, "invert_steps": 20, "locality": True},
            "rows": rows,
        }
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
        return 0

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.frames.split(",")):
            row = run(n, args.invert_steps, args.tune_steps, Path(tmp))
            rows.append(row)
            per = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in row["seconds_per_frame"].items())
            print(f"{n:3d} frames: total {row['total_seconds']:.1f} s; per frame: {per}", flush=True)
    steps_inv = statistics.median(r["invert_step_ms"] for r in rows)
    steps_tune = statistics.median(r["tune_step_ms"] for r in rows)
    result = {
        "benchmark": "bench_video",
        "environment": environment(torch.device("cpu")),
        "settings": {
            "generator": "builtin:tiny (64 px)",
            "losses": "weight-free (MS-SSIM + L2)",
            "precision": "fp32",
            "impl": "ref",
            "clip": "tests/videoclip.py make_clip: 320x256, 12 fps, sine audio",
            "invert_steps": args.invert_steps,
            "tune_passes": args.tune_steps,
        },
        "rows": rows,
        "default_recipe_seconds_per_frame": {
            "note": "450 projector steps + 50 tuning passes, from the medians of the measured step times",
            "invert": round(450 * steps_inv / 1e3, 2),
            "tune": round(50 * steps_tune / 1e3, 2),
        },
    }
    out = args.out or RESULTS
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
