"""Milliseconds per rendered image through `pti render`'s torch backend, at batch 1 and 8.

    python -m benchmarks.bench_render [--repeats 7] [--configs tiny,paper256] [--batches 1,8]

What is timed is `TorchBackend.render(ws)`: the tuned synthesis network's forward in fp32 with
constant noise, the work `pti render` does per frame (edits are a few vector additions on top).
Generators: the built-in tiny one (64 px) and "paper256" (256 px config-f, channel_base 16384,
random weights; num_fp16_res 0, as fp16 blocks are slow on CPU). One warm-up call, then `--repeats`
timed calls; median, min and max of ms per image, with the device, precision, implementation and
thread count. Writes benchmarks/results/render_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from pti.benchmark import build
from pti.engine.device import apply_cpu_threads, resolve_device, synthesis_macs
from pti.rendering import TorchBackend


def render_args(doc: str) -> argparse.Namespace:
    """The options every render benchmark takes: --repeats, --configs, --batches, --device."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--configs", default="tiny,paper256")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--device", default="auto")
    return ap.parse_args()


def main() -> None:
    args = render_args(__doc__)
    dev = resolve_device(args.device)
    rows = []
    for name in args.configs.split(","):
        G = build(name).to(dev)
        threads = apply_cpu_threads(G, dev, "auto")  # the CLI's policy
        for batch in map(int, args.batches.split(",")):
            backend = TorchBackend(G, dev, batch=batch)
            with torch.no_grad():
                ws = G.mapping(torch.randn([batch, G.z_dim], device=dev), truncation_psi=0.7)
            backend.render(ws)  # warm-up
            ms = []
            for _ in range(args.repeats):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                backend.render(ws)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                ms.append(1000 * (time.perf_counter() - t0) / batch)
            row = dict(
                config=name,
                resolution=G.img_resolution,
                batch=batch,
                threads=threads,
                ms_per_image_median=round(statistics.median(ms), 3),
                ms_min=round(min(ms), 3),
                ms_max=round(max(ms), 3),
                gmac_per_image=round(synthesis_macs(G) / 1e9, 2),
            )
            rows.append(row)
            print(
                f"{name:9s} batch {batch:2d}: {row['ms_per_image_median']:9.2f} ms/image "
                f"(min {row['ms_min']:.2f}, max {row['ms_max']:.2f}; {threads} thread(s))",
                flush=True,
            )
    result = {
        "what": "ms per rendered image, TorchBackend.render (pti render's forward pass)",
        "device": str(dev),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads after the last config",
        "precision": "fp32",
        "implementation": "reference PyTorch ops (impl=auto: no kernels registered)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "rows": rows,
    }
    out = Path(__file__).parent / "results" / f"render_{dev.type}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
