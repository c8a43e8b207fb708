"""Seconds per image: the projector's pivot against an encoder's (e4e, ReStyle-e4e), each tuned to the same stop rule.

    python -m benchmarks.bench_init [--configs paper256,ffhq1024] [--steps 5] [--warmup 1] [--repeats 5]

What runs (CPU, fp32, the reference ops, 2 threads as pti's policy sets them for these sizes):

    encoder              `pti.engine.encoders.encode` on aligned faces at the generator's resolution, uint8:
                         the resize to 256 px, the network, + latent_avg. e4e at batch 1 and 8; ReStyle-e4e at
                         batch 1 with its 5 iterations (each renders the reconstruction with the generator).
                         Random weights (the real architecture, so the real cost). Median of --repeats after one
                         warm-up call.
    invert step          one projector step (pti.engine.invert), the median of --steps after --warmup
    tune step+locality   one tuning step with the locality regularizer (PTI regularizes every step)

Per image (the PTI recipe: 450 projector steps, then at most 350 tuning steps):

    projector path = 450 x invert step + 350 x tune step+locality
    encoder path   = encoder (batch 1)  + 350 x tune step+locality

The step counts are the recipe's and the per-step times are measured; the full runs are not (450 projector
steps at 1024 px take about an hour on this CPU). With random weights tuning never reaches the LPIPS
threshold, so both paths run the 350 steps; with real weights tuning stops earlier for both, which shrinks the
shared term and makes the encoder path's share smaller still. The pivot's quality cannot be judged with random
weights: `pti tune` prints and records the pivot's MSE and LPIPS before tuning for every init, which is what a
user with real weights compares. Losses, random weights in the real architectures (so the real cost):
LPIPS-alex for tuning; for the projector a VGG16 with NVIDIA's metric network's layout (13 convolutions, the
five LPIPS taps, TorchScript, 256 px inputs), where benchmarks/bench_tune.py uses a 2-conv stand-in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_tune import losses, run_phase
from pti.benchmark import build, environment
from pti.engine.device import apply_cpu_threads
from pti.engine.encoders import Encoder, encode
from pti.engine.losses import VGGProjectorMetric
from pti.engine.perceptual import VGG16Metric

RESULTS = Path(__file__).parent / "results" / "init_cpu.json"
INVERT_STEPS, TUNE_STEPS = 450, 350  # PTI's first_inv_steps and max_pti_steps


VGG16_LAYOUT = (64, 64, "tap", "pool", 128, 128, "tap", "pool", 256, 256, 256, "tap", "pool", 512, 512, 512, "tap")
VGG16_LAYOUT += ("pool", 512, 512, 512, "tap")


class VGG16Layout(nn.Module):
    """NVIDIA's projector metric network's cost: VGG16's 13 3x3 convolutions with ReLU, max-pools between the
    stages, the five LPIPS taps unit-normalised per position; the TorchScript's call signature. Random weights."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g, convs, c = torch.Generator().manual_seed(seed), [], 3
        for item in VGG16_LAYOUT:
            if isinstance(item, int):
                conv = nn.Conv2d(c, item, 3, padding=1)
                with torch.no_grad():
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2 / (9 * c)) ** 0.5)
                    conv.bias.zero_()
                convs.append(conv)
                c = item
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor, resize_images: bool = True, return_lpips: bool = False) -> torch.Tensor:
        x = x / 127.5 - 1
        outs: list[torch.Tensor] = []
        i = 0
        for conv in self.convs:
            x = F.relu(conv(x))
            i += 1
            if i in (2, 4, 7, 10, 13):  # after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3
                h = x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-8) / float(x.shape[2] * x.shape[3]) ** 0.5
                outs.append(h.flatten(1))
                if i < 13:
                    x = F.max_pool2d(x, 2)
        return torch.cat(outs, dim=1)


def vgg16_metric(tmp: Path) -> VGGProjectorMetric:
    path = tmp / "vgg16-layout.pt"
    torch.jit.save(torch.jit.script(VGG16Layout().eval()), str(path))
    return VGGProjectorMetric(VGG16Metric(path))


def aligned_faces(G, n: int) -> torch.Tensor:
    """`n` uint8 faces at the generator's resolution (its own renders: the encoder sees an image of that size)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ws = G.mapping(torch.randn([n, G.z_dim], generator=g), truncation_psi=0.7)
        img = G.synthesis(ws, noise_mode="const", force_fp32=True)
    return (img * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def time_calls(fn, repeats: int) -> dict:
    fn()  # warm-up: first-call allocations, oneDNN primitive creation
    wall = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(wall), "min_s": min(wall), "max_s": max(wall), "all_s": wall}


def encoder_rows(G, repeats: int) -> dict:
    out = {}
    for kind, batches, iterations in (("e4e", (1, 8), 1), ("restyle", (1,), 5)):
        enc = Encoder(kind, G.img_resolution, torch.zeros(G.num_ws, G.w_dim))
        for b in batches:
            faces = aligned_faces(G, b)
            row = time_calls(lambda: encode(enc, faces, G, iterations=iterations), repeats)
            row["per_image_ms"] = 1000 * row["median_s"] / b
            out[f"{kind} batch {b}" + (f", {iterations} iterations" if kind == "restyle" else "")] = row
            print(f"  {kind:8s} batch {b}: {row['median_s'] * 1000:8.0f} ms ({row['per_image_ms']:.0f} ms per image)")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="paper256", help="paper256 and/or ffhq1024 (slow: about 20 minutes)")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per phase")
    ap.add_argument("--warmup", type=int, default=1, help="steps dropped before measuring")
    ap.add_argument("--repeats", type=int, default=5, help="measured encoder calls")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    rows, tmp, started = [], Path(tempfile.mkdtemp()), time.perf_counter()
    _, perceptual = losses("nets", tmp)
    metric = vgg16_metric(tmp)
    for name in args.configs.split(","):
        G = build(name)
        threads = apply_cpu_threads(G, torch.device("cpu"), "auto")
        print(f"{name}: {G.img_resolution} px, {G.num_ws} ws, {threads} threads", flush=True)
        enc = encoder_rows(G, args.repeats)
        inv = run_phase(G, "invert step", metric, perceptual, args.steps, args.warmup)
        tun = run_phase(G, "tune step + locality", metric, perceptual, args.steps, args.warmup)
        tune_s = TUNE_STEPS * tun["median_s"]
        projector = INVERT_STEPS * inv["median_s"] + tune_s
        paths = {"projector": projector}
        for key, row in enc.items():
            if "batch 1" in key:
                paths[key.split(" batch")[0]] = row["median_s"] + tune_s
        row = {
            "config": name,
            "threads": threads,
            "encoder": enc,
            "invert_step": inv,
            "tune_step_locality": tun,
            "per_image_s": paths,
            "encoder_path_over_projector_path": {k: v / projector for k, v in paths.items() if k != "projector"},
            "pivot_s": {"projector": INVERT_STEPS * inv["median_s"], **{k: v - tune_s for k, v in paths.items()}},
        }
        rows.append(row)
        print(
            f"  invert step {inv['median_s']:.3f} s, tune step+locality {tun['median_s']:.3f} s; per image: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in paths.items())
            + "; encoder/projector "
            + ", ".join(f"{k} {v:.2f}" for k, v in row["encoder_path_over_projector_path"].items()),
            flush=True,
        )
    result = {
        "device": "cpu",
        "precision": "fp32",
        "impl": "ref",
        "environment": environment(torch.device("cpu")),
        "load_average_after": os.getloadavg(),
        "recipe": {"invert_steps": INVERT_STEPS, "tune_steps": TUNE_STEPS, "locality_interval": 1},
        "notes": __doc__.split("\n\n", 2)[2].strip(),
        "total_seconds": time.perf_counter() - started,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['total_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
