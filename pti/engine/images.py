"""Image tensors to files: [-1, 1] float tensors to uint8, grids, labelled sheets, GIFs and atomic writes."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from pti.fsutil import atomic_path


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[C, H, W] or [N, C, H, W] in [-1, 1] -> uint8 [H, W, C] or [N, H, W, C] (NVIDIA's mapping)."""
    x = (img.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def from_uint8(arr: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [H, W, 3] -> float [1, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).to(device=device, dtype=torch.float32)
    return (x.permute(2, 0, 1)[None] / 127.5) - 1


def grid(images: Sequence[np.ndarray], cols: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile equally sized uint8 [H, W, C] images into one image, row-major."""
    if not images:
        raise ValueError("no images to tile")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w, c = images[0].shape
    out = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, c), fill, dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        out[r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = im
    return out


def save_png(arr: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 [H, W, C] array as PNG, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path


def labelled_sheet(rows: Sequence[Sequence[tuple[str, "object"]]], size: int = 256, pad: int = 6, label_h: int = 18):
    """Rows of (label, image) tiles, each image fitted into size x size under its label, on white.

    Images are PIL images or uint8 [H, W, 3] arrays; small renders are enlarged without smoothing
    (so pixels stay visible), large photos reduced with Lanczos. Returns a PIL image.
    """
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * (size + pad) + pad, len(rows) * (size + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        y = pad + r * (size + label_h + pad)
        for k, (label, img) in enumerate(row):
            img = (Image.fromarray(img) if isinstance(img, np.ndarray) else img).convert("RGB")
            scale = size / max(img.size)
            new = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
            img = img.resize(new, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST)
            x = pad + k * (size + pad)
            sheet.paste(img, (x, y + label_h))
            draw.text((x, y), label, fill="black")
    return sheet


def save_gif(frames: Sequence[np.ndarray], path: str | os.PathLike, fps: float = 8.0, bounce: bool = False) -> Path:
    """An animated GIF of uint8 [H, W, 3] frames, looping forever; `bounce` plays back and forth."""
    seq = list(frames) + (list(frames[-2:0:-1]) if bounce and len(frames) > 2 else [])
    images = [Image.fromarray(f) for f in seq]
    path = Path(path)
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path
