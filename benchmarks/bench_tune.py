"""Seconds per step of each PTI phase on this machine: inversion, tuning, tuning with locality.

    python -m benchmarks.bench_tune [--steps 5] [--warmup 1] [--configs tiny,paper256] [--impls ref,compile]
                                    [--threads auto|N]

Each phase runs the engine's own loop (`invert`, `tune`) and is timed between consecutive progress
callbacks, so a "step" is exactly what the engine does per step: forward, loss, backward, Adam. The
first `--warmup` steps (which also carry the phase's setup, and under `compile` the compiling) are
dropped; the median, min and max of the rest are reported, as wall-clock seconds and as process CPU
seconds (all threads).

Implementations (`--impls`, the engine's `impl` setting): `ref` and `compile` (torch.compile of the
step; its one-time compile is reported apart, as `compile_seconds`: the first step's wall time). Each
phase runs every implementation in the same process, one after the other, and `speedup_vs_ref` is
ref's median over the implementation's. `triton` runs on CPUs only in Triton's interpreter, which is
never a speed: it is not offered here (`pti bench` marks such rows). Threads: `auto` is pti's policy
(one thread for small generators, torch's count otherwise), as `pti tune` runs.

Generators: the built-in tiny one (64 px) and "paper256" (256 px config-f with channel_base 16384,
random weights, fp32: num_fp16_res 0 on CPU). Perceptual nets: the weight-free pair (MS-SSIM based)
and "nets": LPIPS-alex v0.1 with random weights (the real architecture, so the real cost) plus the
VGG16 TorchScript stand-in. The stand-in is two small convs: NVIDIA's real vgg16.pt at 256 px is
about 20 G multiply-adds per image, more than a paper256 synthesis forward, so real inversion steps
are heavier than the "nets" numbers here.

Reference comparison (optional): with PTI_SG2ADA_PATH pointing at a checkout of NVIDIA's
stylegan2-ada-pytorch, the same engine loop also drives NVIDIA's `training.networks.Generator`
(imported from the checkout, never copied) holding the same weights, phase by phase in the same
run, and the ratio ours / reference is reported. Both run their pure-PyTorch ops on CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pti.benchmark import CONFIGS as BENCH_CONFIGS
from pti.benchmark import build
from pti.engine.device import apply_cpu_threads
from pti.engine.generator import TINY_CONFIG, Generator

# The perceptual stand-ins (random-weight LPIPS, the VGG16 TorchScript stand-in) are test helpers:
# they live in tests/helpers.py, not in the library, so the benchmark puts tests/ on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import helpers  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "tune_cpu.json"

PAPER256 = BENCH_CONFIGS["paper256"]
CONFIGS = {"tiny": TINY_CONFIG, "paper256": PAPER256}
PHASES = ("invert step", "tune step", "tune step + locality")


def losses(kind: str, tmp: Path):
    """(projector metric, perceptual) for `kind`: 'weight-free' or 'nets'
    (random-weight LPIPS-alex + VGG16 stand-in)."""
    from pti.engine.losses import VGGProjectorMetric, WeightFreePerceptual, WeightFreeProjectorMetric
    from pti.engine.perceptual import VGG16Metric

    if kind == "weight-free":
        return WeightFreeProjectorMetric(), WeightFreePerceptual()
    vgg = VGG16Metric(helpers.make_scripted_vgg16_standin(tmp / "vgg16-standin.pt"))
    return VGGProjectorMetric(vgg), helpers.random_lpips(seed=1)


class _Clock:
    """A progress callback that timestamps every step (wall and process CPU time)."""

    def __init__(self):
        self.marks = [(time.perf_counter(), time.process_time())]
        self.compile_seconds = None

    def __call__(self, phase, step, total, values):
        if phase == "compile":  # the engine's report of its one-time compile (inside the first step)
            self.compile_seconds = values.get("seconds", self.compile_seconds)
            return
        self.marks.append((time.perf_counter(), time.process_time()))

    def per_step(self, warmup: int) -> dict:
        wall = [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:])][warmup:]
        cpu = [b[1] - a[1] for a, b in zip(self.marks, self.marks[1:])][warmup:]
        med = statistics.median(wall)
        return {
            "median_s": med,
            "min_s": min(wall),
            "max_s": max(wall),
            "spread": (max(wall) - min(wall)) / med,
            "cpu_median_s": statistics.median(cpu),
            "steps": len(wall),
            "all_s": wall,
        }


def run_phase(G, phase: str, metric, perceptual, steps: int, warmup: int, impl: str = "ref") -> dict:
    from pti.engine.invert import InvertConfig, invert
    from pti.engine.tune import TuneConfig, tune

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        target = G.synthesis(
            G.mapping(torch.randn([1, G.z_dim], generator=g), truncation_psi=0.7), noise_mode="const", force_fp32=True
        )
        pivot = G.mapping(torch.randn([1, G.z_dim], generator=g), truncation_psi=0.5)
    clock, n = _Clock(), steps + warmup
    if phase == "invert step":
        result = invert(G, target, metric, InvertConfig(steps=n, impl=impl), progress=clock)
    else:  # threshold 0: never stop early (the perceptual term of two different images is > 0)
        cfg = TuneConfig(max_steps=n, lpips_threshold=0.0, locality=phase.endswith("locality"), impl=impl)
        result = tune(G, target, pivot, perceptual, cfg, progress=clock)
    out = clock.per_step(warmup)
    out["impl"] = {k: v for k, v in result.impl.items() if k != "ops"}
    return out


# ---------------------------------------------------------------------------- NVIDIA's networks, driven by our loop


class _RefMapping(torch.nn.Module):
    """NVIDIA's mapping takes c positionally; our loop calls mapping(z, truncation_psi=...)."""

    def __init__(self, mapping):
        super().__init__()
        self.net = mapping

    def forward(self, z, c=None, truncation_psi=1.0, truncation_cutoff=None):
        return self.net(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)


class _RefGenerator(torch.nn.Module):
    """NVIDIA's Generator with the two methods our engine expects (mapping without c, clone)."""

    def __init__(self, G_nv):
        super().__init__()
        self.synthesis, self.mapping = G_nv.synthesis, _RefMapping(G_nv.mapping)
        for k in ("z_dim", "w_dim", "num_ws", "img_resolution", "img_channels"):
            setattr(self, k, getattr(G_nv, k))

    def clone(self):
        return copy.deepcopy(self)


def reference_generator(name: str, ours: Generator):
    path = os.environ.get("PTI_SG2ADA_PATH")
    if not path:
        return None
    sys.path.insert(0, path)
    from training import networks as nv_net  # NVIDIA's code from the user's checkout, run side by side

    G_nv = nv_net.Generator(**copy.deepcopy(CONFIGS[name])).eval()
    G_nv.load_state_dict(ours.state_dict(), strict=True)  # the same weights in both
    return _RefGenerator(G_nv).eval().requires_grad_(False)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    ap.add_argument("--warmup", type=int, default=1, help="steps dropped first (they include setup)")
    ap.add_argument("--configs", default="tiny,paper256")
    ap.add_argument("--losses", default="weight-free,nets")
    ap.add_argument("--impls", default="ref,compile", help="the engine's impl settings to time, in one run")
    ap.add_argument("--threads", default="auto", help="torch threads: auto (pti's policy per generator) or N")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--machine", default=f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})")
    args = ap.parse_args(argv)
    impls = args.impls.split(",")
    if not set(impls) <= {"ref", "compile"}:
        ap.error(f"--impls takes ref and compile, not {args.impls!r}")

    rows, tmp = [], Path(tempfile.mkdtemp())
    started = time.perf_counter()
    for cfg_name in args.configs.split(","):
        G = build(cfg_name)
        threads = apply_cpu_threads(G, torch.device("cpu"), args.threads)
        G_ref = reference_generator(cfg_name, G)
        for loss_kind in args.losses.split(","):
            metric, perceptual = losses(loss_kind, tmp)
            for phase in PHASES:
                by_impl = {i: run_phase(G, phase, metric, perceptual, args.steps, args.warmup, i) for i in impls}
                row = {
                    "config": cfg_name,
                    "losses": loss_kind,
                    "phase": phase,
                    "threads": threads,
                    "ours": by_impl.get("ref", by_impl[impls[0]]),
                    "by_impl": by_impl,
                    "speedup_vs_ref": {
                        i: by_impl["ref"]["median_s"] / r["median_s"] for i, r in by_impl.items() if "ref" in by_impl
                    },
                }
                if G_ref is not None:
                    row["reference"] = run_phase(G_ref, phase, metric, perceptual, args.steps, args.warmup)
                    row["ratio_ours_over_reference"] = row["ours"]["median_s"] / row["reference"]["median_s"]
                rows.append(row)
                print(_line(row), flush=True)

    result = {
        "machine": args.machine,
        "device": "cpu",
        "precision": "fp32",
        "torch": torch.__version__,
        "threads": args.threads,
        "load_average_after": os.getloadavg(),
        "python": platform.python_version(),
        "steps": args.steps,
        "warmup": args.warmup,
        "reference": os.environ.get("PTI_SG2ADA_PATH")
        and "NVlabs stylegan2-ada-pytorch training.networks (CPU, ref ops)",
        "notes": (
            "nets = LPIPS-alex v0.1 (random weights, real architecture) + the 2-conv VGG16 stand-in; "
            "NVIDIA's real vgg16.pt is about 20 G MACs per 256 px image, so real inversion steps cost more. "
            "Wall seconds per step; cpu_median_s is process CPU time (all threads)."
        ),
        "total_seconds": time.perf_counter() - started,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"\n{result['machine']}, torch {result['torch']}, {result['threads']} threads, fp32; "
        f"wrote {args.out} ({result['total_seconds']:.0f} s)"
    )
    return result


def _line(row: dict) -> str:
    o = row["ours"]
    s = (
        f"{row['config']:>9} {row['losses']:>11} {row['phase']:<21} {o['median_s']:8.3f} s/step "
        f"[{o['min_s']:.3f}-{o['max_s']:.3f}] cpu {o['cpu_median_s']:.3f}"
    )
    for impl, r in row.get("by_impl", {}).items():
        if impl != "ref":
            c = r["impl"].get("compile_seconds")
            s += f" | {impl} {r['median_s']:8.3f} s/step ({row['speedup_vs_ref'][impl]:.2f}x ref" + (
                f", compiled in {c:.0f} s)" if c else ")"
            )
    if "reference" in row:
        r = row["reference"]
        s += (
            f" | ref {r['median_s']:8.3f} [{r['min_s']:.3f}-{r['max_s']:.3f}] ours/ref "
            f"{row['ratio_ours_over_reference']:.2f}"
        )
    return s


if __name__ == "__main__":
    main()
