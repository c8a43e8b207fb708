"""The offline GPU check (benchmarks/gpu_check.sh) in its CPU mode, so that it cannot rot where no GPU is: the
rows it writes as it goes, the stage budgets that cut and kill, and pti running where dlib is not installed
(as on the GPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from clirun import env_with, error_lines, no_traceback, run_pti

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def check(out: Path, *args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the script in CPU mode without installing (this venv has pti), results under `out`."""
    env = env_with(OUT=str(out), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(
        ["bash", str(SCRIPT), "--cpu", "--no-install", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    return p, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_cpu_mode_runs_every_stage_and_writes_its_rows(tmp_path):
    """Every stage of the CPU mode runs (a kernel test file under the interpreter, render rows, tune rows),
    each row in the JSON says which stage wrote it, what ran, in which precision and with which flags."""
    p, doc = check(tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    assert (doc["mode"], doc["complete"]) == ("cpu", True)
    stages = {s["stage"]: s for s in doc["stages"]}
    assert list(stages) == ["kernel-tests", "render-ref", "render-triton", "tune"]
    assert all(s["status"] == "ok" and s["rc"] == 0 and s["seconds"] <= s["budget_seconds"] for s in stages.values())
    assert "passed" in stages["kernel-tests"]["detail"] and "failed" not in stages["kernel-tests"]["detail"]
    assert doc["environment"]["device"] == "cpu" and doc["auto"] == "ref"
    render = [r for r in doc["rows"] if r["kind"] == "render" and r["status"] == "ok"]
    assert {(r["stage"], r["implementation"], r["precision"], r["batch"]) for r in render} == {
        ("render-ref", "ref", p, b) for p in ("fp32", "tf32", "bf16") for b in (1, 2)
    }
    for r in render:
        assert r["flags"]["tf32_matmul"] == r["flags"]["tf32_cudnn"] == (r["precision"] == "tf32"), r
        assert ("autocast" in r["flags"]) == (r["precision"] == "bf16") and r["device_name"] and r["threads"] >= 1
    skipped = {(r["stage"], r["implementation"], r["cuda_graph"]) for r in doc["rows"] if r["status"] == "skipped"}
    assert skipped == {("render-ref", "ref", True), ("render-triton", "triton", False)}  # no CUDA here
    tune = [(r["stage"], r["implementation"], r["phase"]) for r in doc["rows"] if r["kind"] == "tune"]
    assert tune == [("tune", "ref", ph) for ph in ("invert", "tune", "tune+locality")]
    assert [r["locality"] for r in doc["rows"] if r["kind"] == "recipe"] == [False, True]
    assert (tmp_path / "kernel-tests.xml").is_file() and "render ref" in (tmp_path / "gpu_check.log").read_text()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log", "kernel-tests.xml"]


def test_a_stage_out_of_budget_is_cut_and_the_run_keeps_its_rows(tmp_path):
    """Three ways a stage runs out of time, each recorded: a measuring stage whose budget is spent before it
    measures anything stops itself and lists what it left out ("cut"); a stage still running past its budget
    is killed with its process group ("killed"); a stage with no time left does not start ("cut"). The run
    still ends with a complete JSON and says, by exit code 1, that not everything ran."""
    p, doc = check(
        tmp_path,
        *["--only", "kernel-tests,render-ref,tune", "--grace", "60"],
        *["--budget", "kernel-tests=0.5", "--budget", "render-ref=0.01", "--budget", "tune=0"],
    )
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr
    assert doc["complete"]
    stages = {s["stage"]: s for s in doc["stages"]}
    assert {name: s["status"] for name, s in stages.items()} == {
        "kernel-tests": "killed",
        "render-ref": "cut",
        "tune": "cut",
    }
    assert stages["kernel-tests"]["rc"] is None and stages["kernel-tests"]["seconds"] < 30
    assert stages["tune"]["detail"] == "no time left"
    (cut,) = [r for r in doc["rows"] if r["kind"] == "cut"]
    assert (
        cut["stage"] == "render-ref" and len(cut["left_out"]) == 2 * 3 * 2
    )  # eager and graph, 3 precisions, 2 batches
    assert not [r for r in doc["rows"] if r["kind"] in ("render", "tune")]


@pytest.mark.slow
def test_pti_runs_where_dlib_is_not_installed(tmp_path):
    """With a dlib that fails to import (a module of that name raising ImportError, first on the path): the
    CLI imports, `--help` and a tiny CPU bench run, and only finding a face fails, in one line."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "dlib.py").write_text("raise ImportError('no dlib on this machine (a test shim)')\n")
    env = env_with(PYTHONPATH=os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]))
    probe = subprocess.run(
        [sys.executable, "-c", "import pti.cli, pti.benchmark, pti.rendering, pti.pipeline"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr
    for args in (["--help"], ["bench", "--help"]):
        p = run_pti(*args, env=env)
        assert p.returncode == 0 and no_traceback(p), (args, p.stderr)
    out = tmp_path / "b.json"
    fast = ["--config", "tiny", "--impl", "ref", "--batches", "1", "--tune-steps", "0", "--device", "cpu"]
    p = run_pti("bench", *fast, "-o", out, env=env)
    assert p.returncode == 0 and no_traceback(p), p.stderr
    assert json.loads(out.read_text())["rows"][0]["status"] == "ok"
    Image.new("RGB", (64, 64), (128, 100, 90)).save(tmp_path / "face.png")
    p = run_pti("align", tmp_path / "face.png", "-o", tmp_path / "aligned", env=env)
    assert p.returncode == 1 and no_traceback(p), p.stderr
    assert len(error_lines(p.stderr)) == 1 and "dlib is not installed" in p.stderr, p.stderr
