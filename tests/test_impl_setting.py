"""The implementation and the precision as settings of `pti tune` and `pti render` (issue 18): the options,
what their help says auto picks, refusals, and what ran, recorded in report.json, the identity's metadata,
the manifest and render.json. Through the installed console script, on the built-in tiny generator with an
empty weights cache and two steps per phase.

Tolerances:
- ref, triton and compile renders compute the same float32 sums in other orders: their difference is
  `fp32_reorder_tolerance` (about 1e-5 here), far below one 8-bit level (2/255 on [-1, 1]), so their PNGs
  differ by at most one level, where a value sits at a rounding boundary.
- bf16: autocast rounds each layer's inputs and weights to bfloat16 (unit roundoff 2^-8); the synthesis
  layers keep unit gain, so the relative errors of its `depth` layers add up to at most depth * 2^-8 of
  values within [-1, 1], i.e. depth * 2^-8 * 127.5 levels of an 8-bit image on average.
- tf32 on a CPU: the TF32 flags change nothing there, so the pixels equal fp32's.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from clirun import env_with, error_lines, no_traceback, run_pti
from helpers import small_generator
from pti.commands import common
from pti.commands.render import RenderPrecision
from pti.engine import config
from pti.engine.checkpoint import generator_hash, save_generator
from pti.engine.generator import tiny_generator
from pti.engine.identity import Identity
from pti.kernels.precision import PRECISIONS
from pti.rendering import RENDER_PRECISIONS

skimage_data = pytest.importorskip("skimage.data")

SMALL = ["--invert-steps", "2", "--tune-steps", "2", "--device", "cpu"]
FP32_FLAGS = {"tf32_matmul": False, "tf32_cudnn": False}
LEVEL = 2 / 255  # one 8-bit level on [-1, 1] images


def _env(tmp, **extra):
    """An empty user cache in `tmp`, wide help, and Triton's interpreter only where `extra` asks for it."""
    env = env_with(PTI_HOME=str(tmp / "home"), COLUMNS="200")
    env.pop("TRITON_INTERPRET", None)
    # inductor writes its cache folder into os.environ the first time it runs in a process (an AOTInductor
    # export test in this worker, say), and a child would inherit it as if the user had set it
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return {**env, **extra}


def _json(path):
    return json.loads(path.read_text())


def _u8(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _levels(a, b) -> int:
    """The largest difference of two renders' reconstruction.png, in 8-bit levels."""
    return int(np.abs(_u8(a / "reconstruction.png") - _u8(b / "reconstruction.png")).max())


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "a.png"
    Image.fromarray(skimage_data.astronaut()).save(path)
    return path


@pytest.fixture(scope="module")
def ref_run(photo, tmp_path_factory):
    """`pti tune --impl ref` on the astronaut: (output folder, the process)."""
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "out"
    res = run_pti("tune", photo, "-o", out, "--impl", "ref", *SMALL, env=_env(tmp))
    assert res.returncode == 0, res.stderr
    return out, res


@pytest.fixture(scope="module")
def small_person(tmp_path_factory):
    """An identity on a 16 px generator saved to a file (its base): fast under Triton's interpreter."""
    tmp = tmp_path_factory.mktemp("small")
    G = small_generator()
    base = tmp / "small.safetensors"
    save_generator(G, base)
    with torch.no_grad():
        pivot = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(1)), truncation_psi=0.7)
    path = Identity.from_tuning(G, G, pivot, generator_hash(G), str(base)).save(tmp / "small.pti")
    return tmp, path


def _render(identity, out, tmp, *args, **env):
    res = run_pti("render", identity, "-o", out, "--device", "cpu", *args, env=_env(tmp, **env))
    assert res.returncode == 0, res.stderr
    return res, _json(out / "render.json")


# ---------------------------------------------------------------------------- options and help


def test_the_help_says_what_auto_picks_as_the_engine_decides() -> None:
    """The CLI's copies (help must not import torch) equal the engine's tables, and the help prints them."""
    assert common.AUTO_IMPL == config.AUTO_IMPL and common.IMPLS == config.IMPLS
    assert common.PRECISIONS == PRECISIONS
    assert tuple(e.value for e in common.Impl) == config.IMPLS
    assert tuple(e.value for e in common.Precision) == PRECISIONS
    assert tuple(e.value for e in RenderPrecision) == RENDER_PRECISIONS
    auto = ", ".join(f"{kind} -> {impl}" for kind, impl in config.AUTO_IMPL.items())
    for command in ("tune", "render"):
        res = run_pti(command, "--help", env=env_with(COLUMNS="200"))
        assert res.returncode == 0, res.stderr
        text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.stdout).split())
        assert f"auto, which picks per device: {auto}." in text, (command, text)
        assert "--impl" in text and "[default: auto]" in text


# ---------------------------------------------------------------------------- tune: what ran, recorded


def test_tune_records_what_ran_in_the_report_the_identity_and_the_manifest(ref_run) -> None:
    out, res = ref_run
    report = _json(out / "a" / "report.json")
    for step in ("invert", "tune"):
        rec = report["impl"][step]
        assert {k: rec[k] for k in ("requested", "impl", "precision", "flags", "compile_seconds")} == {
            "requested": "ref",
            "impl": "ref",
            "precision": "fp32",
            "flags": FP32_FLAGS,
            "compile_seconds": None,
        }, step
        assert rec["ops"] and all(set(names) <= {"ref", "split"} for names in rec["ops"].values()), rec["ops"]
    assert "compile" not in report["seconds"]  # nothing compiled
    ident = Identity.load(out / "a.pti")
    assert ident.meta["impl"] == report["impl"]
    assert ident.tuned_with == {"impl": "ref", "precision": "fp32", "flags": FP32_FLAGS, "recorded": True}
    info = run_pti("info", out / "a.pti", "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["tuned_with"] == ident.tuned_with
    (line,) = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert line["impl"] == {"invert": "ref", "tune": "ref"} and "impl" not in line["settings"]["tune"]
    assert "ran the inversion and the tuning with ref, fp32" in res.stdout.splitlines()


def test_another_impl_reuses_a_run_another_precision_is_refused_then_recorded(photo, tmp_path) -> None:
    """The implementation is how a step runs (as the device is), not what it computes: a re-run with another
    `--impl` skips what is done; another precision is other settings, refused unless forced, and recorded."""
    out, env = tmp_path / "out", _env(tmp_path)
    assert run_pti("tune", photo, "-o", out, "--impl", "ref", *SMALL, env=env).returncode == 0
    stamp = (out / "a.pti").stat().st_mtime_ns
    again = run_pti("tune", photo, "-o", out, "--impl", "compile", *SMALL, env=env)  # nothing to compile: skipped
    assert again.returncode == 0, again.stderr
    assert "done before, skipped" in again.stdout and (out / "a.pti").stat().st_mtime_ns == stamp
    other = run_pti("tune", photo, "-o", out, "--precision", "tf32", *SMALL, env=env)
    assert other.returncode == 1 and no_traceback(other)
    (line,) = error_lines(other.stderr)
    assert 'other settings (invert.precision was "fp32", now "tf32")' in line and "--force" in line
    forced = run_pti("tune", photo, "-o", out, "--precision", "tf32", "--force", *SMALL, env=env)
    assert forced.returncode == 0, forced.stderr
    report = _json(out / "a" / "report.json")
    assert report["precision"] == "tf32"
    tf32 = {"tf32_matmul": True, "tf32_cudnn": True}  # set for the call even on a CPU, where they change nothing
    for step in ("invert", "tune"):
        assert report["impl"][step]["precision"] == "tf32" and report["impl"][step]["flags"] == tf32
    assert report["impl"]["tune"]["requested"] == "auto" and report["impl"]["tune"]["impl"] == config.AUTO_IMPL["cpu"]
    assert Identity.load(out / "a.pti").tuned_with == {
        "impl": config.AUTO_IMPL["cpu"],
        "precision": "tf32",
        "flags": tf32,
        "recorded": True,
    }
    assert "ran the inversion and the tuning with ref, tf32 (--impl auto)" in forced.stdout.splitlines()


def test_triton_without_cuda_is_refused_in_one_line_before_any_work(photo, tmp_path) -> None:
    """Refused where the device is resolved, before anything is read or written: the render names no
    identity that is there, and still the setting is what it refuses (as a missing device is)."""
    env = _env(tmp_path)  # without TRITON_INTERPRET: no way to run a Triton kernel on this CPU
    for args in (
        ["tune", photo, "-o", tmp_path / "t", "--impl", "triton", *SMALL],
        ["render", tmp_path / "nobody.pti", "-o", tmp_path / "r", "--impl", "triton", "--device", "cpu"],
    ):
        res = run_pti(*args, env=env)
        assert res.returncode == 1 and no_traceback(res), (args[0], res.stderr)
        (line,) = error_lines(res.stderr)
        assert "triton" in line and "CUDA" in line, line
    assert not (tmp_path / "t").exists() and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_tune_compile_reports_the_one_time_compile_and_records_it(photo, tmp_path) -> None:
    out = tmp_path / "out"
    res = run_pti("tune", photo, "-o", out, "--impl", "compile", *SMALL, env=_env(tmp_path), timeout=900)
    assert res.returncode == 0, res.stderr
    for what in ("the inversion step", "the tuning step"):
        assert f"compiling {what} (one-time) ..." in res.stdout
        assert re.search(rf"compiled {what} in \d+\.\d s", res.stdout), res.stdout
    report = _json(out / "a" / "report.json")
    seconds = [report["impl"][step]["compile_seconds"] for step in ("invert", "tune")]
    assert all(report["impl"][step]["impl"] == "compile" for step in ("invert", "tune"))
    assert all(s > 0 for s in seconds) and report["seconds"]["compile"] == pytest.approx(sum(seconds))
    assert "ran the inversion and the tuning with compile, fp32; compiled once in" in res.stdout
    assert Identity.load(out / "a.pti").tuned_with["impl"] == "compile"


# ---------------------------------------------------------------------------- render


def test_render_records_impl_precision_flags_and_how_the_identity_was_tuned(ref_run, tmp_path) -> None:
    out, _ = ref_run
    ident = out / "a.pti"
    tuned_with = Identity.load(ident).tuned_with
    runs = {}
    for precision in PRECISIONS:
        res, rec = _render(ident, tmp_path / precision, tmp_path, "--precision", precision)
        runs[precision] = _u8(tmp_path / precision / "reconstruction.png")
        assert rec["identity_tuned_with"] == tuned_with
        assert rec["impl"]["requested"] == "auto" and rec["impl"]["impl"] == config.AUTO_IMPL["cpu"]
        assert rec["impl"]["precision"] == precision and rec["impl"]["compile_seconds"] is None
        assert f"on torch (ref, {precision}, cpu)" in res.stdout
        flags = rec["impl"]["flags"]
        assert flags["tf32_matmul"] is flags["tf32_cudnn"] is (precision == "tf32")
        assert flags.get("autocast") == ("cpu:bfloat16" if precision == "bf16" else None)
    assert np.array_equal(runs["tf32"], runs["fp32"])  # the TF32 flags change nothing on a CPU
    convs = [n for n, _ in tiny_generator().synthesis.named_modules() if n.rsplit(".", 1)[-1] in ("conv0", "conv1")]
    depth = len(convs) + 1  # every conv, then the last toRGB
    diff = np.abs(runs["bf16"] - runs["fp32"]).mean()
    assert 0 < diff <= depth * 2**-8 * 127.5, diff  # autocast really ran, within bf16's rounding


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--precision", "fp16"], "fp16 is an export's precision"),
        (["--backend", "onnx", "--precision", "bf16"], "bf16 is a precision of the torch backend"),
        (["--backend", "aoti", "--precision", "tf32"], "tf32 is a precision of the torch backend"),
        (["--backend", "onnx", "--impl", "compile"], "compile is for the torch backend"),
        (["--backend", "tensorrt", "--impl", "ref"], "ref is for the torch backend"),
    ],
)
def test_render_refuses_options_that_do_not_fit_the_backend(small_person, tmp_path, args, needle) -> None:
    _, ident = small_person
    res = run_pti("render", ident, "-o", tmp_path / "out", "--device", "cpu", *args, env=_env(tmp_path))
    assert res.returncode == 2 and no_traceback(res), res.stderr
    assert needle in " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.stderr).split())
    assert not (tmp_path / "out").exists()


def test_render_triton_under_the_interpreter_records_the_kernel_per_op(small_person, tmp_path) -> None:
    """Triton's interpreter runs the kernels on a CPU (how CI checks them): render.json says which op ran
    which implementation, and the pixels are the reference's (float32 parity, within one 8-bit level)."""
    tmp, ident = small_person
    _, ref = _render(ident, tmp_path / "ref", tmp_path, "--impl", "ref")
    _, tri = _render(ident, tmp_path / "tri", tmp_path, "--impl", "triton", TRITON_INTERPRET="1")
    assert all(set(names) <= {"ref", "split"} for names in ref["impl"]["ops"].values())
    assert tri["impl"]["impl"] == "triton" and set(tri["impl"]["ops"]) <= set(ref["impl"]["ops"])
    for op in ("modulated_conv2d_act", "upfirdn2d"):  # every layer's fused conv, the skip image's up-sampling
        assert set(tri["impl"]["ops"][op]) == {"triton"}, tri["impl"]["ops"]
    assert _levels(tmp_path / "tri", tmp_path / "ref") <= 1


@pytest.mark.slow
def test_render_compile_reports_its_one_time_cost_apart(small_person, tmp_path) -> None:
    tmp, ident = small_person
    _, ref = _render(ident, tmp_path / "ref", tmp_path, "--impl", "ref")
    res, rec = _render(ident, tmp_path / "c", tmp_path, "--impl", "compile")
    assert "compiling the synthesis network (one-time) ..." in res.stdout
    assert re.search(r"compiled the synthesis network in \d+\.\d s", res.stdout), res.stdout
    assert rec["impl"]["impl"] == "compile" and rec["impl"]["compile_seconds"] > 0 and rec["impl"]["ops"] == {}
    assert "compiled once in" in res.stdout
    assert _levels(tmp_path / "c", tmp_path / "ref") <= 1
    assert os.listdir(tmp_path / "home" / "compile")  # the compile cache sits in the user cache folder
