"""The offline GPU check (issue 18): the kernel tests on CUDA, then render and tuning measurements, every row
written to $OUT/gpu_check.json as it is measured, each stage within a time budget, the whole within 9 minutes.

    bash benchmarks/gpu_check.sh                       # on the GPU machine: installs pti from .whl/, then this
    bash benchmarks/gpu_check.sh --cpu --no-install    # CPU mode, the tiny generator: what CI runs (tests/
                                                       # test_gpu_check.py), so that this cannot rot
    python -m benchmarks.gpu_check [--cpu] [--only STAGE,...] [--budget STAGE=SECONDS ...] [--total SECONDS]

Stages, in order, with their budgets in seconds (GPU mode; CPU mode in brackets):

    kernel-tests    120 [60]  pytest of the kernel tests; tests/tritonenv.py runs them on CUDA when there is
                              a GPU (CPU mode: tests/test_kernels_bias_act.py alone, under the interpreter)
    gpu-tests        45 [ -]  pytest -m gpu of the test files that have GPU tests (CUDA graphs equal eager,
                              a rebound weight is seen, ...)
    render-ref       60 [45]  ffhq1024 [tiny]: batch 1, 8, 32 [1, 2]; fp32, tf32, bf16; CUDA graphs off and on
    render-triton    50 [20]  the same for triton (CPU: skipped, unless TRITON_INTERPRET=1)
    tune            100 [45]  seconds per inversion / tuning / locality step, per precision: ref and triton,
                              then compile (whose one-time compile may use up the rest of the budget)
    render-compile   75 [ -]  the same as render-ref for compile (each batch and precision compiles once,
                              reported apart; on CUDA its mode replays CUDA graphs of its own)

Each stage runs in a child process of its own. It stops starting measurements when its budget is spent and
records what it left out (the stage is "cut"); 20 s later (--grace) it is killed (the stage is "killed").
Either way the rows it measured are in the JSON: each row is added to the file, atomically, as soon as it is
measured, so an interrupted run keeps its rows. The whole run ends within --total seconds (540, install
included: gpu_check.sh passes the time it started); a stage that would start too late is recorded as cut.

What comes back under $OUT: gpu_check.json (the stages, the environment and every row), gpu_check.log
(everything the stages printed), install.log (gpu_check.sh), and the pytest stages' JUnit XML files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOTAL_SECONDS = {"gpu": 540.0, "cpu": 240.0}
GRACE_SECONDS = 20.0  # after a stage's budget: the measurement in flight may finish and write its row


@dataclass(frozen=True)
class Stage:
    name: str
    budget: dict  # seconds per mode ("gpu", "cpu"); a mode without one does not run the stage
    what: str  # "pytest" or "measure"


STAGES = [
    Stage("kernel-tests", {"gpu": 120, "cpu": 60}, "pytest"),
    Stage("gpu-tests", {"gpu": 45}, "pytest"),
    Stage("render-ref", {"gpu": 60, "cpu": 45}, "measure"),
    Stage("render-triton", {"gpu": 50, "cpu": 20}, "measure"),
    Stage("tune", {"gpu": 100, "cpu": 45}, "measure"),
    Stage("render-compile", {"gpu": 75}, "measure"),
]
# What each mode measures.
MODES = {
    "gpu": dict(
        device="cuda",
        config="ffhq1024",
        batches=[1, 8, 32],
        precisions=["fp32", "tf32", "bf16"],
        tune_precisions=["fp32", "tf32", "bf16"],
        tune_impls=["ref", "triton", "compile"],
        repeats=10,
        warmup=3,
        tune_steps=5,
    ),
    "cpu": dict(
        device="cpu",
        config="tiny",
        batches=[1, 2],
        precisions=["fp32", "tf32", "bf16"],
        tune_precisions=["fp32"],
        tune_impls=["ref"],
        repeats=5,
        warmup=1,
        tune_steps=5,
    ),
}


def pytest_args(stage: str, mode: str, out: Path) -> list[str]:
    """The pytest command line of a pytest stage (verbose: a killed run's log still names each test)."""
    common = ["-m", "pytest", "-v", "-p", "no:cacheprovider", "--junitxml", str(out / f"{stage}.xml")]
    if stage == "kernel-tests" and mode == "gpu":  # every tests/test_kernels*.py, a few files in parallel
        files = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_kernels*.py"))
        return [*common, "-n", "4", "--dist", "loadfile", *files]
    if stage == "kernel-tests":  # CPU mode: one kernel file under the interpreter (seconds; CI runs them all)
        return [*common, "-n", "0", "tests/test_kernels_bias_act.py"]
    # the GPU-marked tests, in the files that have some (collecting the whole suite would import what this
    # machine lacks: selenium, ray, ...)
    files = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py") if "mark.gpu" in f.read_text())
    return [*common, "-n", "0", "-m", "gpu", "--continue-on-collection-errors", *files]


# ---------------------------------------------------------------------------- the results file


class Results:
    """$OUT/gpu_check.json: read, changed, and written back atomically (temp file, fsync, rename) at once."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict:
        return json.loads(self.path.read_text())

    def write(self, doc: dict) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def update(self, change) -> dict:
        doc = self.read()
        change(doc)
        self.write(doc)
        return doc


# ---------------------------------------------------------------------------- the driver


def budgets(mode: str, only: list[str] | None, overrides: dict[str, float]) -> list[tuple[Stage, float]]:
    out = []
    for stage in STAGES:
        if mode not in stage.budget or (only is not None and stage.name not in only):
            continue
        out.append((stage, float(overrides.get(stage.name, stage.budget[mode]))))
    return out


def drive(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    mode = "cpu" if args.cpu else "gpu"
    total = args.total if args.total is not None else TOTAL_SECONDS[mode]
    started = args.started if args.started is not None else time.time()
    end = started + total
    results = Results(out / "gpu_check.json")
    plan = budgets(mode, args.only.split(",") if args.only else None, dict(args.budget))
    results.write(
        {
            "what": "pti GPU check (benchmarks/gpu_check.py): kernel tests, render and tuning rows",
            "mode": mode,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "total_budget_seconds": total,
            "settings": MODES[mode],
            "stages": [],
            "rows": [],
            "complete": False,
        }
    )
    log = open(out / "gpu_check.log", "a", buffering=1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if mode == "gpu":
        env.pop("TRITON_INTERPRET", None)  # the kernels compiled for the GPU, not interpreted
    for stage, budget in plan:
        grace = args.grace if stage.what == "measure" else 0.0
        budget = min(budget, end - time.time() - grace)  # a kill, grace included, still within the total
        record = {"stage": stage.name, "budget_seconds": round(budget, 1)}
        if budget <= 0:
            results.update(lambda d: d["stages"].append({**record, "status": "cut", "detail": "no time left"}))
            say(log, f"== {stage.name}: cut (no time left of the {total:.0f} s)")
            continue
        results.update(lambda d: d["stages"].append({**record, "status": "running"}))
        say(log, f"== {stage.name} (budget {budget:.0f} s)")
        if stage.what == "pytest":
            cmd = [sys.executable, *pytest_args(stage.name, mode, out)]
        else:
            cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child", stage.name, "--out", str(out)]
            cmd += ["--deadline", str(time.time() + budget)] + (["--cpu"] if args.cpu else [])
        t0 = time.time()
        rc, killed, tail = run_child(cmd, env, budget + grace, log)
        seconds = round(time.time() - t0, 1)

        def finish(doc, stage=stage, rc=rc, killed=killed, tail=tail, seconds=seconds):
            cut = any(r.get("stage") == stage.name and r["kind"] == "cut" for r in doc["rows"])
            status = "killed" if killed else "cut" if cut else "ok" if rc == 0 else "failed"
            entry = next(s for s in doc["stages"] if s["stage"] == stage.name)
            entry.update(status=status, rc=rc, seconds=seconds, detail=tail)

        doc = results.update(finish)
        entry = next(s for s in doc["stages"] if s["stage"] == stage.name)
        say(log, f"== {stage.name}: {entry['status']} in {seconds:.0f} s ({entry['detail']})")
    doc = results.update(lambda d: d.update(complete=True, seconds=round(time.time() - started, 1)))
    say(
        log,
        f"wrote {results.path}: {len(doc['rows'])} rows; "
        + ", ".join(f"{s['stage']} {s['status']}" for s in doc["stages"]),
    )
    log.close()
    return 0 if all(s["status"] == "ok" for s in doc["stages"]) else 1


def say(log, line: str) -> None:
    print(line, flush=True)
    log.write(line + "\n")


def run_child(cmd: list[str], env: dict, timeout: float, log) -> tuple[int | None, bool, str]:
    """Run `cmd` in a process group of its own, its output into the log and onto stdout; kill the group
    when `timeout` passes. (exit code or None, killed, the last line that says how it went)."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    last: list[str] = []

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            if line.strip():
                last.append(line.strip())
                del last[:-50]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed = False
    try:
        proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        killed = True
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)  # the child and what it started (pytest workers, compile workers)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    return (None if killed else proc.returncode), killed, summary(last, killed, timeout)


def summary(lines: list[str], killed: bool, timeout: float) -> str:
    """One line for the stage record: pytest's closing line, or the last line printed."""
    verdict = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error)", ln)), None)
    text = (verdict or (lines[-1] if lines else "")).strip("= ")[:300]
    return f"killed after {timeout:.0f} s; last: {text}" if killed else text


# ---------------------------------------------------------------------------- a measuring stage (child)


def measure(stage: str, mode: str, deadline: float, out: Path) -> int:
    import torch

    from pti import benchmark as B
    from pti.engine.config import resolve_impl
    from pti.engine.device import apply_cpu_threads

    m = MODES[mode]
    device = torch.device(m["device"])
    results = Results(out / "gpu_check.json")
    G = B.build(m["config"], device)
    apply_cpu_threads(G, device, "auto")

    def first(doc):
        doc.setdefault("environment", B.environment(device))
        doc.setdefault("auto", resolve_impl("auto", device))

    results.update(first)

    def on_row(row: dict) -> None:
        results.update(lambda doc: doc["rows"].append({"stage": stage, **row}))

    until = time.monotonic() + (deadline - time.time())
    if stage.startswith("render-"):
        impl = stage.removeprefix("render-")
        B.render_rows(
            G, device, m["batches"], [impl], m["precisions"], "both", m["repeats"], m["warmup"], print, on_row, until
        )
    else:  # precision by precision, compile last: its first step compiles, which may take the rest of the budget
        groups = [[i for i in m["tune_impls"] if i != "compile"], [i for i in m["tune_impls"] if i == "compile"]]
        for impls in filter(None, groups):
            for precision in m["tune_precisions"]:
                B.tune_rows(G, device, impls, [precision], m["tune_steps"], 1, print, on_row, until)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU mode: the tiny generator (what CI runs)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="results folder (default $OUT)")
    p.add_argument("--only", help="comma-separated stages to run (default: all of the mode's)")
    p.add_argument(
        "--budget", action="append", default=[], type=_budget, metavar="STAGE=SECONDS", help="a stage's budget"
    )
    p.add_argument("--total", type=float, help="seconds for the whole run (default 540; CPU mode 240)")
    p.add_argument("--grace", type=float, default=GRACE_SECONDS, help="seconds past a budget before a kill")
    p.add_argument("--started", type=float, help="when the run started (epoch seconds; gpu_check.sh passes it)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = {s.name for s in STAGES}
    for name in [n for n, _ in args.budget] + (args.only.split(",") if args.only else []):
        if name not in names:
            p.error(f"unknown stage {name!r}; stages: {', '.join(names)}")
    if args.child:
        return measure(args.child, "cpu" if args.cpu else "gpu", args.deadline, Path(args.out).resolve())
    return drive(args)


def _budget(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    try:
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use STAGE=SECONDS") from None


if __name__ == "__main__":
    sys.exit(main())
