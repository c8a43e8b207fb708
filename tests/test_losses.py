"""Which losses a run uses: the paper's nets when their weights are cached, else a weight-free pair, said plainly."""

from pathlib import Path

import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

import pti
from helpers import make_scripted_vgg16_standin, random_lpips_state_dicts, standin_registry
from pti.engine import weights as W
from pti.engine.invert import InvertConfig
from pti.engine.losses import (
    LPIPSPerceptual,
    VGGProjectorMetric,
    WeightFreePerceptual,
    WeightFreeProjectorMetric,
    load_losses,
    to_0_255,
)
from pti.engine.ssim import ms_ssim
from pti.engine.tune import TuneConfig
from pti.errors import WeightsError


def _cache_standins(tmp_path: Path) -> W.Registry:
    """vgg16.pt (TorchScript stand-in), an AlexNet trunk and LPIPS heads, random, in the real formats."""
    reg = standin_registry(tmp_path / "cache")
    trunk, heads = random_lpips_state_dicts("alex", seed=0)
    torch.save(trunk, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(heads, tmp_path / "alex.pth")
    make_scripted_vgg16_standin(tmp_path / "vgg16.pt", seed=3)
    for f in ("alexnet-owt-7be5be79.pth", "alex.pth", "vgg16.pt"):
        reg.import_file(tmp_path / f)
    return reg


def test_without_weights_falls_back_and_says_so(tmp_path):
    reg = standin_registry(tmp_path / "empty")
    losses = load_losses(registry=reg)
    assert not losses.official and isinstance(losses.perceptual, WeightFreePerceptual)
    assert "WEIGHT-FREE" in losses.notice and "pti weights" in losses.notice
    with pytest.raises(WeightsError, match="vgg16.pt"):
        load_losses(registry=reg, allow_fallback=False)


def test_with_weights_cached_the_paper_losses_are_used(tmp_path):
    reg = _cache_standins(tmp_path)
    losses = load_losses(registry=reg, allow_fallback=False)
    assert losses.official and losses.notice is None
    assert isinstance(losses.projector, VGGProjectorMetric) and isinstance(losses.perceptual, LPIPSPerceptual)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert losses.perceptual(x, x).shape == (2,)
    assert torch.allclose(losses.perceptual(x, x), torch.zeros(2), atol=1e-6)


def test_pipeline_uses_paper_losses_when_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PTI_HOME", str(tmp_path / "unused"))
    reg = _cache_standins(tmp_path)
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    res = pti.tune(
        [photo],
        out=tmp_path / "out",
        device="cpu",
        registry=reg,
        allow_fallback=False,
        invert_cfg=InvertConfig(steps=3),
        tune_cfg=TuneConfig(max_steps=2),
    )
    rep = res[0].report
    assert rep["official_losses"] is True and rep["notice"] is None
    assert "lpips_alex" in rep["after_tuning"] and "lpips_alex" in rep["before_tuning"]
    assert rep["losses"]["perceptual"].startswith("lpips-alex")


def test_weight_free_pair_measures_what_it_says() -> None:
    """The fallback perceptual term is 1 - MS-SSIM per image; the fallback projector metric is
    (1 - MS-SSIM) + MSE on [0, 1] images area-downsampled to 256 px, like the VGG metric's input."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    perceptual = WeightFreePerceptual()
    assert perceptual(a, b).shape == (3,)
    assert torch.equal(perceptual(a, b), 1 - ms_ssim(a, b))
    assert torch.allclose(perceptual(a, a), torch.zeros(3), atol=1e-5) and (perceptual(a, b) > 0.05).all()
    x = a.clone().requires_grad_(True)
    perceptual(x, b).sum().backward()
    assert x.grad.abs().sum() > 0

    metric = WeightFreeProjectorMetric()
    big_a, big_b = (F.interpolate(t[:1], size=(512, 512), mode="nearest") for t in (a, b))
    small_a, small_b = (F.interpolate(t, size=(256, 256), mode="area") for t in (big_a, big_b))
    got = metric.distance(to_0_255(big_a), metric.prepare(to_0_255(big_b)))
    x, y = to_0_255(small_a) / 255, to_0_255(small_b) / 255
    want = (1 - ms_ssim(x, y, value_range=(0.0, 1.0)).mean()) + F.mse_loss(x, y)
    assert got.ndim == 0 and torch.allclose(got, want, rtol=1e-6)
    assert float(metric.distance(to_0_255(big_a), metric.prepare(to_0_255(big_a)))) == pytest.approx(0, abs=1e-5)
