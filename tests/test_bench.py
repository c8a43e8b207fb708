"""`pti bench` and its harness (pti.benchmark): rows that say what ran, a run that survives a failing
implementation, CUDA graphs keyed on everything that changes the computation, outputs that replace no file
unasked. CLI cases go through the installed console script; the harness's own functions are called directly."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clirun import can_drop_dac, drop_dac, env_with, error_lines, no_traceback, run_pti

TESTS = Path(__file__).resolve().parent

# The fastest complete run: tiny generator, reference only, no tuning.
FAST = ["--config", "tiny", "--impl", "ref", "--batches", "1", "--tune-steps", "0", "--device", "cpu"]
# What `pti.kernels.precision.precision_scope` sets, as every row must record it (on a CPU too).
FLAGS = {
    "fp32": {"tf32_matmul": False, "tf32_cudnn": False},
    "tf32": {"tf32_matmul": True, "tf32_cudnn": True},
    "bf16": {"tf32_matmul": False, "tf32_cudnn": False, "autocast": "cpu:bfloat16"},
}


def rows_of(path, kind=None, status=None) -> list[dict]:
    rows = json.loads(Path(path).read_text())["rows"]
    return [r for r in rows if (kind is None or r["kind"] == kind) and (status is None or r["status"] == status)]


def test_bench_render_rows_say_what_ran(tmp_path):
    """Every row: the implementation that ran and the one asked for (auto: recorded as what it resolved to),
    CUDA graph or not, the precision and the flags in effect inside its scope, the device's name and the
    thread count. Triton and CUDA graphs have no device here: one skipped row each, with the reason."""
    out = tmp_path / "b.json"
    p = run_pti(
        "bench",
        *["--config", "tiny", "--impl", "auto,triton", "--cuda-graphs", "both", "--precision", "fp32,tf32,bf16"],
        *["--batches", "1,2", "--tune-steps", "0", "--device", "cpu", "-o", out],
        env=env_with(TRITON_INTERPRET="0"),
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["auto"] == "ref" and doc["environment"]["device"] == "cpu"
    render = rows_of(out, "render", "ok")
    assert [(r["precision"], r["batch"]) for r in render] == [(p, b) for p in FLAGS for b in (1, 2)]
    for r in render:
        assert (r["implementation"], r["requested"], r["cuda_graph"], r["interpreter"]) == ("ref", "auto", False, False)
        assert r["flags"] == FLAGS[r["precision"]], r
        assert r["device_name"] == doc["environment"]["device_name"] != "" and r["threads"] >= 1, r
        assert r["images_per_second"] > 0 and r["speedup_vs_reference"] == 1.0 and r["percent_of_peak"] is None
        assert r["peak_basis"] == r["precision"] and r["peak_memory_gb"] is None  # no GPU: no memory figure
        assert r["repeats"] == 5 and r["first_call_seconds"] > 0 and r["compile_seconds"] is None
        # against the eager fp32 reference: itself in fp32 and tf32 (a CPU has no TF32), bf16's rounding in bf16
        assert (r["max_abs_diff_vs_ref_fp32"] == 0) == (r["precision"] != "bf16"), r
    skipped = rows_of(out, status="skipped")
    assert {(r["kind"], r["implementation"], r["cuda_graph"]) for r in skipped} == {
        ("render", "triton", False),
        ("render", "ref", True),
    }
    assert all("CUDA" in r["reason"] for r in skipped) and not rows_of(out, "tune"), skipped


@pytest.mark.slow
def test_bench_tune_rows_per_phase_and_precision(tmp_path):
    """Seconds per step for each phase, per precision: the median of 5 timed steps after the untimed ones,
    with what the engine says ran (auto resolved, its TF32 flags); then the projected recipe."""
    out = tmp_path / "b.json"
    args = [*FAST[:3], "auto", *FAST[4:6], "--precision", "fp32,bf16", "--tune-steps", "5", *FAST[8:]]
    p = run_pti("bench", *args, "-o", out)
    assert p.returncode == 0, p.stderr
    tune = rows_of(out, "tune", "ok")
    assert [(r["precision"], r["phase"]) for r in tune] == [
        (p, ph) for p in ("fp32", "bf16") for ph in ("invert", "tune", "tune+locality")
    ]
    for r in tune:
        assert (r["implementation"], r["requested"], r["cuda_graph"], r["interpreter"]) == ("ref", "auto", False, False)
        assert r["steps_timed"] == 5 and r["compile_seconds"] is None and r["seconds_per_step"] > 0, r
        tf32 = {k: r["flags"][k] for k in ("tf32_matmul", "tf32_cudnn")}  # autocast is per forward pass
        assert tf32 == {k: FLAGS[r["precision"]][k] for k in tf32}, r
    recipe = rows_of(out, "recipe")
    assert [(r["precision"], r["locality"]) for r in recipe] == [(p, loc) for p in ("fp32", "bf16") for loc in (0, 1)]
    assert all(b["projected_seconds"] > a["projected_seconds"] for a, b in zip(recipe[::2], recipe[1::2]))


def test_bench_usage_errors_exit_2(tmp_path):
    """A setting the harness cannot run is refused while the command line is read: exit 2, no traceback, no
    file. `--config tiny,paper256` used to pass the check and end in a KeyError."""
    cases = [
        ["--impl", "cuda"],
        ["--impl", "reference"],  # the old names are gone
        ["--batches", "0"],
        ["--batches", "1025"],
        ["--precision", "fp8"],
        ["--config", "tiny,paper256"],
        ["--cuda-graphs", "yes"],
        ["--tune-steps", "3"],  # a median of at least 5
        ["--repeats", "4"],
    ]
    for args in cases:
        p = run_pti("bench", *args, "-o", tmp_path / "x.json")
        assert p.returncode == 2 and no_traceback(p), (args, p.stderr)
        assert args[0] in p.stderr and "KeyError" not in p.stderr, (args, p.stderr)
    assert not (tmp_path / "x.json").exists()


def test_bench_help_lists_what_the_harness_runs():
    """The command's copies of the names (kept so that --help needs no torch) equal the harness's."""
    from pti import benchmark
    from pti.commands import bench

    assert bench.BENCH_IMPLS == benchmark.IMPLS
    assert tuple(g.value for g in bench.Graphs) == benchmark.CUDA_GRAPHS
    assert tuple(c.value for c in bench.Config) == tuple(benchmark.CONFIGS)


@pytest.mark.slow
def test_bench_default_output_is_here_and_never_replaced_unasked(tmp_path):
    """Without -o the results go to ./bench_<device>.json, not into a checkout's committed
    benchmarks/results/, and an existing one is replaced only with --force (-o names a file on purpose)."""
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    committed = tmp_path / "benchmarks" / "results" / "bench_cpu.json"
    committed.write_text("{}")
    p = run_pti("bench", *FAST, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert committed.read_text() == "{}" and rows_of(tmp_path / "bench_cpu.json", "render", "ok")
    (tmp_path / "bench_cpu.json").write_text("mine")
    p = run_pti("bench", *FAST, cwd=tmp_path)
    assert p.returncode == 1 and no_traceback(p) and len(error_lines(p.stderr)) == 1, p.stderr
    assert "--force" in p.stderr and (tmp_path / "bench_cpu.json").read_text() == "mine"
    assert "img/s" not in p.stdout  # refused before measuring
    p = run_pti("bench", *FAST, "--force", cwd=tmp_path)
    assert p.returncode == 0 and rows_of(tmp_path / "bench_cpu.json", "render", "ok"), p.stderr
    p = run_pti("bench", *FAST, "-o", "bench_cpu.json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr


def test_a_failing_implementation_is_a_row_and_the_run_goes_on(tmp_path):
    """An export that cannot be made (here: the onnx package missing, a real module that fails to import)
    is a failed row with its one-line reason; the other implementations are still measured and the JSON
    written; the exit code is 1, with one error line."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "onnx.py").write_text("raise ImportError('onnx is not installed (a test shim)')\n")
    out = tmp_path / "b.json"
    env = env_with(PYTHONPATH=os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]))
    p = run_pti("bench", *FAST[:3], "onnx,ref", *FAST[4:], "-o", out, env=env)
    assert p.returncode == 1 and no_traceback(p), p.stderr
    assert error_lines(p.stderr) == [error_lines(p.stderr)[0]] and "1 of " in p.stderr, p.stderr
    (failed,) = rows_of(out, status="failed")
    assert (failed["implementation"], failed["stage"]) == ("onnx", "setup") and "onnx" in failed["error"], failed
    assert "\n" not in failed["error"]
    assert [r["implementation"] for r in rows_of(out, "render", "ok")] == ["ref"]
    assert json.loads(out.read_text())["complete"]


def test_a_batch_that_cannot_fit_is_refused_in_one_line(tmp_path):
    """Batch 1024 at 256 px needs tens of GB for its activations: refused before it starts (on a CPU the
    alternative is the kernel's OOM killer), in one line, and the run goes on to write its JSON."""
    from pti.benchmark import available_bytes, build, render_bytes

    need, have = render_bytes(build("paper256"), 1024), available_bytes(torch.device("cpu"))
    if have is None or need <= have:
        pytest.skip(f"this machine has {have} bytes free, enough for batch 1024 ({need})")
    out = tmp_path / "b.json"
    p = run_pti("bench", "--config", "paper256", "--impl", "ref", "--batches", "1024", *FAST[6:], "-o", out)
    assert p.returncode == 1 and no_traceback(p), p.stderr
    (row,) = rows_of(out, "render")
    assert row["status"] == "refused" and "batch 1024 needs about" in row["reason"] and "\n" not in row["reason"]
    assert row["reason"] in p.stdout


# ---------------------------------------------------------------------------- the harness, called directly


@pytest.mark.slow
def test_triton_under_the_interpreter_is_marked_and_never_counted_as_speed():
    """Under TRITON_INTERPRET=1 (set before Triton loads, so in a process of its own) the triton rows run,
    say `interpreter: true`, and carry no speed figures: no GFLOP/s, percent of peak or speedup."""
    code = f"""
import json, sys
sys.path.insert(0, {str(TESTS)!r})
import torch
from helpers import small_generator
from test_kernels import WHOLE
from pti.benchmark import render_rows
G = small_generator(0, WHOLE).requires_grad_(False)
rows = render_rows(G, torch.device("cpu"), [1], ["ref", "triton"], ["fp32"], progress=lambda line: None)
print(json.dumps(rows))
"""
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env_with(TRITON_INTERPRET="1"), timeout=300
    )
    assert p.returncode == 0, p.stderr
    ref, tri = json.loads(p.stdout.splitlines()[-1])
    assert (ref["implementation"], ref["interpreter"], tri["implementation"], tri["interpreter"]) == (
        "ref",
        False,
        "triton",
        True,
    )
    assert ref["gflops_achieved"] is not None and ref["speedup_vs_reference"] == 1.0  # (8 px: under 0.05 GFLOP/s)
    assert tri["status"] == "ok" and tri["ms_per_image"] > 0
    assert tri["gflops_achieved"] is None and tri["percent_of_peak"] is None and tri["speedup_vs_reference"] is None
    assert "triton" in tri["ops"]["modulated_conv2d_act"], tri["ops"]  # the kernels ran, not the fallback
    assert 0 < tri["max_abs_diff_vs_ref_fp32"] <= 1e-4  # test_kernels.py's whole-generator bound


def test_graph_key_changes_with_everything_that_changes_the_computation():
    """`graph_key` (what a CUDA graph replay is keyed on) changes with the input's shape, dtype and device,
    grad mode, autocast and its dtype, each TF32 flag, the implementation, and each way of rebinding a weight;
    and with nothing else: new input values, weights changed in place or copied into, the dtype of a
    disabled autocast."""
    from helpers import small_generator

    from pti.engine.cudagraph import graph_key

    G = small_generator(0)
    S = G.synthesis
    ws = torch.randn(2, S.num_ws, S.w_dim)
    k0 = graph_key(ws, S, "ref")
    layer = S.b16.conv1

    def key(x=ws, impl="ref"):
        return graph_key(x, S, impl)

    same = {"again": key(), "new values": key(torch.randn_like(ws))}
    with torch.no_grad():
        layer.weight.add_(1.0)
    same["weight changed in place"] = key()
    with torch.no_grad():
        layer.weight.sub_(1.0)
    S.load_state_dict({k: v.clone() for k, v in S.state_dict().items()})  # copies into the same tensors
    same["load_state_dict (copying)"] = key()
    saved_dtype = torch.get_autocast_dtype("cpu")
    torch.set_autocast_dtype("cpu", torch.float16)
    same["dtype of a disabled autocast"] = key()
    torch.set_autocast_dtype("cpu", saved_dtype)
    assert {name: k == k0 for name, k in same.items()} == {name: True for name in same}

    changed = {"shape": key(ws[:1]), "dtype": key(ws.double()), "device": key(ws.to("meta"))}
    with torch.no_grad():
        changed["grad mode"] = key()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        changed["autocast bf16"] = key()
    with torch.autocast("cpu", dtype=torch.float16):
        changed["autocast fp16"] = key()
    for name, flag in (("matmul", torch.backends.cuda.matmul), ("cudnn", torch.backends.cudnn)):
        saved = flag.allow_tf32
        flag.allow_tf32 = not saved
        try:
            changed[f"{name}.allow_tf32"] = key()
        finally:
            flag.allow_tf32 = saved
    changed["impl"] = key(impl="prefer:triton")
    old = layer.weight
    layer.weight = torch.nn.Parameter(old.detach().clone())  # a tuned clone's parameter, bound in
    changed["a parameter rebound"] = key()
    layer.weight = old
    old_data = old.data
    old.data = old_data.clone()
    changed["param.data rebound"] = key()
    old.data = old_data
    noise = layer.noise_const
    layer.noise_const = noise.clone()
    changed["a buffer rebound"] = key()
    layer.noise_const = noise
    assert key() == k0  # everything put back
    tuned = G.clone()
    S.load_state_dict(tuned.synthesis.state_dict(), assign=True)
    changed["load_state_dict(assign=True)"] = key()
    keys = list(changed.values())
    assert {name: k != k0 for name, k in changed.items()} == {name: True for name in changed}
    assert changed["autocast bf16"] != changed["autocast fp16"] and len(set(keys)) == len(keys)


@pytest.mark.slow
def test_compile_runs_inside_the_precision_scope_and_no_grad_with_its_compile_time_apart():
    """The compiled renderer is called like every other: under no_grad and in the precision's scope, so bf16
    means bf16 (it used to run fp32, autocast ignored), and its compile is the first call's time, reported
    apart from the timed calls. The tiny generator's parameters require grad here, as a tuned one's do."""
    from helpers import fp32_reorder_tolerance

    from pti.benchmark import renderer, render_rows, scoped
    from pti.engine.generator import tiny_generator

    cpu = torch.device("cpu")
    G = tiny_generator(cpu).requires_grad_(True)
    rows = render_rows(G, cpu, [1], ["ref", "compile"], ["fp32", "bf16"], progress=lambda line: None)
    row = {(r["implementation"], r["precision"]): r for r in rows}
    assert all(r["status"] == "ok" for r in rows), rows
    with torch.no_grad():
        ws = G.mapping(torch.randn([1, G.z_dim], generator=torch.Generator().manual_seed(0)), truncation_psi=0.7)
        scale = float(G.synthesis(ws, noise_mode="const", force_fp32=True, impl="ref").abs().max())
    # fp32: the compiled code sums in other orders (3x3 convs of up to 128 channels, about 20 layers)
    assert row["compile", "fp32"]["max_abs_diff_vs_ref_fp32"] <= fp32_reorder_tolerance(scale, 9 * 128, 20)
    # bf16: the toRGB outputs are bfloat16, so the largest pixels carry bf16's rounding (half an ulp, 2^-9
    # relative, at most; a quarter of that at least for the largest of thousands of pixels)
    bf16_floor = 2**-11 * scale
    assert row["ref", "bf16"]["max_abs_diff_vs_ref_fp32"] >= bf16_floor  # what bf16 does to the reference
    assert row["compile", "bf16"]["max_abs_diff_vs_ref_fp32"] >= bf16_floor, row["compile", "bf16"]
    for precision in ("fp32", "bf16"):
        r = row["compile", precision]
        assert r["flags"] == FLAGS[precision] and r["compile_seconds"] == r["first_call_seconds"]
        # compiling traces the whole network: far longer than any of the timed calls after it
        assert r["compile_seconds"] > 10 * r["spread_seconds"][1], r
        assert row["ref", precision]["compile_seconds"] is None
    out = scoped(renderer(G, "compile", cpu, 1), "fp32", cpu)(ws)
    assert not out.requires_grad  # no_grad held inside the compiled call


# ---------------------------------------------------------------------------- on a GPU


def _cuda_tiny():
    from pti.engine.generator import tiny_generator

    return tiny_generator("cuda"), torch.device("cuda")


def _ws(G, batch, seed):
    with torch.no_grad():
        z = torch.randn(batch, G.z_dim, generator=torch.Generator().manual_seed(seed)).cuda()
        return G.mapping(z, truncation_psi=0.7)


@pytest.mark.gpu
def test_cuda_graph_replays_the_eager_render_in_every_precision():
    """The graphed renderer: the same pixels as the eager call, for new inputs, per batch size, per precision
    (the scope's flags and autocast are in the key, so each precision records its own graph), for the
    reference and the Triton kernels."""
    from pti.benchmark import cuda_graphed
    from pti.kernels.precision import PRECISIONS, precision_scope

    G, dev = _cuda_tiny()
    for impl in ("ref", "prefer:triton"):

        def eager(ws, impl=impl):
            return G.synthesis(ws, noise_mode="const", force_fp32=True, impl=impl)

        graphed = cuda_graphed(eager, dev, G.synthesis, impl)
        for precision in PRECISIONS:
            for batch, seed in ((2, 0), (2, 1), (3, 2)):
                ws = _ws(G, batch, seed)
                with torch.no_grad(), precision_scope(precision, dev):
                    want = eager(ws)
                    got = graphed(ws).clone()
                assert torch.equal(got, want), (impl, precision, batch, seed, (got - want).abs().max().item())
        assert len(graphed.graphs) == 2 * len(PRECISIONS)  # one per (batch size, precision)


@pytest.mark.gpu
def test_a_rebound_weight_is_seen_by_the_graphed_render():
    """Weights changed in place are read by the replay (same graph); a weight rebound to another tensor, one
    at a time or a tuned clone's state loaded with assign=True, records a new graph (and drops the old
    weights' graphs): the render is the eager one of the new weights every time."""
    from pti.benchmark import cuda_graphed

    G, dev = _cuda_tiny()

    def eager(ws):
        return G.synthesis(ws, noise_mode="const", force_fp32=True, impl="ref")

    graphed = cuda_graphed(eager, dev, G.synthesis, "ref")
    ws = _ws(G, 2, 0)
    layer = getattr(G.synthesis, f"b{G.synthesis.block_resolutions[-1]}").conv1
    with torch.no_grad():
        first = graphed(ws).clone()
        layer.weight.mul_(1.5)
        assert torch.equal(graphed(ws), eager(ws)) and len(graphed.graphs) == 1
        layer.weight = torch.nn.Parameter(layer.weight.detach() * 0.5)
        got = graphed(ws).clone()
        assert torch.equal(got, eager(ws)) and not torch.equal(got, first) and len(graphed.graphs) == 1
        tuned = G.clone()
        for p in tuned.synthesis.parameters():
            p.mul_(0.9)
        G.synthesis.load_state_dict(tuned.synthesis.state_dict(), assign=True)
        got = graphed(ws).clone()
        assert torch.equal(got, eager(ws)) and len(graphed.graphs) == 1
        assert torch.equal(got, tuned.synthesis(ws, noise_mode="const", force_fp32=True, impl="ref"))


@pytest.mark.gpu
def test_peak_memory_leaves_out_earlier_graph_pools():
    """A measurement's peak memory is what it allocated above what was already there: a CUDA graph of a large
    batch kept alive beforehand (its static input and output allocated, 25 MB at batch 512) does not show up
    in an eager measurement's figure, which stays what it was without the graph (the old figure, the
    absolute peak, grew by the graph's allocations)."""
    from pti.benchmark import cuda_graphed, render_rows

    G, dev = _cuda_tiny()

    def measure():
        (row,) = render_rows(G, dev, [1], ["ref"], ["fp32"], progress=lambda line: None)
        return row["peak_memory_gb"] * 1e9

    def eager(ws):
        return G.synthesis(ws, noise_mode="const", force_fp32=True, impl="ref")

    fresh = measure()
    before = torch.cuda.memory_allocated(dev)
    graphed = cuda_graphed(eager, dev, G.synthesis, "ref")
    with torch.no_grad():
        graphed(_ws(G, 512, 0))
    held = torch.cuda.memory_allocated(dev) - before
    after = measure()
    assert held >= 512 * 3 * 64 * 64 * 4 and abs(after - fresh) < held / 2, (fresh, after, held)
    assert len(graphed.graphs) == 1  # still alive while the second measurement ran


# ---------------------------------------------------------------------------- output and comparisons


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
    p = run_pti("bench", *FAST[:3], "ref,onnx", "--batches", "1,2", *FAST[6:], "-o", out)
    assert p.returncode == 0, p.stderr
    assert " of reference" not in p.stdout, p.stdout
    render = rows_of(out, "render", "ok")
    ref = {r["batch"]: r for r in render if r["implementation"] == "ref"}
    others = [r for r in render if r["implementation"] != "ref"]
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
    assert math.isfinite(sum(r["max_abs_diff_vs_ref_fp32"] for r in render))
