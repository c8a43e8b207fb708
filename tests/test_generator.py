"""The generator against stylegan2-ada-pytorch's own outputs, and its basic contracts.

`tests/data/sg2ada_golden.npz` holds outputs of NVIDIA's code for two small configs (one with
fp16 resolutions and conv_clamp), made by `tools/parity_sg2ada.py --write-golden` from weights
the tool and this test both build with `golden_generator`. Set PTI_SG2ADA_PATH to a checkout of
stylegan2-ada-pytorch to also run the live side-by-side comparison.
"""

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pti import kernels
from pti.engine.generator import TINY_CONFIG, Generator, tiny_generator
from pti.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = np.load(ROOT / "tests/data/sg2ada_golden.npz")

_spec = importlib.util.spec_from_file_location("parity_sg2ada", ROOT / "tools/parity_sg2ada.py")
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)


@pytest.mark.parametrize("name", sorted(parity.GOLDEN_CONFIGS))
def test_matches_stylegan2_ada_outputs(name):
    G = parity.golden_generator(name)
    G.impl = "ref"
    z = torch.from_numpy(GOLDEN[f"{name}/z"])
    with torch.no_grad():
        ws = G.mapping(z, truncation_psi=0.7)
        np.testing.assert_allclose(ws.numpy(), GOLDEN[f"{name}/ws"], rtol=0, atol=1e-5)
        ws_cut = G.mapping(z, truncation_psi=0.5, truncation_cutoff=2)
        np.testing.assert_allclose(ws_cut.numpy(), GOLDEN[f"{name}/ws_cutoff"], rtol=0, atol=1e-5)
        for fp32 in (True, False):
            for fused in (True, False):
                img = G.synthesis(ws, noise_mode="const", force_fp32=fp32, fused_modconv=fused)
                ref = GOLDEN[f"{name}/img_fp32={fp32}_fused={fused}"]
                assert img.dtype == torch.float32
                np.testing.assert_allclose(img.numpy(), ref, rtol=0, atol=1e-5, err_msg=f"fp32={fp32} fused={fused}")
    G.train()
    ws1 = ws.clone().requires_grad_(True)
    img = G.synthesis(ws1, noise_mode="const", force_fp32=True)
    (img * torch.linspace(-1, 1, img.numel()).reshape(img.shape)).sum().backward()
    np.testing.assert_allclose(ws1.grad.numpy(), GOLDEN[f"{name}/grad_ws"], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not os.environ.get("PTI_SG2ADA_PATH"), reason="set PTI_SG2ADA_PATH to a stylegan2-ada-pytorch checkout")
def test_live_side_by_side():
    sys.path.insert(0, os.environ["PTI_SG2ADA_PATH"])
    from training import networks as nv_net

    for kw in parity.GOLDEN_CONFIGS.values():
        report = parity.compare(nv_net, kw)
        assert report.pop("params without grad") == []
        assert max(report.values()) <= 1e-5, report


def test_gradients_reach_w_and_every_synthesis_parameter():
    G = parity.golden_generator("fp16_64px_clamp").train().requires_grad_(True)
    ws = torch.randn([1, G.num_ws, G.w_dim], requires_grad=True)
    G.synthesis(ws, noise_mode="const", force_fp32=True).square().mean().backward()
    assert ws.grad is not None and ws.grad.abs().sum() > 0
    for name, p in G.synthesis.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_noise_modes_and_shapes():
    G = tiny_generator()
    ws = G.mapping(torch.randn([2, G.z_dim]), truncation_psi=0.7)
    assert ws.shape == (2, G.num_ws, G.w_dim)
    const1 = G.synthesis(ws, noise_mode="const")
    const2 = G.synthesis(ws, noise_mode="const")
    assert const1.shape == (2, 3, 64, 64)
    assert torch.equal(const1, const2)
    none = G.synthesis(ws, noise_mode="none")
    rand = G.synthesis(ws, noise_mode="random")
    assert not torch.equal(none, const1) and not torch.equal(rand, const1)
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(ws, noise_mode="loud")
    with pytest.raises(ValueError, match="ws must be"):
        G.synthesis(ws[:, :3])


def test_truncation_psi_zero_gives_w_avg():
    G = tiny_generator()
    ws = G.mapping(torch.randn([3, G.z_dim]), truncation_psi=0.0)
    torch.testing.assert_close(ws, G.mapping.w_avg.expand_as(ws))


def test_tiny_generator_is_deterministic():
    a, b = tiny_generator(), tiny_generator()
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    assert a.init_kwargs == Generator(**TINY_CONFIG).init_kwargs


def test_config_f_layout():
    # The 1024 px FFHQ layout: 18 w's, fp16 on the 4 highest resolutions, 28.27 M synthesis params.
    G = Generator(z_dim=512, w_dim=512, img_resolution=1024, img_channels=3,
                  synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256))
    assert G.num_ws == 18
    assert G.synthesis.fp16_resolutions == [128, 256, 512, 1024]
    n_syn = sum(p.numel() for p in G.synthesis.parameters())
    n_map = sum(p.numel() for p in G.mapping.parameters())
    assert round(n_syn / 1e6, 2) == 28.27 and round(n_map / 1e6, 2) == 2.10


@pytest.mark.parametrize("kwargs,match", [
    (dict(c_dim=10), "conditional"),
    (dict(synthesis_kwargs=dict(architecture="resnet")), "architecture"),
    (dict(synthesis_kwargs=dict(magnitude_ema_beta=0.99)), "unsupported synthesis"),
])
def test_unsupported_configs_are_refused(kwargs, match):
    base = dict(z_dim=8, w_dim=8, img_resolution=8, img_channels=3)
    with pytest.raises(CheckpointError, match=match):
        Generator(**{**base, **kwargs})


def test_impl_dispatch_uses_registered_kernel_and_reports_it():
    calls = []

    def counting_modconv(*args, **kwargs):
        calls.append(1)
        return kernels.ref.modulated_conv2d(*args, **kwargs)

    G = tiny_generator()
    ws = G.mapping(torch.randn([1, G.z_dim]))
    ref_img = G.synthesis(ws, noise_mode="const", impl="ref")
    assert kernels.chosen()["modulated_conv2d"] == "ref"
    kernels.register("modulated_conv2d", "counting", counting_modconv, supports=lambda x, *a, **k: x.ndim == 4)
    try:
        img = G.synthesis(ws, noise_mode="const")  # impl "auto" picks the registered kernel
        assert calls and kernels.chosen()["modulated_conv2d"] == "counting"
        assert torch.equal(img, ref_img)
        with pytest.raises(ValueError, match="no implementation"):
            G.synthesis(ws, impl="nonexistent")
    finally:
        kernels._REGISTRY["modulated_conv2d"].clear()
