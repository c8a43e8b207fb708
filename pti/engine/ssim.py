"""Multi-scale SSIM (Wang, Simoncelli & Bovik 2003): a weight-free image similarity.

Needs no files from the weights cache: the weight-free losses in `pti.engine.losses` are built on it
when the official LPIPS / VGG16 weights are absent, and reports use it as a reconstruction metric.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Wang, Simoncelli & Bovik 2003: the per-scale exponents fitted to human judgements (sum ~ 1).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WINDOW_SIZE = 11  # Gaussian window of the SSIM paper: 11 taps, sigma 1.5
WINDOW_SIGMA = 1.5
K1, K2 = 0.01, 0.03  # stabilisers: C1 = (K1 * L)^2, C2 = (K2 * L)^2 with L the dynamic range


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def _ssim_terms(
    x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, data_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel SSIM and contrast-structure term, [N, C] each ('valid' filtering)."""
    c = x.shape[1]
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs
    return ssim.flatten(2).mean(-1), cs.flatten(2).mean(-1)


def ms_ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
) -> torch.Tensor:
    """Multi-scale SSIM per image, [N], differentiable; 1 means identical.

    Inputs are [N, C, H, W] with values in `value_range` (default [-1, 1], the generator's range),
    rescaled to [0, 1] internally. Each extra scale halves the image (2x2 average), so five scales
    need a side of at least 11 * 2^4 = 176 px. Smaller images use as many scales as fit (the last
    scale must still be at least 11 px) with the first weights renormalised to sum to one; below
    11 px the window shrinks to the (odd) image side. A 64 px image thus uses 3 scales.
    Per-scale terms are clamped at 0 before the fractional powers (as common implementations do).
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ms_ssim needs two [N,C,H,W] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    lo, hi = value_range
    a, b = (a - lo) / (hi - lo), (b - lo) / (hi - lo)
    side = min(a.shape[-2:])
    size = min(WINDOW_SIZE, side if side % 2 else side - 1)
    scales = 1
    while scales < len(weights) and side // 2**scales >= size:
        scales += 1
    w = torch.tensor(weights[:scales], dtype=a.dtype, device=a.device)
    w = w / w.sum()
    window = _gaussian_window(size, WINDOW_SIGMA, a.shape[1], a)
    terms = []
    for s in range(scales):
        ssim, cs = _ssim_terms(a, b, window, 1.0)
        terms.append(F.relu(ssim if s == scales - 1 else cs))
        if s < scales - 1:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    stacked = torch.stack(terms, dim=0)  # [S, N, C]
    return torch.prod(stacked ** w[:, None, None], dim=0).mean(dim=1)
