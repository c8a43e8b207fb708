"""`pti bench` through the installed console script: rows for every implementation and phase asked for."""

from __future__ import annotations

import json
import re

import pytest

from clirun import can_drop_dac, drop_dac, error_lines, no_traceback, run_pti


def test_bench_writes_render_and_tune_rows(tmp_path):
    out = tmp_path / "b.json"
    p = run_pti(
        "bench",
        "--config",
        "tiny",
        "--impl",
        "reference,triton,cudagraph",
        "--batches",
        "1,2",
        "--repeats",
        "1",
        "--tune-steps",
        "2",
        "--device",
        "cpu",
        "-o",
        out,
    )
    assert p.returncode == 0, p.stderr
    assert "triton: needs a CUDA device; skipped" in p.stdout and "cudagraph: needs a CUDA device; skipped" in p.stdout
    result = json.loads(out.read_text())
    render = [r for r in result["rows"] if r["kind"] == "render"]
    assert [(r["implementation"], r["batch"]) for r in render] == [("reference", 1), ("reference", 2)]
    assert all(
        r["images_per_second"] > 0 and r["speedup_vs_reference"] == 1.0 and r["gflop_per_image"] > 0 for r in render
    )
    phases = [(r["implementation"], r["phase"]) for r in result["rows"] if r["kind"] == "tune"]
    assert phases == [
        ("reference", "invert"),
        ("reference", "tune"),
        ("reference", "tune+locality"),
    ]  # no triton on CPU
    recipe = [r for r in result["rows"] if r["kind"] == "recipe"]
    assert [r["locality"] for r in recipe] == [False, True] and recipe[1]["projected_seconds"] > recipe[0][
        "projected_seconds"
    ]
    assert result["environment"]["device"] == "cpu"


def test_bench_usage_errors_exit_2(tmp_path):
    for args in (["--impl", "cuda"], ["--batches", "0"], ["--precision", "fp8"]):
        p = run_pti("bench", *args, "-o", tmp_path / "x.json")
        assert p.returncode == 2 and no_traceback(p), args


@pytest.mark.gpu
def test_cuda_graph_replays_the_same_images():
    """The graphed renderer: the same pixels as the eager call it recorded, for new inputs, per batch size."""
    import torch

    from pti.benchmark import cuda_graphed
    from pti.engine.generator import tiny_generator

    G = tiny_generator("cuda")
    eager = lambda ws: G.synthesis(ws, noise_mode="const", force_fp32=True, impl="ref")  # noqa: E731
    graphed = cuda_graphed(eager, torch.device("cuda"))
    with torch.no_grad():
        for batch, seed in ((2, 0), (2, 1), (3, 2)):
            ws = G.mapping(torch.randn(batch, G.z_dim, generator=torch.Generator().manual_seed(seed)).cuda())
            want = eager(ws)
            got = graphed(ws).clone()
            assert torch.equal(got, want), (batch, seed, (got - want).abs().max().item())


FAST = [
    "--config",
    "tiny",
    "--impl",
    "reference",
    "--batches",
    "1",
    "--repeats",
    "1",
    "--tune-steps",
    "0",
    "--device",
    "cpu",
]


@pytest.mark.slow
def test_bench_checks_its_output_before_measuring(tmp_path):
    """A folder given as the JSON file, a file where a folder must be, a read-only folder: one line, no
    benchmark run."""
    (tmp_path / "a-file").write_text("x")
    cases = [(tmp_path, "it is a folder"), (tmp_path / "a-file" / "b.json", "is a file, not a folder")]
    if can_drop_dac():
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        cases.append((locked / "b.json", "permission denied"))
    for out, needle in cases:
        p = run_pti("bench", *FAST, "-o", out, preexec_fn=drop_dac if can_drop_dac() else None)
        assert p.returncode == 1 and no_traceback(p), (out, p.stdout, p.stderr)
        assert error_lines(p.stderr) == [error_lines(p.stderr)[0]] and needle in p.stderr, (out, p.stderr)
        assert "img/s" not in p.stdout, (out, p.stdout)  # checked before any measurement


@pytest.mark.slow
def test_bench_says_faster_or_slower_as_measured(tmp_path):
    """The printed comparison matches the JSON: speedup = reference time / this time, > 1 is faster."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "b.json"
    p = run_pti(
        "bench",
        "--config",
        "tiny",
        "--impl",
        "reference,onnx",
        "--batches",
        "1,2",
        "--repeats",
        "1",
        "--tune-steps",
        "0",
        "--device",
        "cpu",
        "-o",
        out,
    )
    assert p.returncode == 0, p.stderr
    assert " of reference" not in p.stdout, p.stdout
    render = [r for r in json.loads(out.read_text())["rows"] if r["kind"] == "render"]
    ref = {r["batch"]: r for r in render if r["implementation"] == "reference"}
    others = [r for r in render if r["implementation"] != "reference"]
    assert others and all(r["speedup_vs_reference"] == 1.0 for r in ref.values()), render
    for r in others:
        s, base = r["speedup_vs_reference"], ref[r["batch"]]
        # images/s are rounded to 0.01 and the speedup to 0.001: the two ratios agree within those roundings
        slack = 5e-4 + s * 5e-3 * (1 / r["images_per_second"] + 1 / base["images_per_second"]) + 1e-9
        assert abs(s - r["images_per_second"] / base["images_per_second"]) <= slack, (r, base)
        line = next(
            line
            for line in p.stdout.splitlines()
            if re.match(rf"render {r['implementation']}\s.*batch\s+{r['batch']}:", line)
        )
        said = re.search(r"(\d+\.\d\d)x (faster|slower) than reference|(same speed as) reference", line)
        assert said, line
        if said.group(3):
            assert abs(s - 1) < 0.01, (line, s)
            continue
        number, way = float(said.group(1)), said.group(2)
        assert way == ("faster" if s > 1 else "slower"), (line, s)
        # the printed figure (2 decimals) against the JSON's speedup (3 decimals), both directions of rounding
        want = s if s > 1 else 1 / s
        assert abs(number - want) <= 5e-3 + 5e-4 / min(s, 1) ** 2 + 1e-9, (line, s)
