"""Perceptual metrics: LPIPS structure and behaviour, the VGG16 TorchScript wrapper, and MS-SSIM.

Numerical parity of our LPIPS with the lpips package was checked side by side outside the repo
(it needs torchvision and the lpips sources); these tests pin the structure that parity rests on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_scripted_vgg16_standin, random_lpips_state_dicts, standin_registry
from pti.engine import perceptual as P
from pti.engine.ssim import ms_ssim
from pti.errors import WeightsError

# torchvision's checkpoints: features.<index> of each conv and its weight shape.
ALEX_CONVS = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
VGG_CONVS = dict(zip(
    [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
    [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256),
     (512, 256), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)],
))  # fmt: skip


def test_trunk_keys_match_torchvision() -> None:
    alex = P.Trunk("alex").state_dict()
    assert {k for k in alex if k.endswith("weight")} == {f"features.{i}.weight" for i in ALEX_CONVS}
    for i, shape in ALEX_CONVS.items():
        assert tuple(alex[f"features.{i}.weight"].shape) == shape
    vgg = P.Trunk("vgg").state_dict()
    assert {k for k in vgg if k.endswith("weight")} == {f"features.{i}.weight" for i in VGG_CONVS}
    for i, (o, c) in VGG_CONVS.items():
        assert tuple(vgg[f"features.{i}.weight"].shape) == (o, c, 3, 3)
    assert len(P.Trunk("vgg").features) == 31  # torchvision's vgg16.features, last max-pool included


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_behaviour(net: str) -> None:
    trunk, heads = random_lpips_state_dicts(net)
    model = P.LPIPS.from_state_dicts(net, trunk, heads)
    assert all(not p.requires_grad for p in model.parameters())
    a = torch.rand(2, 3, 64, 64) * 2 - 1
    b = (a + 0.2 * torch.randn_like(a)).clamp(-1, 1)
    assert torch.allclose(model(a, a), torch.zeros(2, 1, 1, 1), atol=1e-6)
    x = a.clone().requires_grad_(True)
    d = model(x, b)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.allclose(model(a, b), model((a + 1) / 2, (b + 1) / 2, normalize=True), atol=1e-6)
    far = model(a, -a)
    assert (far > d.detach()).all()


def test_lpips_matches_a_direct_computation() -> None:
    """The published formula written out with functional ops on the same state dict (alex)."""
    trunk, heads = random_lpips_state_dicts("alex", seed=3)
    model = P.LPIPS.from_state_dicts("alex", trunk, heads)
    a, b = torch.rand(1, 3, 70, 70) * 2 - 1, torch.rand(1, 3, 70, 70) * 2 - 1
    F = torch.nn.functional
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x: torch.Tensor) -> list[torch.Tensor]:
        conv = lambda x, i, s, p: F.relu(F.conv2d(x, trunk[f"features.{i}.weight"], trunk[f"features.{i}.bias"], s, p))  # noqa: E731
        h1 = conv((x - shift) / scale, 0, 4, 2)
        h2 = conv(F.max_pool2d(h1, 3, 2), 3, 1, 2)
        h3 = conv(F.max_pool2d(h2, 3, 2), 6, 1, 1)
        h4 = conv(h3, 8, 1, 1)
        return [h1, h2, h3, h4, conv(h4, 10, 1, 1)]

    total = 0
    for i, (x, y) in enumerate(zip(taps(a), taps(b))):
        x = x / (x.norm(dim=1, keepdim=True) + 1e-10)
        y = y / (y.norm(dim=1, keepdim=True) + 1e-10)
        total = total + F.conv2d((x - y) ** 2, heads[f"lin{i}.model.1.weight"]).mean()
    assert torch.allclose(model(a, b).flatten(), total.flatten(), rtol=1e-5, atol=1e-7)


def test_lpips_rejects_wrong_files() -> None:
    trunk, heads = random_lpips_state_dicts("alex")
    vgg_trunk, vgg_heads = random_lpips_state_dicts("vgg")
    with pytest.raises(WeightsError, match="trunk"):
        P.LPIPS.from_state_dicts("alex", vgg_trunk, heads)
    with pytest.raises(WeightsError, match="shape"):
        P.LPIPS.from_state_dicts("alex", trunk, vgg_heads)
    with pytest.raises(WeightsError, match="lacks"):
        P.LPIPS.from_state_dicts("alex", trunk, {})


def test_get_lpips_from_cache(tmp_path: Path) -> None:
    reg = standin_registry(tmp_path / "cache")
    with pytest.raises(WeightsError, match="pti weights import") as info:
        P.get_lpips("alex", registry=reg)
    assert "alexnet-owt-7be5be79.pth" in str(info.value) and "\n" not in str(info.value)
    trunk, heads = random_lpips_state_dicts("alex")
    torch.save(trunk, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(heads, tmp_path / "alex.pth")
    reg.import_file(tmp_path / "alexnet-owt-7be5be79.pth")
    with pytest.raises(WeightsError, match="lpips_v0.1_alex.pth"):
        P.get_lpips("alex", registry=reg)
    reg.import_file(tmp_path / "alex.pth")
    model = P.get_lpips("alex", registry=reg)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert model(x, x).item() == pytest.approx(0, abs=1e-6)
    (tmp_path / "garbage.pth").write_bytes(b"garbage")
    reg.import_file(tmp_path / "garbage.pth", name="lpips-alex", force=True)  # accepted, but not a torch file
    with pytest.raises(WeightsError, match="cannot read"):
        P.get_lpips("alex", registry=reg)


def test_vgg16_metric_standin(tmp_path: Path) -> None:
    path = make_scripted_vgg16_standin(tmp_path / "vgg16.pt", seed=1)
    metric = P.VGG16Metric(path)
    a = torch.rand(2, 3, 512, 512) * 255
    b = torch.rand(2, 3, 512, 512) * 255
    assert torch.allclose(metric.distance(a, a), torch.zeros(2))
    x = a.clone().requires_grad_(True)
    d = metric(x, b)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert x.grad.abs().sum() > 0
    # Larger than 256 px: area-downsampled first, exactly as the projector does; 256 px and less as is.
    small = torch.nn.functional.interpolate(a, size=(256, 256), mode="area")
    assert torch.equal(P.area_downsample(a), small) and P.area_downsample(small) is small
    assert torch.equal(metric.features(a), metric.net(small, resize_images=False, return_lpips=True))
    # Same seed, same network.
    again = P.VGG16Metric(make_scripted_vgg16_standin(tmp_path / "again.pt", seed=1))
    assert torch.allclose(again.distance(a, b), metric.distance(a, b))


def test_vgg16_metric_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"not torchscript")
    with pytest.raises(WeightsError, match="bad.pt"):
        P.VGG16Metric(tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match="vgg16.pt"):
        P.get_vgg16_metric(registry=standin_registry(tmp_path / "cache"))


def test_ms_ssim_single_scale_matches_skimage() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = rng.random((40, 48, 3)).astype(np.float64)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ref = metrics.structural_similarity(
        a, b, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )
    ta, tb = (torch.from_numpy(x).permute(2, 0, 1)[None] for x in (a, b))
    ours = ms_ssim(ta, tb, value_range=(0.0, 1.0), weights=(1.0,))
    assert ours.item() == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("size", [8, 16, 64, 256])
def test_ms_ssim_sizes_and_gradients(size: int) -> None:
    torch.manual_seed(0)
    a = torch.rand(2, 3, size, size) * 2 - 1
    assert torch.allclose(ms_ssim(a, a), torch.ones(2), atol=1e-5)
    noisy = [(a + s * torch.randn_like(a)).clamp(-1, 1) for s in (0.05, 0.3)]
    light, heavy = (ms_ssim(a, n) for n in noisy)
    assert (heavy < light).all() and (light < 1).all()
    x = a.clone().requires_grad_(True)
    ms_ssim(x, noisy[1]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
