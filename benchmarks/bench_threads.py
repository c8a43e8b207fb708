"""The CLI's CPU thread policy, idle and with one core busy: wall seconds of whole `pti` runs.

    python -m benchmarks.bench_threads [--repeats 2] [--workloads demo,paper256] [--policies pti,torch,one]

Workloads (each a real `pti` subprocess, timed from start to exit):
- demo: `pti demo` (the README's offline demo: tiny 64 px generator, 450 + up to 350 steps);
- paper256: `pti tune` on the same photo with a random-weight 256 px config-f generator
  (channel_base 16384) for a few steps, to show the policy costs nothing where threads pay off.
Policies (selected with the PTI_THREADS environment variable):
- pti: the default policy (OMP_WAIT_POLICY=PASSIVE; one thread for generators under 2 G multiply-adds);
- torch: PTI_THREADS=torch, torch's own defaults (spinning OpenMP threads, one per core);
- one: PTI_THREADS=1.
Loads: idle, and "busy" with another process spinning on one core for the whole run.
Writes the medians and every run to benchmarks/results/threads_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "threads_cpu.json"
POLICIES = {"pti": {}, "torch": {"PTI_THREADS": "torch"}, "one": {"PTI_THREADS": "1"}}
PAPER256 = dict(
    z_dim=512,
    w_dim=512,
    img_resolution=256,
    img_channels=3,
    synthesis_kwargs=dict(channel_base=16384, channel_max=512, num_fp16_res=0, conv_clamp=256),
)


def pti_exe() -> str:
    return str(Path(sys.executable).parent / "pti")


def make_inputs(tmp: Path) -> dict[str, list[str]]:
    """The command line of each workload (inputs written to `tmp`)."""
    import skimage.data
    import torch
    from PIL import Image

    from pti.engine.checkpoint import save_generator
    from pti.engine.generator import Generator

    photo = tmp / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    torch.manual_seed(0)
    save_generator(Generator(**PAPER256), tmp / "paper256.safetensors")
    return {
        "demo": [pti_exe(), "demo", "--out", str(tmp / "demo"), "--device", "cpu"],
        "paper256": [
            pti_exe(),
            "tune",
            str(photo),
            "-n",
            str(tmp / "paper256.safetensors"),
            "-o",
            str(tmp / "p256"),
            "--invert-steps",
            "10",
            "--tune-steps",
            "5",
            "--device",
            "cpu",
        ],
    }


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return seconds


def busy_core() -> subprocess.Popen:
    """Another process holding one core for as long as it runs."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workloads", default="demo,paper256")
    ap.add_argument("--policies", default="pti,torch,one")
    args = ap.parse_args()
    import torch

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        commands = make_inputs(Path(tmp))
        for workload in args.workloads.split(","):
            for load in ("idle", "busy"):
                for policy in args.policies.split(","):
                    env = {**os.environ, **POLICIES[policy]}
                    env.pop("OMP_WAIT_POLICY", None)
                    env.pop("OMP_NUM_THREADS", None)
                    for rep in range(args.repeats):
                        hog = busy_core() if load == "busy" else None
                        try:
                            seconds = timed(commands[workload], env)
                        finally:
                            if hog is not None:
                                hog.kill()
                                hog.wait()
                        runs.append(dict(workload=workload, load=load, policy=policy, repeat=rep, seconds=seconds))
                        print(f"{workload:9s} {load:5s} {policy:6s} #{rep}: {seconds:7.1f} s", flush=True)
    medians = {}
    for r in runs:
        medians.setdefault((r["workload"], r["load"], r["policy"]), []).append(r["seconds"])
    rows = [
        dict(
            workload=w,
            load=ld,
            policy=p,
            median_seconds=round(statistics.median(v), 2),
            min_seconds=round(min(v), 2),
            max_seconds=round(max(v), 2),
            n=len(v),
        )
        for (w, ld, p), v in medians.items()
    ]
    result = {
        "what": "wall seconds of whole pti runs per CPU-thread policy, idle and with one core busy",
        "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs, no GPU",
        "device": "cpu",
        "precision": "fp32",
        "implementation": "reference PyTorch ops",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "policies": {
            "pti": "OMP_WAIT_POLICY=PASSIVE; 1 thread below 2 G multiply-adds per image",
            "torch": "PTI_THREADS=torch: torch defaults",
            "one": "PTI_THREADS=1",
        },
        "rows": rows,
        "runs": runs,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'workload':9s} {'load':5s} " + " ".join(f"{p:>8s}" for p in args.policies.split(",")))
    for w in args.workloads.split(","):
        for load in ("idle", "busy"):
            cells = [medians.get((w, load, p)) for p in args.policies.split(",")]
            print(f"{w:9s} {load:5s} " + " ".join(f"{statistics.median(c):7.1f}s" if c else "      -" for c in cells))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
