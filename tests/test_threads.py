"""The CLI's CPU thread policy (pti.engine.device): one thread for small generators, torch's choice otherwise.

Why: benchmarks/bench_threads.py (spinning OpenMP threads and a busy core)."""

import pytest
import torch

from pti.engine.device import SMALL_WORK_MACS, TORCH_DEFAULT_THREADS, apply_cpu_threads, cpu_threads_for, synthesis_macs
from pti.engine.generator import Generator, tiny_generator
from pti.errors import PTIError


def _conv_macs_by_hand(G) -> int:
    """Independent count: every modulated conv's output pixels x its weight size; up-convs run at the input size."""
    total = 0
    for name, module in G.synthesis.named_modules():
        if hasattr(module, "weight") and module.weight.ndim == 4:
            res = int(name.split(".")[0][1:])
            side = res // 2 if name.endswith("conv0") else res
            total += side * side * module.weight.numel()
    return total


def test_macs_count_every_synthesis_conv():
    G = tiny_generator()
    assert synthesis_macs(G) == _conv_macs_by_hand(G) > 0
    big = Generator(z_dim=8, w_dim=8, img_resolution=256, synthesis_kwargs=dict(channel_base=16384, channel_max=512))
    assert synthesis_macs(big) == _conv_macs_by_hand(big)
    # the 256 px config-f does ~15 G multiply-adds per image (REFERENCE §6), the tiny one ~0.1 G
    assert 10e9 < synthesis_macs(big) < 20e9 and synthesis_macs(G) < SMALL_WORK_MACS < synthesis_macs(big)


def test_policy_choices():
    tiny = tiny_generator()
    big = Generator(z_dim=8, w_dim=8, img_resolution=256, synthesis_kwargs=dict(channel_base=16384, channel_max=512))
    assert cpu_threads_for(tiny, "auto") == 1
    assert cpu_threads_for(big, "auto") == TORCH_DEFAULT_THREADS  # large work: torch's default (one per core)
    assert cpu_threads_for(tiny, "torch") is None and cpu_threads_for(tiny, None) is None
    assert cpu_threads_for(big, "3") == 3
    for bad in ("zero", "0", "-2"):
        with pytest.raises(PTIError, match="PTI_THREADS"):
            cpu_threads_for(tiny, bad)


def test_apply_sets_torch_threads_on_cpu_only():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert apply_cpu_threads(tiny_generator(), torch.device("cpu"), "auto") == 1
        torch.set_num_threads(2)
        assert apply_cpu_threads(tiny_generator(), torch.device("cpu"), "torch") == 2
        assert apply_cpu_threads(tiny_generator(), torch.device("meta"), "auto") == 2  # not a CPU run: untouched
        big = Generator(
            z_dim=8, w_dim=8, img_resolution=256, synthesis_kwargs=dict(channel_base=16384, channel_max=512)
        )
        torch.set_num_threads(1)  # after a small generator in the same process, a large one gets the default back
        assert apply_cpu_threads(big, torch.device("cpu"), "auto") == TORCH_DEFAULT_THREADS
    finally:
        torch.set_num_threads(before)
