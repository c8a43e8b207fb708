"""Resolve the compute device once, at the edge (CLI or API entry); library code takes it as given."""

from __future__ import annotations

import torch

from pti.errors import PTIError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is a clear error."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PTIError(f"--device {name} was asked for, but no CUDA GPU is available; use --device cpu or auto")
        device = torch.device(name)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise PTIError(
                f"--device {name} was asked for, but this machine has {count} CUDA GPU"
                f"{'' if count == 1 else 's'} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})"
            )
        return device
    if name == "cpu":
        return torch.device("cpu")
    raise PTIError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")


# ---------------------------------------------------------------------------- CPU threads
#
# Measured on the 2-core CPU machine (benchmarks/bench_threads.py): torch's OpenMP threads spin
# while they wait for work. Idle, that is what makes many small ops fast; when another process holds
# a core, the spinning thread and the other process fight over it and a run of small ops takes
# several times longer. So the CLI (a) makes waiting threads sleep (OMP_WAIT_POLICY=PASSIVE, set in
# pti.__main__ before torch loads), which costs nothing on large ops, and (b) runs generators whose
# per-image work is small on one thread, where a second thread never paid for its wake-ups anyway.

SMALL_WORK_MACS = 2e9  # multiply-adds per synthesized image below which one CPU thread is fastest
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice (one per core), before anyone changes it


def synthesis_macs(G) -> int:
    """Multiply-adds of one synthesis forward: the convolutions (an up-convolution runs at its input size)."""
    total = 0
    for res in G.synthesis.block_resolutions:
        block = getattr(G.synthesis, f"b{res}")
        for name in ("conv0", "conv1", "torgb"):
            layer = getattr(block, name, None)
            if layer is None:
                continue
            out_ch, in_ch, kh, kw = layer.weight.shape
            side = res // getattr(layer, "up", 1)
            total += side * side * out_ch * in_ch * kh * kw
    return total


def cpu_threads_for(G, setting: str | int | None = "auto") -> int | None:
    """Threads for running `G` on the CPU: `setting` as a number; under "auto" one for small generators,
    else torch's default count; None for "torch" (leave the current setting alone)."""
    if setting in (None, "torch"):
        return None
    if setting != "auto":
        try:
            n = int(setting)
        except ValueError:
            raise PTIError(f"PTI_THREADS must be auto, torch or a number of threads, not {setting!r}") from None
        if n < 1:
            raise PTIError(f"PTI_THREADS must be at least 1, got {n}")
        return n
    return 1 if synthesis_macs(G) < SMALL_WORK_MACS else TORCH_DEFAULT_THREADS


def apply_cpu_threads(G, device: torch.device, setting: str | int | None = "auto") -> int:
    """Set torch's intra-op threads for running `G` on `device` (CPU only); returns the count in effect."""
    n = cpu_threads_for(G, setting) if device.type == "cpu" else None
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()
