"""`pti bench` through the installed console script: rows for every implementation and phase asked for."""

from __future__ import annotations

import json

import pytest

from clirun import no_traceback, run_pti


def test_bench_writes_render_and_tune_rows(tmp_path):
    out = tmp_path / "b.json"
    p = run_pti("bench", "--config", "tiny", "--impl", "reference,triton,cudagraph", "--batches", "1,2", "--repeats", "1",
                "--tune-steps", "2", "--device", "cpu", "-o", out)
    assert p.returncode == 0, p.stderr
    assert "triton: needs a CUDA device; skipped" in p.stdout and "cudagraph: needs a CUDA device; skipped" in p.stdout
    result = json.loads(out.read_text())
    render = [r for r in result["rows"] if r["kind"] == "render"]
    assert [(r["implementation"], r["batch"]) for r in render] == [("reference", 1), ("reference", 2)]
    assert all(r["images_per_second"] > 0 and r["ratio_to_reference"] == 1.0 and r["gflop_per_image"] > 0 for r in render)
    phases = [(r["implementation"], r["phase"]) for r in result["rows"] if r["kind"] == "tune"]
    assert phases == [("reference", "invert"), ("reference", "tune"), ("reference", "tune+locality")]  # no triton on CPU
    recipe = [r for r in result["rows"] if r["kind"] == "recipe"]
    assert [r["locality"] for r in recipe] == [False, True] and recipe[1]["projected_seconds"] > recipe[0]["projected_seconds"]
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
