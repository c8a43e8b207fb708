"""The tuning step's pivot and locality terms from one batched render (`pti.engine.batched`), and the
per-sample noise modes it renders with (`noise_mode=("const", "none")`).

Tiny generator (64 px, random fixed-seed weights) and LPIPS-alex v0.1 with random weights, fp32 on CPU.
Per-sample noise is checked bit for bit where every op is per sample (the same batch, one mode per sample
or the whole batch in that mode); the batched terms against `pivot_terms` + `locality_terms` within a
float32 bound derived below, since a batch of two may sum in another order than two batches of one.
"""

from __future__ import annotations

import collections
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import fan_in_and_depth, random_lpips, small_generator
from pti.benchmark import build
from pti.engine.batched import pivot_and_locality_terms, prefer_batched
from pti.engine.generator import SynthesisLayer, ToRGBLayer, tiny_generator
from pti.engine.losses import WeightFreePerceptual
from pti.engine.tune import _prepare, locality_terms, pivot_terms

EPS32 = torch.finfo(torch.float32).eps
TERMS = ("l2", "lpips", "reg_l2", "reg_lpips")


@pytest.fixture(scope="module")
def lpips():
    return random_lpips()


def _inputs(G, seed: int = 0):
    """A pivot, a locality latent (psi 0.5, as `locality_ws` truncates) and a target in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pivot = G.mapping(torch.randn([1, G.z_dim], generator=g))
        w_r = G.mapping(torch.randn([1, G.z_dim], generator=g), truncation_psi=0.5)
    target = torch.rand([1, G.img_channels, G.img_resolution, G.img_resolution], generator=g) * 2 - 1
    return pivot, w_r, target


def _networks(tuned: bool):
    """(tuned, original) as `tune` holds them; `tuned=True` moves the tuned copy off the original (1 % of
    each parameter's spread, about what tens of Adam steps at lr 3e-4 do), so the locality terms are not
    zero; `tuned=False` is step 0, where the two are equal."""
    G = tiny_generator()
    G.impl = "ref"
    G_tuned, G_orig = _prepare(G)
    if tuned:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in G_tuned.synthesis.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01 * (p.std() if p.numel() > 1 else p.abs()))
    return G_tuned, G_orig


def _lpips_fan_in_and_depth(perceptual) -> tuple[int, int]:
    """The largest fan-in of the LPIPS net's convolutions and its depth (the trunk's convs and one head)."""
    convs = [m for m in perceptual.net.net.modules() if isinstance(m, torch.nn.Conv2d)]
    return max(m.weight[0].numel() for m in convs), len(convs) + 1


def _step(terms_fn, synthesis) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The four terms and the gradient of tune's loss (weights 1, 1, 0.1, 0.1) on every synthesis parameter."""
    synthesis.zero_grad(set_to_none=True)
    terms = terms_fn()
    (terms[0] + terms[1] + 0.1 * terms[2] + 0.1 * terms[3]).backward()
    grads = {n: p.grad.clone() for n, p in synthesis.named_parameters()}
    synthesis.zero_grad(set_to_none=True)
    return [t.detach() for t in terms], grads


@contextlib.contextmanager
def branches(G_tuned, perceptual):
    """Records, per call, which side of every kink the forward took: the sign of each tuned synthesis layer's
    output (leaky ReLU keeps the sign), whether it or a toRGB output hit the clamp, the sign of each LPIPS
    ReLU's output and each max-pool's choice. Gradients jump across a kink, so two evaluations are comparable
    by a rounding bound only where they took the same branches (measured: one b8.conv1 pre-activation at
    1.7e-7 in float64 and -5e-8 in float32 moves that layer's weight gradient by 1.2 %)."""
    record: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    hooks = []
    for name, m in G_tuned.synthesis.named_modules():
        if isinstance(m, (SynthesisLayer, ToRGBLayer)):

            def layer(mod, inp, out, name=name, clamp=m.conv_clamp, kinked=isinstance(m, SynthesisLayer)):
                if kinked:  # the leaky ReLU's kink at 0 (toRGB is linear up to its clamp)
                    record[f"G.{name}.sign"].append(out.detach() > 0)
                if clamp is not None:
                    record[f"G.{name}.clamp"].append(out.detach().abs() >= clamp)

            hooks.append(m.register_forward_hook(layer))
    for name, m in perceptual.net.net.named_modules():
        if isinstance(m, torch.nn.ReLU):
            hooks.append(m.register_forward_hook(lambda mod, inp, out, n=name: record[f"P.{n}"].append(out > 0)))
        elif isinstance(m, torch.nn.MaxPool2d):

            def pool(mod, inp, out, name=name):
                kw = dict(stride=mod.stride, padding=mod.padding, dilation=mod.dilation, ceil_mode=mod.ceil_mode)
                record[f"P.{name}"].append(F.max_pool2d(inp[0].detach(), mod.kernel_size, return_indices=True, **kw)[1])

            hooks.append(m.register_forward_hook(pool))
    try:
        yield record
    finally:
        for h in hooks:
            h.remove()


def different_branch(sep: dict, bat: dict) -> str | None:
    """The first kink where the separate calls (rearranged into the batched calls' batches) and the batched
    calls went different ways, or None. Separate: two tuned renders ([pivot], [w_r]) and four LPIPS trunk
    passes ([synth], [target], [old], [new]); batched: one render [pivot, w_r] and two trunk passes
    ([synth, new], [target, old])."""
    assert sep.keys() == bat.keys()
    for name, c in sep.items():
        want = [torch.cat(c)] if name.startswith("G.") else [torch.cat([c[0], c[3]]), torch.cat([c[1], c[2]])]
        if len(want) != len(bat[name]) or not all(torch.equal(a, b) for a, b in zip(want, bat[name])):
            return name
    return None


def separate(G_tuned, G_orig, perceptual, pivot, target, w_r):
    l2, lp = pivot_terms(G_tuned.synthesis, perceptual, pivot, target, "fp32")
    reg_l2, reg_lp = locality_terms(G_tuned.synthesis, G_orig.synthesis, perceptual, w_r, "fp32")
    return [l2, lp, reg_l2, reg_lp]


def batched(G_tuned, G_orig, perceptual, pivot, target, w_r, fused_modconv=None):
    return list(
        pivot_and_locality_terms(
            G_tuned.synthesis, G_orig.synthesis, perceptual, pivot, target, w_r, "fp32", fused_modconv=fused_modconv
        )
    )


def wrong_noise(G_tuned, G_orig, perceptual, pivot, target, w_r):
    """Wrong on purpose: the locality sample rendered with the constant noise too."""
    both = G_tuned.synthesis(torch.cat([pivot, w_r]), noise_mode="const", force_fp32=True).float()
    with torch.no_grad():
        old = G_orig.synthesis(w_r, noise_mode="none", force_fp32=True).float()
    synth, new = both[:1], both[1:]
    lp = perceptual(both, torch.cat([target, old]))
    return [F.mse_loss(synth, target), lp[0], F.mse_loss(old, new), lp[1]]


def wrong_pairs(G_tuned, G_orig, perceptual, pivot, target, w_r):
    """Wrong on purpose: the perceptual call's second batch in the wrong order (synth vs old, new vs target).
    (Swapping the two arguments of one pair is not wrong: pti's perceptual distances are symmetric.)"""
    both = G_tuned.synthesis(torch.cat([pivot, w_r]), noise_mode=("const", "none"), force_fp32=True).float()
    with torch.no_grad():
        old = G_orig.synthesis(w_r, noise_mode="none", force_fp32=True).float()
    synth, new = both[:1], both[1:]
    lp = perceptual(both, torch.cat([old, target]))
    return [F.mse_loss(synth, target), lp[0], F.mse_loss(old, new), lp[1]]


def assert_same_step(want, got, G_tuned, perceptual, image_scale: float, grads: bool = True) -> None:
    """`got` (terms, and with `grads` the gradients) equals `want` to float32 rounding of a reordered evaluation.

    The bound: helpers.fp32_reorder_tolerance's argument, eps * sqrt(fan_in) * depth relative to the value's
    scale, for a quantity that comes out of `depth` layers each summing `fan_in` products in another order.
    - An image: the generator's fan-in and depth, at the image's scale s: delta = e_G * s.
    - An MSE between images u, v with u off by at most delta per pixel: |d MSE| <= 2 mean|u - v| delta +
      delta^2 <= 2 sqrt(MSE) delta + delta^2 (Cauchy-Schwarz). At step 0 the separate locality MSE is exactly
      0 (the same network, the same batch), the batched one is not: the bound is then delta^2.
    - LPIPS compares unit-normalized features, so their errors are relative: e = eps sqrt(F) (D_G + D_L), F
      the larger fan-in of the two networks; a head-weighted squared distance moves by at most
      2 sqrt(lpips W) e + W e^2 (the same Cauchy-Schwarz step), W the sum over layers of the largest head weight.
    - A gradient runs both chains forward and back: 2 (D_G + D_L) layers. The bound is norm-wise, as rounding
      bounds of products are: at the scale of its layer's largest gradient, not entry by entry. A layer's
      bias and noise strength sum its whole output-gradient map, whose terms cancel, so their own values are
      not the scale of their rounding; the layer's other gradients, made of the same map, are. The bound
      holds for a smooth function: the two evaluations must take the same branch at every kink (`branches`).
      (Measured here: at most 1.5 % of the bound where they do; 25 % on an input where one b8.conv1
      pre-activation crossed zero between them.)
    """
    (want_terms, want_grads), (got_terms, got_grads) = want, got
    fan_g, depth = fan_in_and_depth(G_tuned)
    depth_g = depth - G_tuned.mapping.num_layers  # the terms start at w: the synthesis network's layers only
    fan_l, depth_l = _lpips_fan_in_and_depth(perceptual)
    delta = EPS32 * math.sqrt(fan_g) * depth_g * image_scale
    e = EPS32 * math.sqrt(max(fan_g, fan_l)) * (depth_g + depth_l)
    heads = sum(float(m.model[1].weight.max()) for n, m in perceptual.net.named_children() if n.startswith("lin"))
    for name, w, g in zip(TERMS, want_terms, got_terms):
        v = float(w)
        if "l2" in name:
            bound = 2 * math.sqrt(v) * delta + delta**2
        else:
            bound = 2 * math.sqrt(v * heads) * e + heads * e**2
        assert abs(float(g) - v) <= bound, f"{name}: {float(g)} vs {v}, bound {bound:.3g}"
    if not grads:
        return
    e_grad = EPS32 * math.sqrt(max(fan_g, fan_l)) * 2 * (depth_g + depth_l)
    layer_scale: dict[str, float] = {}
    for n, g in want_grads.items():
        layer = n.rsplit(".", 1)[0]
        layer_scale[layer] = max(layer_scale.get(layer, 0.0), float(g.abs().max()))
    assert want_grads.keys() == got_grads.keys()
    for n, w in want_grads.items():
        atol = e_grad * layer_scale[n.rsplit(".", 1)[0]]
        torch.testing.assert_close(got_grads[n], w, rtol=0, atol=atol, msg=lambda m, n=n: f"grad of {n}: {m}")


@pytest.mark.parametrize("fused_modconv", [None, False], ids=["grouped", "shared-weight"])
@pytest.mark.parametrize("tuned", [False, True], ids=["step0", "tuned"])
def test_batched_terms_and_gradients_equal_the_two_calls(lpips, tuned, fused_modconv) -> None:
    """The terms on every input tried (they are continuous); the gradients on the first input where both
    evaluations took the same branch at every kink (a gradient jumps across one: `branches`). About half the
    inputs tried here have one pre-activation close enough to a kink for the two to differ."""
    G_tuned, G_orig = _networks(tuned)
    for seed in range(8):
        pivot, w_r, target = _inputs(G_tuned, seed)
        args = (G_tuned, G_orig, lpips, pivot, target, w_r)
        with branches(G_tuned, lpips) as sep:
            want = _step(lambda: separate(*args), G_tuned.synthesis)
        with branches(G_tuned, lpips) as bat:
            got = _step(lambda: batched(*args, fused_modconv=fused_modconv), G_tuned.synthesis)
        with torch.no_grad():
            scale = float(G_tuned.synthesis(torch.cat([pivot, w_r]), noise_mode="const", force_fp32=True).abs().max())
        smooth = different_branch(sep, bat) is None  # the bound is for a smooth function
        assert_same_step(want, got, G_tuned, lpips, scale, grads=smooth)
        if tuned:
            assert float(want[0][2]) > 0 and float(want[0][3]) > 0  # the locality terms are really compared
        else:  # the separate path compares a network with itself: exactly zero, the batched one nearly
            assert float(want[0][2]) == 0.0 and float(want[0][3]) == 0.0
        if smooth:
            return
    pytest.fail("no input among 8 seeds where the separate and the batched evaluations took the same branches")


@pytest.mark.parametrize("wrong", [wrong_noise, wrong_pairs], ids=["noise-const-for-both", "pairs-swapped"])
def test_a_wrong_batching_fails_the_comparison(lpips, wrong) -> None:
    G_tuned, G_orig = _networks(True)
    pivot, w_r, target = _inputs(G_tuned)
    args = (G_tuned, G_orig, lpips, pivot, target, w_r)
    want = _step(lambda: separate(*args), G_tuned.synthesis)
    got = _step(lambda: wrong(*args), G_tuned.synthesis)
    with torch.no_grad():
        scale = float(G_tuned.synthesis(torch.cat([pivot, w_r]), noise_mode="const", force_fp32=True).abs().max())
    with pytest.raises(AssertionError):
        assert_same_step(want, got, G_tuned, lpips, scale, grads=False)  # the terms alone give it away


def test_batched_terms_are_float32_from_a_bf16_forward(lpips) -> None:
    """Under bf16 the forward runs in bfloat16 autocast and the terms come back float32, as the two calls'."""
    G_tuned, G_orig = _networks(True)
    pivot, w_r, target = _inputs(G_tuned)
    terms = pivot_and_locality_terms(G_tuned.synthesis, G_orig.synthesis, lpips, pivot, target, w_r, "bf16")
    assert [t.dtype for t in terms] == [torch.float32] * 4
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms)


@pytest.mark.parametrize("make", [tiny_generator, small_generator], ids=["tiny", "small-fp16-block"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "shared-weight"])
def test_per_sample_noise_is_each_samples_mode_bit_for_bit(make, fused) -> None:
    """In one batch, a sample rendered with its own mode equals the same sample with the whole batch in that
    mode, bit for bit: every op is per sample ('const' adds the same product of map and strength, 'none'
    adds +0.0). A tuple of one mode is that mode. Through the reference ops of `modulated_conv2d_act`, with
    the fp16 blocks on (force_fp32=False) where the generator has them."""
    G = make()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ws = G.mapping(torch.randn([2, G.z_dim], generator=g))

        def render(w, mode):
            return G.synthesis(w, noise_mode=mode, force_fp32=False, fused_modconv=fused, impl="ref")

        mixed, const, none = render(ws, ("const", "none")), render(ws, "const"), render(ws, "none")
        assert torch.equal(mixed[0], const[0]) and torch.equal(mixed[1], none[1])
        assert not torch.equal(const[1], none[1])  # the noise is really there
        for mode in ("const", "none"):
            assert torch.equal(render(ws[:1], (mode,)), render(ws[:1], mode))
            assert torch.equal(render(ws, [mode, mode]), render(ws, mode))
        flipped = render(ws, ("none", "const"))
        assert torch.equal(flipped[0], none[0]) and torch.equal(flipped[1], const[1])


def test_per_sample_noise_gradients_reach_the_strength_from_const_samples_only() -> None:
    G = tiny_generator().requires_grad_(True)
    layer = G.synthesis.b16.conv0
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        ws = G.mapping(torch.randn([2, G.z_dim], generator=g))
    G.synthesis(ws, noise_mode=("none", "none"), force_fp32=True).square().mean().backward()
    assert layer.noise_strength.grad is None  # 'none' throughout: the strength is not in the graph
    G.synthesis(ws, noise_mode=("const", "none"), force_fp32=True).square().mean().backward()
    assert layer.noise_strength.grad is not None and float(layer.noise_strength.grad) != 0.0


def test_per_sample_random_noise_draws_for_its_sample_only() -> None:
    G = tiny_generator()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        ws = G.mapping(torch.randn([2, G.z_dim], generator=g))
        torch.manual_seed(0)
        a = G.synthesis(ws, noise_mode=("random", "none"), force_fp32=True)
        torch.manual_seed(1)
        b = G.synthesis(ws, noise_mode=("random", "none"), force_fp32=True)
        none = G.synthesis(ws, noise_mode="none", force_fp32=True)
    assert not torch.equal(a[0], b[0]) and torch.equal(a[1], none[1]) and torch.equal(b[1], none[1])


@pytest.mark.parametrize(
    "mode, match",
    [
        (("const",), "1 per-sample modes for a batch of 2"),
        (("const", "none", "none"), "3 per-sample modes for a batch of 2"),
        (("const", "loud"), "each per-sample noise_mode must be one of .* got 'loud'"),
        (("const", None), "each per-sample noise_mode must be one of .* got None"),
        ("loud", "noise_mode must be one of"),
        (7, "noise_mode must be one of .* or a tuple of them, got 7"),
    ],
)
def test_a_bad_per_sample_noise_mode_is_one_line(mode, match) -> None:
    G = tiny_generator()
    ws = G.mapping(torch.zeros([2, G.z_dim]))
    with pytest.raises(ValueError, match=match) as err:
        G.synthesis(ws, noise_mode=mode)
    assert "\n" not in str(err.value)


def test_batching_is_preferred_only_where_it_was_measured_faster() -> None:
    """The tiny generator on a CPU (1.2x per step), not paper256 there (0.95x), not CUDA (not measured)."""
    tiny = tiny_generator()
    assert prefer_batched(tiny, "cpu") and prefer_batched(tiny, torch.device("cpu"))
    assert not prefer_batched(build("paper256"), "cpu")
    assert not prefer_batched(tiny, "cuda")


@pytest.mark.parametrize("make", [random_lpips, WeightFreePerceptual], ids=["lpips", "weight-free"])
def test_the_perceptual_distances_are_symmetric_bit_for_bit(make) -> None:
    """What lets the batched call pass the locality pair as (new, old) where `locality_terms` passes (old, new)."""
    perceptual = make()
    g = torch.Generator().manual_seed(6)
    a, b = (torch.rand([2, 3, 64, 64], generator=g) * 2 - 1 for _ in range(2))
    assert torch.equal(perceptual(a, b), perceptual(b, a))
