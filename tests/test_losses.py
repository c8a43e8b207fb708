"""Which losses a run uses: the paper's nets when their weights are cached, else a weight-free pair, said plainly."""

from dataclasses import replace
from pathlib import Path

import pytest
import skimage.data
import torch
from PIL import Image

import pti
from pti.engine import perceptual as P
from pti.engine import weights as W
from pti.engine.invert import InvertConfig
from pti.engine.losses import LPIPSPerceptual, VGGProjectorMetric, WeightFreePerceptual, load_losses
from pti.engine.tune import TuneConfig
from pti.errors import WeightsError


def _registry(cache: Path) -> W.Registry:
    # The real entry names with checksums dropped, so files the test makes can be imported.
    return W.Registry([replace(e, sha256=None, sha256_prefix=None, size=None) for e in W.DEFAULT_ENTRIES], cache_dir=cache)


def _cache_standins(tmp_path: Path) -> W.Registry:
    """vgg16.pt (TorchScript stand-in), an AlexNet trunk and LPIPS heads, random, in the real formats."""
    reg = _registry(tmp_path / "cache")
    g = torch.Generator().manual_seed(0)
    trunk = {k: torch.randn(t.shape, generator=g) * (2.0 / max(1, t[0].numel())) ** 0.5 for k, t in P.Trunk("alex").state_dict().items()}
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(P.CHANNELS["alex"])}
    torch.save(trunk, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(heads, tmp_path / "alex.pth")
    P.make_scripted_vgg16_standin(tmp_path / "vgg16.pt", seed=3)
    for f in ("alexnet-owt-7be5be79.pth", "alex.pth", "vgg16.pt"):
        reg.import_file(tmp_path / f)
    return reg


def test_without_weights_falls_back_and_says_so(tmp_path):
    reg = _registry(tmp_path / "empty")
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
    res = pti.tune([photo], out=tmp_path / "out", device="cpu", registry=reg, allow_fallback=False,
                   invert_cfg=InvertConfig(steps=3), tune_cfg=TuneConfig(max_steps=2))
    rep = res[0].report
    assert rep["official_losses"] is True and rep["notice"] is None
    assert "lpips_alex" in rep["after_tuning"] and "lpips_alex" in rep["before_tuning"]
    assert rep["losses"]["perceptual"].startswith("lpips-alex")
