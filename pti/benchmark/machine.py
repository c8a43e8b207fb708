"""What `pti bench` measures on: the generator configs, the device (its name, dense peak, free memory),
what each implementation needs, and how one measurement is timed and its memory counted."""

from __future__ import annotations

import copy
import gc
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from pti.engine.generator import Generator, tiny_generator
from pti.errors import PTIError

CONFIGS = {
    "tiny": None,  # the built-in tiny generator
    "paper256": dict(
        z_dim=512,
        c_dim=0,
        w_dim=512,
        img_resolution=256,
        img_channels=3,
        mapping_kwargs=dict(num_layers=8),
        synthesis_kwargs=dict(channel_base=16384, channel_max=512, num_fp16_res=0, conv_clamp=256),
    ),
    "ffhq1024": dict(
        z_dim=512,
        c_dim=0,
        w_dim=512,
        img_resolution=1024,
        img_channels=3,
        mapping_kwargs=dict(num_layers=8),
        synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256),
    ),
}
IMPLS = ("auto", "ref", "compile", "triton", "onnx", "aoti")
TORCH_IMPLS = ("ref", "compile", "triton")  # the ones that follow the precision scope, graphed or not
CUDA_GRAPHS = ("off", "on", "both")
PHASES = ("invert", "tune", "tune+locality")
# Dense peak TFLOP/s by device name, from the vendors' data sheets (the sheets' tf32 and bf16 figures are
# "with sparsity": twice these). fp32 is the CUDA cores alone, which is all that fp32 with TF32 off can use;
# tf32 and bf16 are the tensor cores. The longest name that the device's name contains decides.
PEAK_TFLOPS = {
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},  # SXM5
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},  # SXM5
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    # Turing has no TF32 (the flags change nothing) and no bf16 tensor cores: its fp16 ones (fp32 accumulate)
    "RTX 2080": {"fp32": 10.1, "tf32": 10.1, "bf16": 40.3},
}
RECIPE = {"invert": 450, "tune": 350}
# Memory one eager fp32 render needs per image, in units of the largest layer's activation (channels x
# height x width x 4 bytes): measured 4.3 on paper256 (CPU, peak RSS, batches 4 to 16), rounded up.
ACTIVATIONS_PER_IMAGE = 4.5


def build(config: str, device="cpu"):
    if config not in CONFIGS:
        raise PTIError(f"unknown generator config {config!r}; choose one of {', '.join(CONFIGS)}")
    if CONFIGS[config] is None:
        return tiny_generator(device)
    torch.manual_seed(0)
    return Generator(**copy.deepcopy(CONFIGS[config])).eval().requires_grad_(False).to(device)


# ---------------------------------------------------------------------------- the device


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def peak(device: torch.device, precision: str) -> float | None:
    """The device's dense peak TFLOP/s for `precision`, None for CPUs and GPUs not in PEAK_TFLOPS."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    known = sorted((key for key in PEAK_TFLOPS if key in name), key=len, reverse=True)
    return PEAK_TFLOPS[known[0]][precision] if known else None


def interpreted(impl: str, device: torch.device) -> bool:
    """Whether `impl`'s kernels run under Triton's interpreter (TRITON_INTERPRET=1): no measure of speed.
    Triton runs interpreted everywhere then, and so do the Triton kernels Inductor writes for CUDA."""
    return os.environ.get("TRITON_INTERPRET") == "1" and (
        impl == "triton" or (impl == "compile" and device.type == "cuda")
    )


def unavailable(impl: str, device: torch.device) -> str | None:
    """Why `impl` cannot run on `device` (one line), or None."""
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton needs a CUDA device (or TRITON_INTERPRET=1, which checks logic, not speed)"
    return None


def render_bytes(G, batch: int) -> int:
    """Memory an eager fp32 render of `batch` images needs, about (see ACTIVATIONS_PER_IMAGE)."""
    largest = 0
    for res in G.synthesis.block_resolutions:
        layer = getattr(G.synthesis, f"b{res}").conv1
        largest = max(largest, layer.weight.shape[0] * res * res)
    return int(ACTIVATIONS_PER_IMAGE * 4 * largest * batch)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a measurement: the GPU's free memory plus what torch's cache holds unused; on a CPU,
    MemAvailable (Linux; None elsewhere)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def refusal(G, device: torch.device, batch: int) -> str | None:
    """Why a render of `batch` images is refused before it starts (one line), or None. On a CPU an
    out-of-memory render is not an error but the kernel's OOM killer, so it is refused ahead."""
    need, have = render_bytes(G, batch), available_bytes(device)
    if have is not None and need > have:
        return (
            f"batch {batch} needs about {need / 1e9:.1f} GB for its activations and {have / 1e9:.1f} GB is free; "
            "use smaller --batches"
        )
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Let go of what a finished measurement held (graph pools, compiled code's buffers)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Memory:
    """Peak GPU memory of one measurement, above what was allocated when it started (the weights, and the
    graph pools of earlier measurements, which `reset_peak_memory_stats` alone would count again)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resident = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.resident = torch.cuda.memory_allocated(device)

    def peak_gb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round((torch.cuda.max_memory_allocated(self.device) - self.resident) / 1e9, 3)

    def resident_gb(self) -> float | None:
        return None if self.device.type != "cuda" else round(self.resident / 1e9, 3)


def timed(
    call: Callable[[], object], device: torch.device, warmup: int, repeats: int, first_call: bool = True
) -> tuple[float | None, list[float]]:
    """(seconds of the first call, [seconds of each timed call]): one first call (unless the caller made it),
    `warmup` untimed calls, then `repeats` timed ones, each between device synchronizations."""
    first = None
    if first_call:
        sync(device)
        t0 = time.perf_counter()
        call()
        sync(device)
        first = time.perf_counter() - t0
    for _ in range(warmup):
        call()
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        call()
        sync(device)
        out.append(time.perf_counter() - t0)
    return first, out


def common_fields(device: torch.device, impl: str, requested: str, precision: str, cuda_graph: bool) -> dict:
    """The fields every row has: what ran, on what."""
    return dict(
        implementation=impl,
        requested=requested,
        cuda_graph=cuda_graph,
        precision=precision,
        device_name=device_name(device),
        threads=torch.get_num_threads(),
        interpreter=interpreted(impl, device),
    )
