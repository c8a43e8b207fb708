"""Quality and time of the full PTI recipe in fp32 and in bf16 autocast, on the same photo, in one run.

    python -m benchmarks.bench_precision [--invert-steps 450] [--tune-steps 350] [--device auto]

The built-in tiny generator and NASA's astronaut photo (aligned once), the weight-free losses (what an
offline machine has; with the official weights cached the run uses VGG16 + LPIPS instead and says so),
locality regularization on, the same seed. Reports, per precision, the final MSE and perceptual distance
of the reconstruction (measured in fp32), seconds, and the relative difference bf16 vs fp32, beside a
control (fp32 on the photo rounded once to bf16: the recipe's sensitivity to a perturbation that size); writes
benchmarks/results/precision_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--invert-steps", type=int, default=450)
    ap.add_argument("--tune-steps", type=int, default=350)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    import numpy as np
    import skimage.data

    from pti.engine.align import align_photo
    from pti.engine.device import apply_cpu_threads, resolve_device
    from pti.engine.generator import tiny_generator
    from pti.engine.images import from_uint8
    from pti.engine.invert import InvertConfig, invert
    from pti.engine.losses import load_losses
    from pti.engine.tune import TuneConfig, image_metrics, tune
    from PIL import Image

    dev = resolve_device(args.device)
    G = tiny_generator(dev)
    threads = apply_cpu_threads(G, dev, "auto")
    losses = load_losses(dev)
    aligned = align_photo(Image.fromarray(skimage.data.astronaut()), output_size=G.img_resolution).image
    target = from_uint8(np.asarray(aligned.convert("RGB")), dev)
    rows = {}
    # The control: fp32 throughout, but the photo rounded once to bf16 (a perturbation of bf16's size and
    # nothing else). How far it moves the final metrics is the recipe's own sensitivity: a precision cannot
    # be judged against a margin smaller than that.
    for run in ("fp32", "bf16", "fp32-control"):
        precision = run.removesuffix("-control")
        photo = target.bfloat16().float() if run.endswith("control") else target
        t0 = time.perf_counter()
        inv = invert(G, photo, losses.projector, InvertConfig(steps=args.invert_steps, precision=precision))
        t1 = time.perf_counter()
        res = tune(G, photo, inv.pivot, losses.perceptual, TuneConfig(max_steps=args.tune_steps, precision=precision))
        t2 = time.perf_counter()
        with torch.no_grad():
            recon = res.G.synthesis(inv.pivot, noise_mode="const", force_fp32=True)
        m = image_metrics(recon, target, losses.perceptual)
        rows[run] = dict(
            run=run,
            precision=precision,
            invert_seconds=round(t1 - t0, 2),
            tune_seconds=round(t2 - t1, 2),
            tune_steps=res.steps,
            early_stopped=res.early_stopped,
            mse=m["mse"],
            perceptual=m["perceptual"],
            ms_ssim=m["ms_ssim"],
        )
        print(
            f"{run}: invert {t1 - t0:.1f} s, tune {t2 - t1:.1f} s ({res.steps} steps); "
            f"MSE {m['mse']:.5f}, perceptual {m['perceptual']:.5f}",
            flush=True,
        )
    a, b, c = rows["fp32"], rows["bf16"], rows["fp32-control"]
    rel = {k: (b[k] - a[k]) / a[k] for k in ("mse", "perceptual")}
    control = {k: (c[k] - a[k]) / a[k] for k in ("mse", "perceptual")}
    speed = (a["invert_seconds"] + a["tune_seconds"]) / (b["invert_seconds"] + b["tune_seconds"])
    print(
        f"bf16 vs fp32: MSE {100 * rel['mse']:+.2f} %, perceptual {100 * rel['perceptual']:+.2f} %, speed x{speed:.2f}"
    )
    print(
        f"control (fp32, photo rounded to bf16) vs fp32: MSE {100 * control['mse']:+.2f} %, "
        f"perceptual {100 * control['perceptual']:+.2f} %"
    )
    result = {
        "what": "full recipe (invert + tune with locality), fp32 vs bf16 autocast, same photo and seed, one run",
        "generator": "built-in tiny (64 px)",
        "losses": losses.names,
        "official_losses": losses.official,
        "device": str(dev),
        "threads": threads if dev.type == "cpu" else None,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "steps": {"invert": args.invert_steps, "tune": args.tune_steps},
        "rows": list(rows.values()),
        "bf16_relative_difference": rel,
        "control_relative_difference": control,
        "bf16_speedup": round(speed, 3),
    }
    out = Path(__file__).parent / "results" / f"precision_{dev.type}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
