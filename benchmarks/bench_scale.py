"""Photos per hour for a folder: 1 process, 2 worker processes, and Ray, on the built-in tiny generator.

    python -m benchmarks.bench_scale [--photos 6] [--invert-steps 60] [--tune-steps 40] [--modes seq,workers2,ray]

The same photos (the astronaut, mirrored and shifted copies: faces dlib finds) are tuned into a fresh
folder per mode, with the same settings and seed, in one run; wall time includes starting the workers
(and the local Ray cluster), which a long folder amortizes. Reports photos per hour and the ratio to the
sequential run, checks that every mode wrote the same identity tensors, and writes
benchmarks/results/scale_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_photos(folder: Path, n: int) -> list[Path]:
    import skimage.data
    from PIL import Image

    face = skimage.data.astronaut()
    paths = []
    for i in range(n):
        img = face[:, ::-1] if i % 2 else face
        img = np.roll(img, 4 * (i // 2), axis=1)
        paths.append(folder / f"p{i:02d}.png")
        Image.fromarray(np.ascontiguousarray(img)).save(paths[-1])
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=6)
    ap.add_argument("--invert-steps", type=int, default=60)
    ap.add_argument("--tune-steps", type=int, default=40)
    ap.add_argument("--modes", default="seq,workers2,ray")
    args = ap.parse_args()
    import pti
    from pti.engine.identity import Identity
    from pti.engine.invert import InvertConfig
    from pti.engine.tune import TuneConfig

    cfg = dict(
        invert_cfg=InvertConfig(steps=args.invert_steps),
        tune_cfg=TuneConfig(max_steps=args.tune_steps, lpips_threshold=0.0),
        device="cpu",
        threads="auto",
    )
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("PTI_HOME", str(tmp / "home"))  # the same losses in every mode
        (tmp / "photos").mkdir()
        photos = make_photos(tmp / "photos", args.photos)
        for mode in args.modes.split(","):
            extra = {"seq": {}, "workers2": {"workers": 2}, "ray": {"ray": "auto"}}[mode]
            out = tmp / mode
            t0 = time.perf_counter()
            results = pti.tune(photos, out=out, **cfg, **extra)
            seconds = time.perf_counter() - t0
            done = [r for r in results if r.status == "done"]
            tensors = [Identity.load(r.identity).tensors for r in done]
            same = None
            if reference is None:
                reference = tensors
            else:
                same = all(
                    a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(tensors, reference)
                )
            row = dict(
                mode=mode,
                photos=len(photos),
                done=len(done),
                seconds=round(seconds, 2),
                photos_per_hour=round(3600 * len(done) / seconds, 1),
                identical_to_sequential=same,
            )
            rows.append(row)
            print(
                f"{mode:9s} {len(done)}/{len(photos)} photos in {seconds:7.1f} s  "
                f"{row['photos_per_hour']:8.1f} photos/hour"
                + ("" if same is None else f"  identical to sequential: {same}"),
                flush=True,
            )
    base = rows[0]["photos_per_hour"]
    for r in rows:
        r["ratio_to_first"] = round(r["photos_per_hour"] / base, 2)
    result = {
        "what": "photos per hour, pti.tune over a folder; wall time includes starting workers / the local Ray cluster",
        "device": "cpu",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "generator": "built-in tiny (64 px)",
        "steps": {"invert": args.invert_steps, "tune": args.tune_steps},
        "precision": "fp32",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    out = Path(__file__).parent / "results" / "scale_cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
