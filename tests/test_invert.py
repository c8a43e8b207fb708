"""Step 1 (inversion): the projector finds a pivot closer to the target than its w_avg start.

Tiny generator (64 px, random fixed-seed weights) and perceptual nets whose weights the tests make:
the weight-free metric and the VGG16 TorchScript stand-in, each through the projector interface.
The target is rendered from the generator itself at a truncated random w, so it is reachable.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from helpers import assert_accepted, assert_refused, field_names, make_scripted_vgg16_standin, refused_cases
from pti.engine.generator import tiny_generator
from pti.engine.invert import InvertConfig, invert, learning_rate, noise_regularization, w_noise_scale, w_stats
from pti.engine.losses import VGGProjectorMetric, WeightFreeProjectorMetric, to_0_255
from pti.engine.perceptual import VGG16Metric

STEPS = 20  # enough for a clear drop on the tiny generator, well under 1 s per run


@pytest.fixture(scope="module")
def G():
    return tiny_generator()


@pytest.fixture(scope="module")
def target(G) -> torch.Tensor:
    """A reachable target: the generator's own render at a truncated random w (psi 0.7)."""
    z = torch.randn([1, G.z_dim], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return G.synthesis(G.mapping(z, truncation_psi=0.7), noise_mode="const", force_fp32=True)


@pytest.fixture(scope="module", params=["weight-free", "vgg16-standin"])
def metric(request, tmp_path_factory):
    if request.param == "weight-free":
        return WeightFreeProjectorMetric()
    path = make_scripted_vgg16_standin(tmp_path_factory.mktemp("vgg") / "vgg16.pt")
    return VGGProjectorMetric(VGG16Metric(path))


def _distance(G, metric, target, ws) -> float:
    """The metric at `ws` rendered with the generator's own constant noise (how the pivot is used)."""
    with torch.no_grad():
        synth = G.synthesis(ws, noise_mode="const", force_fp32=True)
        return float(metric.distance(to_0_255(synth), metric.prepare(to_0_255(target))))


def _start(G) -> torch.Tensor:
    w_avg, _ = w_stats(G)
    return w_avg.repeat([1, G.num_ws, 1])


# ---------------------------------------------------------------------------- it works


@pytest.mark.parametrize("space", ["w", "w+"])
def test_inversion_lowers_the_loss_from_w_avg(G, target, metric, space) -> None:
    res = invert(G, target, metric, InvertConfig(steps=STEPS, space=space))
    assert res.pivot.shape == (1, G.num_ws, G.w_dim)
    assert len(res.losses) == len(res.dists) == STEPS
    assert all(math.isfinite(v) for v in res.losses)
    # During optimization (with the optimized noise), the last steps beat the first ones.
    assert np.mean(res.dists[-3:]) < 0.8 * res.dists[0]
    # And what matters downstream: the pivot, rendered with G's own noise, beats the w_avg start.
    start, pivot = _distance(G, metric, target, _start(G)), _distance(G, metric, target, res.pivot)
    assert pivot < 0.85 * start, (start, pivot)
    if space == "w":  # one w for all layers: the pivot is that w repeated
        assert torch.equal(res.pivot, res.pivot[:, :1].expand_as(res.pivot))
    else:  # one w per layer: the layers moved apart
        assert not torch.equal(res.pivot, res.pivot[:, :1].expand_as(res.pivot))


def test_one_seed_one_result_and_another_seed_another(G, target) -> None:
    metric = WeightFreeProjectorMetric()
    a = invert(G, target, metric, InvertConfig(steps=8, seed=5))
    b = invert(G, target, metric, InvertConfig(steps=8, seed=5))
    c = invert(G, target, metric, InvertConfig(steps=8, seed=6))
    assert torch.equal(a.pivot, b.pivot) and a.losses == b.losses
    assert not torch.equal(a.pivot, c.pivot) and a.losses != c.losses


def test_invert_leaves_the_generator_alone(G, target) -> None:
    before = {k: v.clone() for k, v in G.state_dict().items()}
    grads = {k: p.requires_grad for k, p in G.named_parameters()}
    invert(G, target, WeightFreeProjectorMetric(), InvertConfig(steps=3))
    after = G.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # noise buffers included: inversion optimizes a private copy of them
        assert torch.equal(before[k], after[k]), k
    assert grads == {k: p.requires_grad for k, p in G.named_parameters()}
    assert all(p.grad is None for p in G.parameters())


def test_invert_emits_no_warnings(G, target) -> None:
    """A library call must not print; torch warns when a tensor that requires grad becomes a float."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        invert(G, target, WeightFreeProjectorMetric(), InvertConfig(steps=2))


def test_progress_reports_every_step(G, target) -> None:
    seen = []
    res = invert(G, target, WeightFreeProjectorMetric(), InvertConfig(steps=4), progress=lambda *a: seen.append(a))
    assert [(ph, s, n) for ph, s, n, _ in seen] == [("invert", i, 4) for i in range(1, 5)]
    assert [v["loss"] for *_, v in seen] == res.losses


# ---------------------------------------------------------------------------- the recipe's numbers


def _recipe_lr(step: int, steps: int) -> float:
    """REFERENCE §1, written out:
    t = step/steps; r = min(1, (1-t)/0.25); r = 0.5 - 0.5 cos(pi r); r *= min(1, t/0.05)."""
    t = step / steps
    r = min(1.0, (1.0 - t) / 0.25)
    r = 0.5 - 0.5 * math.cos(math.pi * r)
    r *= min(1.0, t / 0.05)
    return 0.01 * r


def test_learning_rate_schedule_matches_the_recipe() -> None:
    cfg = InvertConfig()  # 450 steps, peak 0.01
    assert learning_rate(0, cfg) == 0.0
    assert learning_rate(450, cfg) == pytest.approx(0.0, abs=1e-15)
    assert learning_rate(225, cfg) == pytest.approx(0.01)  # plateau
    assert learning_rate(45, cfg) == pytest.approx(0.01)  # t = 0.1: ramp-up done, ramp-down not begun
    assert learning_rate(11, cfg) == pytest.approx(0.01 * (11 / 450) / 0.05)  # linear ramp-up
    # Half way through the ramp-down (t = 0.875): the cosine is at 1/2.
    assert learning_rate(350, InvertConfig(steps=400)) == pytest.approx(0.005)
    for step in range(0, 451, 7):
        assert learning_rate(step, cfg) == pytest.approx(_recipe_lr(step, 450), abs=1e-15), step


def test_exploration_noise_decays_quadratically_to_zero() -> None:
    cfg = InvertConfig(steps=100)
    assert w_noise_scale(0, 2.0, cfg) == pytest.approx(2.0 * 0.05)
    assert w_noise_scale(30, 2.0, cfg) == pytest.approx(2.0 * 0.05 * (1 - 0.3 / 0.75) ** 2)
    assert w_noise_scale(75, 2.0, cfg) == 0.0 and w_noise_scale(99, 2.0, cfg) == 0.0


def test_w_stats_follow_the_recipe(G) -> None:
    """w_avg: mean of mapping(z) over 600 z from RandomState(123); w_std = sqrt(sum sq. dev. / N)."""
    w_avg, w_std = w_stats(G)
    z = torch.from_numpy(np.random.RandomState(123).randn(600, G.z_dim))
    with torch.no_grad():
        w = G.mapping(z)[:, 0].double()
    assert w_avg.shape == (1, 1, G.w_dim)
    torch.testing.assert_close(w_avg[0, 0].double(), w.mean(0), rtol=1e-5, atol=1e-5)
    assert w_std == pytest.approx(float(((w - w.mean(0)).square().sum() / 600).sqrt()), rel=1e-4)


def test_noise_regularization_prefers_white_noise() -> None:
    g = torch.Generator().manual_seed(0)
    white = [torch.randn(32, 32, generator=g), torch.randn(16, 16, generator=g)]
    # Each value repeated over a 2x2 block: neighbours are correlated.
    smooth = [torch.randn(s, s, generator=g).repeat_interleave(2, 0).repeat_interleave(2, 1) for s in (16, 8)]
    assert float(noise_regularization(white)) < 0.1 * float(noise_regularization(smooth))


NAN, INF = float("nan"), float("inf")
# Every field, with values it must refuse: out of range, not finite, or of the wrong kind.
INVERT_REFUSED = {
    "precision": ["fp16", "bf 16", None],
    "impl": ["compiled", "Ref", None, 0],
    "steps": [-5, 10.0, True],  # 0: only with a start (tests/test_init.py)
    "space": ["z", "W", None],
    "w_avg_samples": [0, 600.5],
    "w_avg_seed": [-1, 2**32, 1.5],  # numpy's RandomState takes 32-bit seeds
    "initial_lr": [0.0, -0.01, NAN, INF],
    "lr_rampup": [0.0, 1.5, NAN],  # divides t
    "lr_rampdown": [0.0, -0.25, 2.0],  # divides 1 - t
    "initial_noise_factor": [-0.05, INF],
    "noise_ramp": [0.0, -0.75, NAN],  # divides t
    "noise_reg_weight": [-1.0, INF],
    "seed": [-1, 2**64, "0"],
}
INVERT_EDGES = [
    dict(
        steps=1,
        space="w+",
        w_avg_samples=1,
        w_avg_seed=0,
        initial_lr=1e-9,
        lr_rampup=1.0,
        lr_rampdown=1.0,
        initial_noise_factor=0.0,
        noise_ramp=1e-6,
        noise_reg_weight=0.0,
        seed=None,
    ),
    dict(w_avg_seed=2**32 - 1, seed=2**64 - 1, lr_rampup=1e-6, noise_ramp=5.0, steps=np.int64(2)),
]


def test_every_invert_config_field_has_refused_values() -> None:
    assert set(INVERT_REFUSED) == field_names(InvertConfig)


@pytest.mark.parametrize("name,value", refused_cases(INVERT_REFUSED))
def test_a_bad_invert_config_is_refused_naming_the_field(name, value) -> None:
    assert_refused(InvertConfig, name, value)


@pytest.mark.parametrize("edges", INVERT_EDGES)
def test_the_edges_of_each_range_are_accepted(edges) -> None:
    cfg = assert_accepted(InvertConfig, edges)
    assert math.isfinite(learning_rate(0, cfg)) and math.isfinite(w_noise_scale(cfg.steps - 1, 1.0, cfg))
