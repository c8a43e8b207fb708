"""rosinality stylegan2-pytorch .pt -> our Generator.

rosinality's real channel table is fixed (512 channels up to 32 px), too big for a quick test, so the
state dicts here use rosinality's names and layouts with small channels (the converter reads channels
from shapes). `rosinality_forward` is an independent re-statement of rosinality's forward pass
(EqualLinear, fused modulated conv with the 1/sqrt(fan_in) scale before demodulation, transposed conv +
blur for upsampling, NoiseInjection, FusedLeakyReLU, ToRGB + upsampled skip): converted outputs must
match it to float32 rounding (`helpers.fp32_reorder_tolerance`), a bound that deliberately wrong mappings
are shown to fail. A side-by-side run against rosinality's own model.py is recorded in the
`pti.engine.rosinality` docstring.
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import fan_in_and_depth, fp32_reorder_tolerance
from pti.engine.checkpoint import load_checkpoint, load_generator
from pti.engine.generator import Generator
from pti.engine.rosinality import W_AVG_SAMPLES, W_AVG_SEED
from pti.errors import CheckpointError

SIZE, STYLE_DIM, N_MLP = 16, 32, 2
CHANNELS = {4: 32, 8: 32, 16: 16}  # = min(256 // r, 32): NVIDIA channel_base 256, channel_max 32
LR_MLP = 0.01


def _blur_kernel() -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = torch.outer(k, k)
    return k / k.sum() * 4  # x2 upsampling keeps the mean: factor**2


def rosinality_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=1.0: torch.randn(*shape, generator=g) * s  # noqa: E731
    sd = {}
    for i in range(1, N_MLP + 1):
        sd[f"style.{i}.weight"] = rnd(STYLE_DIM, STYLE_DIM) / LR_MLP
        sd[f"style.{i}.bias"] = rnd(STYLE_DIM, s=10.0)

    def styled(prefix, cin, cout, up):
        sd[f"{prefix}.conv.weight"] = rnd(1, cout, cin, 3, 3)
        sd[f"{prefix}.conv.modulation.weight"] = rnd(cin, STYLE_DIM)
        sd[f"{prefix}.conv.modulation.bias"] = 1 + rnd(cin, s=0.1)
        if up:
            sd[f"{prefix}.conv.blur.kernel"] = _blur_kernel()
        sd[f"{prefix}.noise.weight"] = rnd(1, s=0.3)
        sd[f"{prefix}.activate.bias"] = rnd(cout, s=0.1)

    def rgb(prefix, cin, up):
        if up:
            sd[f"{prefix}.upsample.kernel"] = _blur_kernel()
        sd[f"{prefix}.conv.weight"] = rnd(1, 3, cin, 1, 1)
        sd[f"{prefix}.conv.modulation.weight"] = rnd(cin, STYLE_DIM)
        sd[f"{prefix}.conv.modulation.bias"] = 1 + rnd(cin, s=0.1)
        sd[f"{prefix}.bias"] = rnd(1, 3, 1, 1, s=0.1)

    sd["input.input"] = rnd(1, CHANNELS[4], 4, 4)
    styled("conv1", CHANNELS[4], CHANNELS[4], False)
    rgb("to_rgb1", CHANNELS[4], False)
    res = [8 * 2**i for i in range(int(math.log2(SIZE)) - 2)]
    for i, r in enumerate(res):
        styled(f"convs.{2 * i}", CHANNELS[r // 2], CHANNELS[r], True)
        styled(f"convs.{2 * i + 1}", CHANNELS[r], CHANNELS[r], False)
        rgb(f"to_rgbs.{i}", CHANNELS[r], True)
    for j in range(2 * len(res) + 1):
        r = 4 * 2 ** ((j + 1) // 2)
        sd[f"noises.noise_{j}"] = rnd(1, 1, r, r)
    return sd


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2) * math.sqrt(2)  # FusedLeakyReLU: slope 0.2, gain sqrt(2)


def rosinality_mapping(sd, z):
    """rosinality's style network: PixelNorm, then n_mlp EqualLinear layers (lr_mul 0.01) with FusedLeakyReLU."""
    w = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)
    for i in range(1, N_MLP + 1):
        weight = sd[f"style.{i}.weight"] * (LR_MLP / math.sqrt(STYLE_DIM))
        w = _lrelu(w @ weight.t() + sd[f"style.{i}.bias"] * LR_MLP)
    return w


def rosinality_forward(sd, z, latent_avg, truncation):
    """rosinality's Generator.forward(randomize_noise=False) restated from its equations."""
    lrelu = _lrelu
    w = latent_avg + truncation * (rosinality_mapping(sd, z) - latent_avg)

    def modconv(x, prefix, style, demod, up):
        weight = sd[f"{prefix}.conv.weight"][0]  # [O, I, k, k]
        o, i, k, _ = weight.shape
        s = (
            style @ (sd[f"{prefix}.conv.modulation.weight"] / math.sqrt(STYLE_DIM)).t()
            + sd[f"{prefix}.conv.modulation.bias"]
        )
        wt = weight[None] / math.sqrt(i * k * k) * s[:, None, :, None, None]  # [N, O, I, k, k]
        if demod:
            wt = wt * torch.rsqrt(wt.pow(2).sum([2, 3, 4]) + 1e-8)[:, :, None, None, None]
        outs = []
        for n in range(x.shape[0]):
            if up:  # transposed conv, stride 2, then a [1,3,3,1] blur padded by 1
                y = F.conv_transpose2d(x[n : n + 1], wt[n].transpose(0, 1), stride=2)
                y = F.conv2d(F.pad(y, [1, 1, 1, 1]), _blur_kernel().expand(o, 1, 4, 4), groups=o)
            else:
                y = F.conv2d(x[n : n + 1], wt[n], padding=k // 2)
            outs.append(y)
        return torch.cat(outs)

    def styled(x, prefix, style, j, up=False):
        x = modconv(x, prefix, style, True, up)
        x = x + sd[f"{prefix}.noise.weight"] * sd[f"noises.noise_{j}"]
        return lrelu(x + sd[f"{prefix}.activate.bias"][None, :, None, None])

    def upsample(img):  # zero-insertion x2, pad (2, 1), 4x4 blur
        n, c, h, wd = img.shape
        up = torch.zeros(n, c, 2 * h, 2 * wd)
        up[:, :, ::2, ::2] = img
        return F.conv2d(F.pad(up, [2, 1, 2, 1]), _blur_kernel().expand(c, 1, 4, 4), groups=c)

    x = sd["input.input"].repeat(z.shape[0], 1, 1, 1)
    x = styled(x, "conv1", w, 0)
    img = modconv(x, "to_rgb1", w, False, False) + sd["to_rgb1.bias"]
    for i in range(int(math.log2(SIZE)) - 2):
        x = styled(x, f"convs.{2 * i}", w, 2 * i + 1, up=True)
        x = styled(x, f"convs.{2 * i + 1}", w, 2 * i + 2)
        img = modconv(x, f"to_rgbs.{i}", w, False, False) + sd[f"to_rgbs.{i}.bias"] + upsample(img)
    return img


@pytest.fixture(scope="module")
def sd():
    return rosinality_state_dict()


def test_config_inferred_from_shapes(tmp_path, sd):
    torch.save({"g_ema": sd, "latent_avg": torch.zeros(STYLE_DIM)}, tmp_path / "r.pt")
    loaded = load_checkpoint(tmp_path / "r.pt")
    assert loaded.format == "rosinality-pt" and loaded.notes == []
    kw = loaded.generator.init_kwargs
    assert (kw["img_resolution"], kw["z_dim"], kw["w_dim"]) == (SIZE, STYLE_DIM, STYLE_DIM)
    assert kw["mapping_kwargs"] == {"num_layers": N_MLP, "lr_multiplier": LR_MLP}
    assert kw["synthesis_kwargs"]["channel_max"] == 32
    syn = loaded.generator.synthesis
    assert [getattr(syn, f"b{r}").conv1.weight.shape[0] for r in (4, 8, 16)] == [32, 32, 16]


Z = torch.randn(3, STYLE_DIM, generator=torch.Generator().manual_seed(1))
LATENT_AVG = torch.randn(STYLE_DIM, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, sd):
    """The checkpoint through our loader, and rosinality's images at Z (truncation 0.7)."""
    path = tmp_path_factory.mktemp("ros") / "r.pt"
    torch.save({"g_ema": sd, "g": sd, "latent_avg": LATENT_AVG}, path)
    with torch.no_grad():
        return load_generator(path), rosinality_forward(sd, Z, LATENT_AVG, truncation=0.7)


def _render(G, fused_modconv=True) -> torch.Tensor:
    with torch.no_grad():
        return G.synthesis(G.mapping(Z, None, truncation_psi=0.7), noise_mode="const", fused_modconv=fused_modconv)


def _tolerance(G, ref: torch.Tensor) -> float:
    """Same function, different float order (see the pti.engine.rosinality docstring): the fp32
    reordering bound for G's fan-in (288) and depth (8) at the images' scale: 9e-5 for these images of
    +-5.4, where 2e-6 is measured; each wrong mapping below is off by 2e4 times that or more."""
    fan_in, depth = fan_in_and_depth(G)
    return fp32_reorder_tolerance(float(ref.abs().max()), fan_in, depth)


@pytest.mark.parametrize("fused_modconv", [True, False])
def test_renders_like_rosinality(converted, fused_modconv):
    G, ref = converted
    assert torch.equal(G.mapping.w_avg, LATENT_AVG)
    out = _render(G, fused_modconv)
    assert out.shape == ref.shape == (3, 3, SIZE, SIZE)
    assert float((out - ref).abs().max()) <= _tolerance(G, ref)


def _rebuilt(G, state=None, **mapping_kwargs) -> Generator:
    """G's weights (or `state`) in a Generator whose mapping options are updated with `mapping_kwargs`."""
    kwargs = {**G.init_kwargs, "mapping_kwargs": {**G.init_kwargs["mapping_kwargs"], **mapping_kwargs}}
    other = Generator(**kwargs).eval()
    other.load_state_dict(state or G.state_dict())
    return other


def _with(G, name: str, fn) -> Generator:
    state = dict(G.state_dict())
    state[name] = fn(state[name])
    return _rebuilt(G, state)


def _swapped(G, a: str, b: str) -> Generator:
    state = dict(G.state_dict())
    state[a], state[b] = state[b], state[a]
    return _rebuilt(G, state)


# Mappings one could plausibly get wrong, each a small change to the converted generator.
WRONG_MAPPINGS = {
    "up-conv kernel flipped": lambda G: _with(G, "synthesis.b8.conv0.weight", lambda w: w.flip([2, 3])),
    "conv weight transposed": lambda G: _with(G, "synthesis.b4.conv1.weight", lambda w: w.transpose(0, 1)),
    "noise maps off by one": lambda G: _swapped(G, "synthesis.b8.conv0.noise_const", "synthesis.b8.conv1.noise_const"),
    "lr_mul 1 instead of 0.01": lambda G: _rebuilt(G, lr_multiplier=1.0),
    "noise strength dropped": lambda G: _with(G, "synthesis.b8.conv1.noise_strength", torch.zeros_like),
}


@pytest.mark.parametrize("wrong", WRONG_MAPPINGS)
def test_a_wrong_mapping_fails_the_tolerance(converted, wrong):
    G, ref = converted
    assert float((_render(_rebuilt(G)) - ref).abs().max()) <= _tolerance(G, ref)  # the rebuild itself is faithful
    assert float((_render(WRONG_MAPPINGS[wrong](G)) - ref).abs().max()) > 10 * _tolerance(G, ref)


def test_training_checkpoint_without_latent_avg(tmp_path, sd):
    """w_avg is the mean of mapping(z) over W_AVG_SAMPLES z's from torch's generator seeded W_AVG_SEED."""
    args = argparse.Namespace(size=SIZE, latent=STYLE_DIM, n_mlp=N_MLP, channel_multiplier=2)
    torch.save({"g": sd, "d": {}, "g_ema": sd, "args": args, "ada_aug_p": 0.1}, tmp_path / "000100.pt")
    loaded = load_checkpoint(tmp_path / "000100.pt")
    assert any(f"w_avg estimated from {W_AVG_SAMPLES}" in n for n in loaded.notes)
    z = torch.randn([W_AVG_SAMPLES, STYLE_DIM], generator=torch.Generator().manual_seed(W_AVG_SEED))
    ws = rosinality_mapping({k: v.double() for k, v in sd.items()}, z.double())  # float64: the exact values
    w = ws.mean(0)
    # Ours maps each z in float32 (2 layers of 32 terms), then takes a float32 mean of 10000 of them,
    # which torch sums in blocks (pairwise): about eps * log2(N) more, at the scale of the w's averaged.
    scale = float(ws.abs().max())
    tol = (
        fp32_reorder_tolerance(scale, STYLE_DIM, N_MLP)
        + torch.finfo(torch.float32).eps * math.log2(W_AVG_SAMPLES) * scale
    )
    assert float((loaded.generator.mapping.w_avg.double() - w).abs().max()) <= tol
    other_seed = torch.randn([W_AVG_SAMPLES, STYLE_DIM], generator=torch.Generator().manual_seed(W_AVG_SEED + 1))
    assert float((rosinality_mapping(sd, other_seed).mean(0).double() - w).abs().max()) > 10 * tol  # the seed matters


def test_legacy_torch_serialization(tmp_path, sd):
    torch.save(
        {"g_ema": sd, "latent_avg": torch.zeros(STYLE_DIM)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False
    )
    assert load_generator(tmp_path / "old.pt").img_resolution == SIZE


def test_torch_file_that_is_not_rosinality(tmp_path, sd):
    torch.save({"model": sd}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="without 'g_ema' or 'g'.*model"):
        load_generator(tmp_path / "x.pt")
    broken = {k: v for k, v in sd.items() if not k.startswith("to_rgbs.0.conv.modulation")}
    torch.save({"g_ema": broken}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="lacks to_rgbs.0.conv.modulation"):
        load_generator(tmp_path / "broken.pt")


def test_torch_file_with_foreign_objects_is_refused(tmp_path, sd):
    torch.save({"g_ema": sd, "extra": argparse.ArgumentParser}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="more than weights"):
        load_generator(tmp_path / "evil.pt")


def test_truncated_torch_file(tmp_path, sd):
    torch.save({"g_ema": sd}, tmp_path / "r.pt")
    data = (tmp_path / "r.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt is a truncated or corrupt torch file"):
        load_generator(tmp_path / "cut.pt")
