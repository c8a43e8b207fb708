"""The generator's shape checks (NVIDIA's `assert_shape`) and the memory-format switch it does not have.

Every layer and block checks what it is given, as NVIDIA's networks.py does, so a tensor of the wrong
size stops with a message that names it instead of going through: a one-channel skip image broadcasts
onto the toRGB's three channels, and a feature map at the wrong resolution is convolved as it is when no
noise map pins the size. The checks compare fixed sizes only, so the exports (tests/test_export.py)
trace through them with a dynamic batch.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import SMALL, small_generator, write_nvidia_pickle
from pti.engine.checkpoint import load_generator
from pti.engine.generator import Generator, SynthesisLayer, ToRGBLayer


@pytest.fixture(scope="module")
def G() -> Generator:
    return small_generator(0)  # 16 px: b4 (const, 32 ch), b8 (32 -> 32 ch), b16 (32 -> 16 ch, fp16)


def _ws(G, n=2):
    return G.mapping(torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(0)))


def test_a_skip_image_of_the_wrong_channels_is_refused_not_broadcast(G):
    ws = _ws(G)
    x, img = G.synthesis.b4(None, None, ws[:, :2], noise_mode="const")
    assert img.shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"block's img must be \[N, 3, 4, 4\], got \(2, 1, 4, 4\)"):
        G.synthesis.b8(x, img[:, :1], ws[:, 1:4], noise_mode="const")


def test_features_at_the_wrong_resolution_are_refused(G):
    ws = _ws(G)
    x = torch.randn(2, 32, 8, 8)  # b8 takes b4's 4x4 features
    with pytest.raises(ValueError, match=r"block's x must be \[N, 32, 4, 4\], got \(2, 32, 8, 8\)"):
        G.synthesis.b8(x, None, ws[:, 1:4], noise_mode="none")
    with pytest.raises(ValueError, match=r"layer's x must be \[N, 32, 4, 4\], got \(2, 32, 8, 8\)"):
        G.synthesis.b8.conv0(x, ws[:, 1], noise_mode="none")


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda G, ws: G.synthesis.b8(torch.randn(2, 32, 4, 4), None, ws[:, 1:3]), r"block's ws must be \[N, 3, 32\]"),
        (lambda G, ws: G.synthesis.b8.conv1(torch.randn(2, 16, 8, 8), ws[:, 2]), r"layer's x must be \[N, 32, 8, 8\]"),
        (lambda G, ws: G.synthesis.b8.conv1(torch.randn(2, 32, 8, 8), ws[:, 2, :16]), r"layer's w must be \[N, 32\]"),
        (lambda G, ws: G.synthesis.b8.torgb(torch.randn(2, 16, 8, 8), ws[:, 3]), r"toRGB's x must be \[N, 32, N, N\]"),
        (lambda G, ws: G.synthesis.b8.torgb(torch.randn(32, 8, 8), ws[:, 3]), r"toRGB's x must be \[N, 32, N, N\]"),
    ],
    ids=["block-ws", "layer-x-channels", "layer-w", "torgb-x-channels", "torgb-x-3d"],
)
def test_each_layer_names_the_shape_it_takes(G, call, message):
    with pytest.raises(ValueError, match=message):
        call(G, _ws(G))


def test_the_layers_have_no_channels_last_switch_to_ignore():
    """NVIDIA's layers take `channels_last` (a memory format); ours took it and dropped it. Now they do not take it."""
    with pytest.raises(TypeError, match="channels_last"):
        SynthesisLayer(8, 8, w_dim=8, resolution=4, channels_last=True)
    with pytest.raises(TypeError, match="channels_last"):
        ToRGBLayer(8, 3, w_dim=8, channels_last=True)


def test_nvidia_init_kwargs_with_fp16_channels_last_still_load_and_render_the_same(G, tmp_path):
    """Their generators' init kwargs may carry `fp16_channels_last`: a memory layout, not a computation."""
    kwargs = copy.deepcopy(G.init_kwargs)
    kwargs["synthesis_kwargs"]["fp16_channels_last"] = True
    path = write_nvidia_pickle(tmp_path / "snap.pkl", G, kwargs_override=kwargs)
    loaded = load_generator(path)
    assert loaded.init_kwargs["synthesis_kwargs"]["fp16_channels_last"] is True
    assert loaded.synthesis.fp16_resolutions == G.synthesis.fp16_resolutions == [16]
    ws = _ws(G)
    assert torch.equal(loaded.synthesis(ws, noise_mode="const"), G.synthesis(ws, noise_mode="const"))
    assert SMALL["synthesis_kwargs"].get("fp16_channels_last") is None  # the fixture's own config did not carry it
