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
            raise PTIError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise PTIError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
