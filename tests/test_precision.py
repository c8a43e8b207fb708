"""Precision is explicit: each named precision sets the TF32 flags it means for the call and puts the caller's
back; results record the flags that were in effect; the implementation setting resolves as documented."""

from __future__ import annotations

import os

import pytest
import torch

import helpers
from pti import kernels
from pti.engine.config import AUTO_IMPL, IMPLS, resolve_impl
from pti.engine.generator import tiny_generator
from pti.engine.tune import TuneConfig, tune
from pti.errors import PTIError
from pti.kernels.precision import PRECISIONS, dot_precision, flags, precision_scope


@pytest.fixture
def tf32_on():
    """PyTorch's own cuDNN default (TF32 on), matmul TF32 on too: what a GPU user may well have."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_precision_sets_its_flags_and_restores_the_callers(tf32_on, precision) -> None:
    with precision_scope(precision, "cpu"):
        inside = flags()
        dot = dot_precision(torch.float32)
    assert inside["tf32_matmul"] is inside["tf32_cudnn"] is (precision == "tf32")
    assert dot == ("tf32" if precision == "tf32" else "ieee")
    assert inside.get("autocast") == ("cpu:bfloat16" if precision == "bf16" else None)
    assert flags() == {"tf32_matmul": True, "tf32_cudnn": True}  # the caller's, back


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        with precision_scope("fp16"):
            pass


def test_a_tuning_run_records_the_flags_it_ran_under_not_the_callers(tf32_on) -> None:
    G = tiny_generator("cpu")
    with torch.no_grad():
        target = G.synthesis(G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(1))))
    pivot = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(2)))
    for precision in ("fp32", "tf32"):
        result = tune(G, target, pivot, helpers.random_lpips(), TuneConfig(max_steps=1, precision=precision))
        record = result.impl
        assert record["precision"] == precision
        assert record["flags"]["tf32_cudnn"] is (precision == "tf32"), record
        assert record["requested"] == "auto" and record["impl"] == AUTO_IMPL["cpu"]
        # every synthesis layer ran, and which implementation ran it is counted (the reference, split)
        assert set(record["ops"]["modulated_conv2d_act"]) == {"split"}
        assert set(record["ops"]["modulated_conv2d"]) == {"ref"}
        # the 64 px generator on a CPU renders the pivot and its one locality sample as one batch of two
        # (pti.engine.batched: measured faster there), and the record says so
        assert record["batched_locality"] is True
    two = tune(G, target, pivot, helpers.random_lpips(), TuneConfig(max_steps=1, locality_samples=2))
    assert two.impl["batched_locality"] is False  # two samples: the separate renders
    assert flags() == {"tf32_matmul": True, "tf32_cudnn": True}


def test_the_implementation_setting_resolves_as_documented(monkeypatch) -> None:
    cpu = torch.device("cpu")
    assert IMPLS == ("auto", "ref", "compile", "triton")
    assert resolve_impl("auto", cpu) == AUTO_IMPL["cpu"]
    assert resolve_impl("compile", cpu) == "compile" and resolve_impl("ref", cpu) == "ref"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(PTIError, match="--impl triton runs its kernels on CUDA GPUs, and this run is on cpu"):
        resolve_impl("triton", cpu)
    with pytest.raises(ValueError, match="unknown implementation 'fast'"):
        resolve_impl("fast", cpu)


def test_recording_counts_what_ran_per_op_only_inside_the_block() -> None:
    G = tiny_generator("cpu")
    ws = G.mapping(torch.randn(2, G.z_dim, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad(), kernels.recording() as counts:
        G.synthesis(ws, noise_mode="const", impl="ref")
    layers = sum(1 for m in G.synthesis.modules() if type(m).__name__ in ("SynthesisLayer", "ToRGBLayer"))
    assert counts["modulated_conv2d"] == {"ref": layers}
    with torch.no_grad():
        G.synthesis(ws, noise_mode="const", impl="ref")
    assert counts["modulated_conv2d"] == {"ref": layers}  # closed: no longer counting


def test_the_compile_cache_env_is_set_for_the_block_only(monkeypatch, tmp_path) -> None:
    """The compile cache goes to the user cache folder for the run's duration, and the environment (which
    every process it starts inherits) is left as it was; a user's own setting is kept."""
    from pti.engine.speed import cache_env, compile_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("PTI_HOME", str(tmp_path / "home"))
    with cache_env():
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "home" / "compile") == str(compile_cache_dir())
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    with cache_env():
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    # inductor's own default, which it writes into the environment itself, is not a user's setting
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_default())
    with cache_env():
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "home" / "compile")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == inductor_default()
