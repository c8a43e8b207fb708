"""The losses PTI optimizes, behind two small interfaces, with the official nets or a weight-free fallback.

- A `ProjectorMetric` scores a synthesized image against the target during inversion. The paper's
  is NVIDIA's VGG16 TorchScript net (`vgg16.pt`) on [0, 255] images area-downsampled to 256 px, the
  distance being the sum of squared feature differences.
- A `Perceptual` distance is the tuning loss's second term: LPIPS-alex v0.1 on [-1, 1] images at full
  resolution, returning one value per image.

`load_losses()` returns the paper's pair when their weights are in the cache. Without them (a fresh
offline machine), `allow_fallback=True` gives weight-free stand-ins built on MS-SSIM and says so in
`notice`: the pipeline still runs end to end, but it is not the paper's loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

from pti.engine.perceptual import area_downsample, get_lpips, get_vgg16_metric
from pti.engine.ssim import ms_ssim
from pti.errors import WeightsError


def to_0_255(img: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 255], as the projector feeds its metric."""
    return (img + 1) * (255 / 2)


class ProjectorMetric(Protocol):
    name: str

    def prepare(self, target_0_255: torch.Tensor) -> Any: ...

    def distance(self, synth_0_255: torch.Tensor, prepared: Any) -> torch.Tensor: ...


class VGGProjectorMetric:
    """The projector's metric: NVIDIA's VGG16 features, sum of squared differences."""

    name = "vgg16 (stylegan2-ada metric)"

    def __init__(self, net: torch.nn.Module):
        self.net = net  # a VGG16Metric: .features(img_0_255) downsamples and runs the net

    def prepare(self, target_0_255):
        return self.net.features(target_0_255).detach()  # features() area-downsamples to 256 px

    def distance(self, synth_0_255, prepared):
        return (prepared - self.net.features(synth_0_255)).square().sum()


class WeightFreeProjectorMetric:
    """Fallback projector metric: (1 - MS-SSIM) + mean squared error on [0, 1] images."""

    name = "weight-free (1 - MS-SSIM + MSE)"

    def prepare(self, target_0_255):
        return area_downsample(target_0_255) / 255

    def distance(self, synth_0_255, prepared):
        x = area_downsample(synth_0_255) / 255
        return (1 - ms_ssim(x, prepared, value_range=(0.0, 1.0)).mean()) + F.mse_loss(x, prepared)


Perceptual = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # [-1,1] images -> [N]


class LPIPSPerceptual:
    """LPIPS v0.1 on [-1, 1] images, one value per image."""

    def __init__(self, net: torch.nn.Module, name: str = "lpips-alex v0.1"):
        self.net, self.name = net, name

    def __call__(self, a, b):
        return self.net(a, b).reshape(a.shape[0])


class WeightFreePerceptual:
    """Fallback for LPIPS: 1 - MS-SSIM on [-1, 1] images mapped to [0, 1], one value per image."""

    name = "weight-free (1 - MS-SSIM)"
    label = "1-ms_ssim"  # what progress calls its value

    def __call__(self, a, b):
        return (1 - ms_ssim(a, b)).reshape(a.shape[0])


@dataclass
class Losses:
    projector: ProjectorMetric  # inversion metric
    perceptual: Perceptual  # tuning / locality perceptual term
    official: bool  # True when these are the paper's networks
    notice: str | None = None  # what a person should be told when they are not

    @property
    def names(self) -> dict[str, str]:
        return {"projector": self.projector.name, "perceptual": getattr(self.perceptual, "name", "custom")}

    def to(self, device) -> "Losses":
        """Move the networks behind both losses (the weight-free ones have none) to `device`."""
        for part in (self.projector, self.perceptual):
            net = getattr(part, "net", None)
            if net is not None:
                part.net = net.to(device)
        return self


def load_losses(device: torch.device | str = "cpu", allow_fallback: bool = True, registry=None) -> Losses:
    """The paper's losses from the weights cache, or the weight-free pair when allowed and absent."""
    try:
        vgg = get_vgg16_metric(device=device, registry=registry)
        lpips = get_lpips("alex", device=device, registry=registry)
    except WeightsError as e:
        if not allow_fallback:
            raise
        notice = (
            "perceptual weights are not in the cache, so this run uses a WEIGHT-FREE loss "
            "(MS-SSIM + L2) instead of the paper's VGG16 + LPIPS; results are not comparable to PTI's, "
            "and the early-stop threshold applies to 1 - MS-SSIM instead of LPIPS. "
            f"({e}) Run `pti weights list` to see what to import."
        )
        return Losses(WeightFreeProjectorMetric(), WeightFreePerceptual(), official=False, notice=notice)
    for p in list(vgg.parameters()) + list(lpips.parameters()):
        p.requires_grad_(False)
    return Losses(VGGProjectorMetric(vgg), LPIPSPerceptual(lpips.eval()), official=True)
