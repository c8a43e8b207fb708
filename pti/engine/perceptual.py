"""Perceptual distances: LPIPS v0.1 (alex, vgg) and the StyleGAN VGG16 TorchScript metric.

Both load official weights from the weights cache (`pti.engine.weights`) and raise `WeightsError`
with an actionable one-line message when a file is absent. The weight-free measure (MS-SSIM) lives in
`pti.engine.ssim`, the dlib face-identity embedding in `pti.engine.align`.

LPIPS here is our own plain-torch implementation of the published v0.1 math (no torchvision):
    x -> (x - shift) / scale                      per-channel constants below
    features at 5 taps of the ImageNet trunk      alex: relu1..relu5; vgg: relu1_2 .. relu5_3
    f / (||f||_channels + 1e-10)                  unit-normalise each spatial position
    (f0 - f1)^2 -> 1x1 conv (no bias) -> spatial mean, summed over the 5 taps
Inputs are [N, 3, H, W] in [-1, 1]; the result is [N, 1, 1, 1] like the lpips package.
The trunk's state dict uses torchvision's names (`features.0.weight`, ...) and the heads use lpips'
names (`lin0.model.1.weight`, ...) so the official files load unchanged.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pti.engine.weights import default_registry
from pti.errors import WeightsError

# lpips' ScalingLayer: maps [-1, 1] inputs onto ImageNet-normalised ones. shift = (mean*2 - 1),
# scale = std*2 for the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), rounded
# to the values the lpips heads were trained with.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips' normalize_tensor epsilon

# Trunks as torchvision defines them: ("C", out, kernel, stride, padding) | ("R",) | ("M", kernel, stride).
_ALEX_LAYERS = [
    ("C", 64, 11, 4, 2), ("R",), ("M", 3, 2),
    ("C", 192, 5, 1, 2), ("R",), ("M", 3, 2),
    ("C", 384, 3, 1, 1), ("R",),
    ("C", 256, 3, 1, 1), ("R",),
    ("C", 256, 3, 1, 1), ("R",), ("M", 3, 2),
]  # fmt: skip
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_VGG_LAYERS: list[tuple] = []
for _c in _VGG16_CFG:
    _VGG_LAYERS += [("M", 2, 2)] if _c == "M" else [("C", _c, 3, 1, 1), ("R",)]

# Index just past each tapped ReLU in `features` (lpips' slice boundaries) and channels there.
TAPS = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}
CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
# Registry names of the trunk and heads for each backbone.
WEIGHT_NAMES = {"alex": ("alexnet", "lpips-alex"), "vgg": ("vgg16", "lpips-vgg")}
FEATURE_RESOLUTION = 256  # the projector compares images at most this large (VGG was trained near 224)


def _detail(e: BaseException) -> str:
    """The most telling single line of an exception message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)


def _build_features(layers: list[tuple]) -> nn.Sequential:
    mods: list[nn.Module] = []
    c_in = 3
    for spec in layers:
        if spec[0] == "C":
            _, c_out, k, s, p = spec
            mods.append(nn.Conv2d(c_in, c_out, k, stride=s, padding=p))
            c_in = c_out
        elif spec[0] == "R":
            mods.append(nn.ReLU(inplace=False))  # not in place: the tapped activations feed the loss
        else:
            mods.append(nn.MaxPool2d(kernel_size=spec[1], stride=spec[2]))
    return nn.Sequential(*mods)


class Trunk(nn.Module):
    """AlexNet or VGG16 `features`, returning the 5 LPIPS taps. State-dict keys: `features.<i>.*`."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in TAPS:
            raise ValueError(f"unknown LPIPS backbone {net!r}; use 'alex' or 'vgg'")
        self.net = net
        self.features = _build_features(_ALEX_LAYERS if net == "alex" else _VGG_LAYERS)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, start = [], 0
        for end in TAPS[self.net]:
            for i in range(start, end):
                x = self.features[i](x)
            taps.append(x)
            start = end
        return taps


class _LinearHead(nn.Module):
    """lpips' NetLinLayer in eval mode: (dropout slot) + 1x1 conv to one channel, no bias."""

    def __init__(self, channels: int):
        super().__init__()
        # Index 0 is lpips' Dropout (identity at inference); keeping the slot keeps the key `model.1.weight`.
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, stride=1, padding=0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance. `forward(a, b)` takes [N,3,H,W] in [-1,1] and returns [N,1,1,1].

    Parameters are frozen (requires_grad False) but gradients flow to the inputs.
    Build with `get_lpips()` (official weights from the cache) or `LPIPS.from_state_dicts(...)`.
    """

    def __init__(self, net: str = "alex"):
        super().__init__()
        self.net = Trunk(net)
        for i, c in enumerate(CHANNELS[net]):
            self.add_module(f"lin{i}", _LinearHead(c))
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_state_dicts(cls, net: str, trunk: dict[str, torch.Tensor], heads: dict[str, torch.Tensor]) -> "LPIPS":
        """From a torchvision checkpoint (classifier keys ignored) and an lpips v0.1 heads file."""
        model = cls(net)
        feats = {k: v for k, v in trunk.items() if k.startswith("features.")}
        try:
            model.net.load_state_dict(feats, strict=True)
        except RuntimeError as e:
            raise WeightsError(
                f"the {net} trunk checkpoint does not fit torchvision's {net} features: {_detail(e)}"
            ) from None
        for i in range(5):
            key = f"lin{i}.model.1.weight"
            if key not in heads:
                raise WeightsError(f"the LPIPS heads file for {net} lacks {key}; is it lpips v0.1 {net}.pth?")
            try:
                getattr(model, f"lin{i}").load_state_dict({"model.1.weight": heads[key]})
            except RuntimeError:
                raise WeightsError(
                    f"LPIPS head {key} has shape {tuple(heads[key].shape)}, wrong for the {net} backbone"
                ) from None
        return model

    def forward(self, a: torch.Tensor, b: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Distance per image, [N,1,1,1]. `normalize=True` accepts [0,1] inputs instead of [-1,1]."""
        if normalize:
            a, b = a * 2 - 1, b * 2 - 1
        fa = self.net((a - self.shift) / self.scale)
        fb = self.net((b - self.shift) / self.scale)
        total = 0
        for i, (x, y) in enumerate(zip(fa, fb)):
            x = x / (x.square().sum(dim=1, keepdim=True).sqrt() + NORM_EPS)
            y = y / (y.square().sum(dim=1, keepdim=True).sqrt() + NORM_EPS)
            total = total + getattr(self, f"lin{i}")((x - y).square()).mean(dim=(2, 3), keepdim=True)
        return total


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unpickling failure means a bad file)
        raise WeightsError(f"cannot read {path}: {type(e).__name__}: {_detail(e)}") from None
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return sd


def get_lpips(net: str = "alex", device: str | torch.device = "cpu", registry=None) -> LPIPS:
    """LPIPS v0.1 with official weights from the cache; WeightsError (how to get them) when absent.

    `registry` is a `pti.engine.weights.Registry` (default: the user's cache).
    """
    if net not in WEIGHT_NAMES:
        raise WeightsError(f"unknown LPIPS backbone {net!r}; use 'alex' or 'vgg'")
    reg = registry or default_registry()
    trunk_name, heads_name = WEIGHT_NAMES[net]
    trunk_path, heads_path = reg.resolve(trunk_name), reg.resolve(heads_name)
    return LPIPS.from_state_dicts(net, _load_tensors(trunk_path), _load_tensors(heads_path)).to(device)


def area_downsample(img: torch.Tensor, size: int = FEATURE_RESOLUTION) -> torch.Tensor:
    """Area-average [N, C, H, H] down to `size` when larger (the projector's resize); smaller images pass through."""
    if img.shape[2] > size:
        img = F.interpolate(img, size=(size, size), mode="area")
    return img


class VGG16Metric(nn.Module):
    """NVIDIA's VGG16 TorchScript perceptual network as the StyleGAN2-ADA projector uses it.

    `features(img)` takes [N,3,H,W] in [0,255]; images larger than 256 px are area-downsampled to
    256x256 first (as the projector does), then the network runs with `resize_images=False,
    return_lpips=True`. `distance(a, b)` is the per-image sum of squared feature differences, [N];
    the projector's loss is its sum over the batch.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        super().__init__()
        try:
            with warnings.catch_warnings():
                # NVIDIA ships vgg16.pt as TorchScript; torch.jit is deprecated but remains the only loader.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"cannot load the VGG16 TorchScript metric {path}: {_detail(e)}") from None
        for p in self.net.parameters():
            p.requires_grad_(False)

    def features(self, img_0_255: torch.Tensor) -> torch.Tensor:
        return self.net(area_downsample(img_0_255), resize_images=False, return_lpips=True)

    def distance(self, a_0_255: torch.Tensor, b_0_255: torch.Tensor) -> torch.Tensor:
        fa, fb = self.features(a_0_255), self.features(b_0_255)
        return (fa - fb).square().flatten(1).sum(dim=1)

    def forward(self, a_0_255: torch.Tensor, b_0_255: torch.Tensor) -> torch.Tensor:
        return self.distance(a_0_255, b_0_255)


def get_vgg16_metric(device: str | torch.device = "cpu", registry=None) -> VGG16Metric:
    """`VGG16Metric` on `vgg16.pt` from the cache; WeightsError (how to get it) when absent."""
    return VGG16Metric((registry or default_registry()).resolve("vgg16-metric"), device)
