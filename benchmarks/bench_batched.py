"""Seconds per regularized tuning step: the pivot and the locality sample rendered separately or batched.

    python -m benchmarks.bench_batched [--repeats 9] [--warmup 2] [--configs tiny,paper256] [--append]

A "step" here is the forward and backward of the four terms `tune` computes on a regularized step with one
locality sample (MSE + LPIPS at the pivot, 0.1 MSE + 0.1 LPIPS against the frozen original at w_r), Adam
excluded in every variant:

    separate              `pivot_terms` + `locality_terms` (pti.engine.tune): two tuned renders at batch 1,
                          two perceptual calls
    batched               `pivot_and_locality_terms` (pti.engine.batched): one tuned render of [pivot, w_r]
                          with noise ('const', 'none'), one perceptual call on both pairs
    batched-shared        batched, the tuned render's convolutions in the shared-weight form
                          (fused_modconv=False: one convolution over the batch, not one group per sample)
    *+cl                  the same with the LPIPS net's weights and its input images in channels_last
    batched+cl-synthesis  batched+cl, and the synthesis convolutions' weights in channels_last as well

The variants run interleaved (each repeat runs every variant once, in a rotating order), so a busy shared
machine slows them alike; the first `--warmup` repeats are dropped. Reported: the median, min and max of the
rest, the median of the per-repeat ratios to `separate` (paired: the two ran back to back), and the ratio of
the fastest steps (the least disturbed by other processes). Threads: 1 for the tiny generator, 2 for
paper256 (pti's policy for these sizes on this CPU).
Generators: the built-in tiny one (64 px) and paper256 (256 px config-f, random weights, fp32); LPIPS-alex
v0.1 with random weights (the real architecture, so the real cost). fp32, the reference ops (`G.impl="ref"`).
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

from pti.benchmark import build
from pti.engine.batched import pivot_and_locality_terms
from pti.engine.losses import LPIPSPerceptual
from pti.engine.tune import TuneConfig, _prepare, locality_terms, locality_ws, pivot_terms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the random-weight LPIPS is a test helper
import helpers  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "batched_cpu.json"
THREADS = {"tiny": 1, "paper256": 2}
VARIANTS = ("separate", "batched", "batched-shared", "separate+cl", "batched+cl", "batched+cl-synthesis")
CL = torch.channels_last


class ChannelsLastPerceptual:
    """An LPIPS perceptual with its weights and its input images in channels_last (the same values)."""

    def __init__(self, perceptual: LPIPSPerceptual):
        self.inner = LPIPSPerceptual(copy.deepcopy(perceptual.net).to(memory_format=CL), perceptual.name)

    def __call__(self, a, b):
        return self.inner(a.contiguous(memory_format=CL), b.contiguous(memory_format=CL))


def channels_last_weights(G_tuned):
    """A copy of the tuned generator whose 4-D synthesis weights are channels_last (the same values)."""
    G = copy.deepcopy(G_tuned)
    with torch.no_grad():
        for p in G.synthesis.parameters():
            if p.ndim == 4:
                p.data = p.data.contiguous(memory_format=CL)
    return G


def steps(G, perceptual, seed: int = 7) -> dict:
    """One step function per variant: forward and backward of the four terms, the gradient left in place."""
    G_tuned, G_orig = _prepare(G)
    G_tuned.impl = G_orig.impl = "ref"
    G_tuned_cl = channels_last_weights(G_tuned)
    perceptual_cl = ChannelsLastPerceptual(perceptual)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        target = G.synthesis(G.mapping(torch.randn([1, G.z_dim], generator=g), truncation_psi=0.7), noise_mode="const")
        pivot = G.mapping(torch.randn([1, G.z_dim], generator=g), truncation_psi=0.5)
    (w_r,) = locality_ws(G_orig, pivot, TuneConfig(), torch.Generator().manual_seed(seed))

    def separate(Gt, lp):
        l2, p = pivot_terms(Gt.synthesis, lp, pivot, target, "fp32")
        reg_l2, reg_p = locality_terms(Gt.synthesis, G_orig.synthesis, lp, w_r, "fp32")
        return l2, p, reg_l2, reg_p

    def batched(Gt, lp, fused_modconv=None):
        return pivot_and_locality_terms(
            Gt.synthesis, G_orig.synthesis, lp, pivot, target, w_r, "fp32", fused_modconv=fused_modconv
        )

    def batched_shared(Gt, lp):
        return batched(Gt, lp, fused_modconv=False)

    def step(terms, Gt, lp):
        def run():
            Gt.synthesis.zero_grad(set_to_none=True)
            l2, p, reg_l2, reg_p = terms(Gt, lp)
            (l2 + p + 0.1 * reg_l2 + 0.1 * reg_p).backward()
            return [float(t.detach()) for t in (l2, p, reg_l2, reg_p)]

        return run

    return {
        "separate": step(separate, G_tuned, perceptual),
        "batched": step(batched, G_tuned, perceptual),
        "batched-shared": step(batched_shared, G_tuned, perceptual),
        "separate+cl": step(separate, G_tuned, perceptual_cl),
        "batched+cl": step(batched, G_tuned, perceptual_cl),
        "batched+cl-synthesis": step(batched, G_tuned_cl, perceptual_cl),
    }


def measure(fns: dict, repeats: int, warmup: int) -> dict:
    """Interleaved timing: repeat r runs every variant once, starting at variant r mod V."""
    names = list(fns)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    terms = {}
    for r in range(warmup + repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            t0, c0 = time.perf_counter(), time.process_time()
            terms[name] = fns[name]()
            t1, c1 = time.perf_counter(), time.process_time()
            if r >= warmup:
                wall[name].append(t1 - t0)
                cpu[name].append(c1 - c0)
    out = {}
    for n in names:
        med = statistics.median(wall[n])
        out[n] = {
            "median_s": med,
            "min_s": min(wall[n]),
            "max_s": max(wall[n]),
            "spread": (max(wall[n]) - min(wall[n])) / med,
            "cpu_median_s": statistics.median(cpu[n]),
            "all_s": wall[n],
            "terms": terms[n],  # l2, lpips, reg_l2, reg_lpips of the last step (the variants compute the same)
        }
    return out


def paired_speedups(row: dict) -> dict:
    """Median over repeats of separate / variant within the same repeat: each repeat runs every variant once,
    back to back, so the pair saw about the same load (steadier than the ratio of medians on a busy machine)."""
    sep = row["variants"]["separate"]["all_s"]
    return {v: statistics.median(a / b for a, b in zip(sep, r["all_s"])) for v, r in row["variants"].items()}


def min_speedups(row: dict) -> dict:
    """separate's fastest step over each variant's fastest: other processes only ever add time, so on a busy
    machine the fastest step is the best estimate of a variant's own cost."""
    sep = row["variants"]["separate"]["min_s"]
    return {v: sep / r["min_s"] for v, r in row["variants"].items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9, help="timed steps per variant (median of these)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds of every variant first")
    ap.add_argument("--configs", default="tiny,paper256")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true", help="add this run to the runs already in --out")
    ap.add_argument("--machine", default=f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})")
    args = ap.parse_args(argv)
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(THREADS))
    if unknown:
        ap.error(f"--configs takes {', '.join(THREADS)}, not {', '.join(unknown)}")
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be at least 1 and --warmup at least 0")

    started, started_at = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = os.getloadavg()
    perceptual = helpers.random_lpips(seed=1)
    rows = []
    for name in configs:
        torch.set_num_threads(THREADS[name])
        G = build(name)
        by_variant = measure(steps(G, perceptual), args.repeats, args.warmup)
        base = by_variant["separate"]["median_s"]
        row = {
            "config": name,
            "resolution": G.img_resolution,
            "threads": torch.get_num_threads(),
            "variants": by_variant,
            "speedup_vs_separate": {v: base / r["median_s"] for v, r in by_variant.items()},
        }
        row["paired_speedup_vs_separate"] = paired_speedups(row)
        row["min_speedup_vs_separate"] = min_speedups(row)
        rows.append(row)
        print(_line(row), flush=True)

    run = {
        "machine": args.machine,
        "device": "cpu",
        "precision": "fp32",
        "impl": "ref",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "started": started_at,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "total_seconds": time.perf_counter() - started,
        "rows": rows,
    }
    previous = []
    if args.append and args.out.exists():
        previous = json.loads(args.out.read_text()).get("runs", [])
        for earlier in previous:  # runs written before the paired ratios were recorded: derived from their times
            for row in earlier["rows"]:
                row.setdefault("paired_speedup_vs_separate", paired_speedups(row))
                row.setdefault("min_speedup_vs_separate", min_speedups(row))
    result = {
        "benchmark": "benchmarks.bench_batched",
        "notes": (
            "Wall seconds per regularized tuning step (forward + backward of the pivot and locality terms, Adam "
            "excluded); variants interleaved in one run; cpu_median_s is process CPU time (all threads). "
            "The machine is shared: compare variants within a run, and runs with each other."
        ),
        "runs": previous + [run],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{run['machine']}, torch {run['torch']}, fp32, ref; wrote {args.out} ({run['total_seconds']:.0f} s)")
    return result


def _line(row: dict) -> str:
    parts = [f"{row['config']:>9} ({row['threads']} thr)"]
    for v, r in row["variants"].items():
        parts.append(
            f"{v} {r['median_s'] * 1e3:7.1f} ms [{r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}] "
            f"({row['speedup_vs_separate'][v]:.2f}x, paired {row['paired_speedup_vs_separate'][v]:.2f}x, "
            f"min {row['min_speedup_vs_separate'][v]:.2f}x)"
        )
    return " | ".join(parts)


if __name__ == "__main__":
    main()
