"""Step 2 (pivotal tuning): reconstruction improves at the pivot, the early stop, locality, joint tuning.

Tiny generator (64 px, random fixed-seed weights). The perceptual term is LPIPS-alex v0.1 built by
the test from random weights in torchvision's / lpips' key layout (the official files cannot be
downloaded here); the targets are real photo crops (skimage's public-domain astronaut, and others).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_accepted, assert_refused, field_names, random_lpips, reconstruction_metrics, refused_cases
from pti.engine.generator import tiny_generator
from pti.engine.invert import InvertConfig, invert
from pti.engine.losses import LPIPSPerceptual, WeightFreePerceptual, WeightFreeProjectorMetric
from pti.engine.tune import TuneConfig, locality_ws, tune

skimage_data = pytest.importorskip("skimage.data")


def _crop(img: np.ndarray, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """uint8 [H, W, 3] crop (top, left, bottom, right) -> [1, 3, size, size] in [-1, 1]."""
    from PIL import Image

    t, l, b, r = box
    small = np.array(Image.fromarray(img[t:b, l:r]).resize((size, size), Image.Resampling.LANCZOS))
    return torch.from_numpy(small).float().permute(2, 0, 1)[None] / 127.5 - 1


@pytest.fixture(scope="module")
def G():
    return tiny_generator()


@pytest.fixture(scope="module")
def lpips() -> LPIPSPerceptual:
    return random_lpips()


@pytest.fixture(scope="module")
def face(G) -> torch.Tensor:
    """The astronaut's face, cropped square and resized to the generator's resolution."""
    return _crop(skimage_data.astronaut(), (20, 150, 240, 370), G.img_resolution)


@pytest.fixture(scope="module")
def pivot(G, face) -> torch.Tensor:
    return invert(G, face, WeightFreeProjectorMetric(), InvertConfig(steps=20)).pivot


def _state(G) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in G.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------- single identity


def test_tuning_lowers_mse_and_lpips_at_the_pivot(G, face, pivot, lpips) -> None:
    before_state = _state(G)
    before = reconstruction_metrics(G, face, pivot, lpips)
    res = tune(G, face, pivot, lpips, TuneConfig(max_steps=20, locality=False, lpips_threshold=0.0))
    after = reconstruction_metrics(res.G, face, pivot, lpips)
    assert res.steps == 20 and not res.early_stopped
    assert after["mse"] < 0.6 * before["mse"], (before, after)
    assert after["perceptual"] < 0.6 * before["perceptual"], (before, after)
    assert after["ms_ssim"] > before["ms_ssim"]
    assert res.curves["lpips"][-1] < res.curves["lpips"][0] and res.curves["l2"][-1] < res.curves["l2"][0]
    # Only synthesis is tuned; the mapping network and every buffer keep the original values.
    tuned = res.G.state_dict()
    for k, v in before_state.items():
        if not (k.startswith("synthesis.") and k in dict(res.G.named_parameters())):
            assert torch.equal(tuned[k], v), k
    assert not all(
        torch.equal(tuned[k], before_state[k]) for k, _ in res.G.synthesis.named_parameters(prefix="synthesis")
    )
    _assert_same_state(before_state, G.state_dict())  # the input generator is untouched
    assert all(not p.requires_grad for p in res.G.parameters())


def test_early_stop_before_the_first_step_applies_nothing(G, face, pivot, lpips) -> None:
    res = tune(G, face, pivot, lpips, TuneConfig(max_steps=10, lpips_threshold=100.0))
    assert res.early_stopped and res.steps == 0
    assert res.curves["loss"] == []
    _assert_same_state(_state(G), res.G.state_dict())


def test_early_stop_at_a_moderate_threshold(G, face, pivot, lpips) -> None:
    """The stop comes at the first step whose LPIPS is at or under the threshold, and that step is not applied."""
    cfg = TuneConfig(max_steps=12, locality=False, lpips_threshold=0.0)
    full = tune(G, face, pivot, lpips, cfg)
    curve = full.curves["lpips"]  # LPIPS at the pivot before each step
    threshold = curve[7]
    first = next(i for i, v in enumerate(curve) if v <= threshold)
    assert 0 < first <= 7

    res = tune(G, face, pivot, lpips, TuneConfig(max_steps=12, locality=False, lpips_threshold=threshold))
    assert res.early_stopped and res.steps == first
    assert res.curves["lpips"] == curve[:first]
    with torch.no_grad():
        at_stop = float(lpips(res.G.synthesis(pivot, noise_mode="const", force_fp32=True), face))
    assert at_stop <= threshold


def test_tuning_is_reproducible_with_locality(G, face, pivot, lpips) -> None:
    cfg = TuneConfig(max_steps=3, locality=True, lpips_threshold=0.0, seed=4)
    a, b = tune(G, face, pivot, lpips, cfg), tune(G, face, pivot, lpips, cfg)
    assert a.curves == b.curves
    assert set(a.curves) == {"loss", "l2", "lpips", "reg_step", "reg_l2", "reg_lpips"} and len(a.curves["reg_l2"]) == 3
    assert a.curves["reg_step"] == [0, 1, 2]
    _assert_same_state(a.G.state_dict(), b.G.state_dict())


def test_locality_interval_logs_which_steps_were_regularized(G, face, pivot, lpips) -> None:
    res = tune(G, face, pivot, lpips, TuneConfig(max_steps=5, locality_interval=2, lpips_threshold=0.0))
    assert len(res.curves["loss"]) == 5
    assert res.curves["reg_step"] == [0, 2, 4] and len(res.curves["reg_l2"]) == 3


def test_inversion_leaves_a_train_mode_generators_w_avg_alone(G, face) -> None:
    from pti.engine.invert import InvertConfig, invert
    from pti.engine.losses import WeightFreeProjectorMetric

    G2 = G.clone().train()
    before = G2.mapping.w_avg.clone()
    invert(G2, face, WeightFreeProjectorMetric(), InvertConfig(steps=1))
    assert torch.equal(G2.mapping.w_avg, before)


@pytest.mark.slow  # 40 steps twice with LPIPS: about 7 s on one CPU core
def test_locality_regularization_keeps_far_latents_unchanged(G, face, pivot, lpips) -> None:
    """Renders 30 units from the pivot (built as the regularizer builds them, from 8 fresh z's never
    used in tuning) drift less from the original generator with locality on than off."""
    steps = 40  # by then the unregularized drift is about twice the regularized one
    off = tune(G, face, pivot, lpips, TuneConfig(max_steps=steps, locality=False, lpips_threshold=0.0))
    on = tune(G, face, pivot, lpips, TuneConfig(max_steps=steps, locality=True, lpips_threshold=0.0))

    gen = torch.Generator().manual_seed(12345)  # not the tuning seed (0): these latents are unseen
    probe_cfg = TuneConfig(locality_samples=8)
    far = locality_ws(G, pivot, probe_cfg, gen)
    assert len(far) == 8
    for w_r in far:  # 30 units from the pivot, as REFERENCE §1 builds w_r
        assert float((w_r - pivot).norm()) == pytest.approx(30.0, rel=1e-4)

    def drift(tuned) -> tuple[np.ndarray, np.ndarray]:
        mse, lp = [], []
        with torch.no_grad():
            for w_r in far:
                old = G.synthesis(w_r, noise_mode="none", force_fp32=True)
                new = tuned.synthesis(w_r, noise_mode="none", force_fp32=True)
                mse.append(float(F.mse_loss(new, old)))
                lp.append(float(lpips(new, old)))
        return np.array(mse), np.array(lp)

    mse_off, lp_off = drift(off.G)
    mse_on, lp_on = drift(on.G)
    assert mse_on.mean() < 0.7 * mse_off.mean(), (mse_on, mse_off)
    assert lp_on.mean() < 0.7 * lp_off.mean(), (lp_on, lp_off)
    assert (mse_on < mse_off).sum() >= 6, (mse_on, mse_off)
    # ... at little cost where it matters: the pivot still reconstructs about as well.
    rec_off, rec_on = (reconstruction_metrics(r.G, face, pivot, lpips) for r in (off, on))
    assert rec_on["mse"] < 1.15 * rec_off["mse"] and rec_on["perceptual"] < 1.15 * rec_off["perceptual"]


# ---------------------------------------------------------------------------- joint (multi-ID)


def test_joint_tuning_improves_every_identity(G, face) -> None:
    perceptual = random_lpips(seed=2)
    targets = [
        face,
        _crop(skimage_data.astronaut()[:, ::-1].copy(), (20, 142, 240, 362), G.img_resolution),  # mirrored
        _crop(skimage_data.chelsea(), (0, 50, 300, 350), G.img_resolution),
    ]
    pivots = [
        invert(G, t, WeightFreeProjectorMetric(), InvertConfig(steps=10, seed=i)).pivot for i, t in enumerate(targets)
    ]
    before = [reconstruction_metrics(G, t, p, perceptual) for t, p in zip(targets, pivots)]
    seen = []
    res = tune(
        G,
        targets,
        pivots,
        perceptual,
        TuneConfig(max_steps=12, locality=False, lpips_threshold=100.0),
        progress=lambda *a: seen.append(a[:3]),
    )
    # No early stop in joint mode (even with a threshold every identity already meets), one step per image per pass.
    assert not res.early_stopped and res.steps == 36
    assert seen[-1] == ("tune", 36, 36)
    for i, (t, p) in enumerate(zip(targets, pivots)):
        after = reconstruction_metrics(res.G, t, p, perceptual)
        assert after["mse"] < 0.8 * before[i]["mse"], (i, before[i], after)
        assert after["perceptual"] < 0.8 * before[i]["perceptual"], (i, before[i], after)


def test_weight_free_perceptual_also_tunes(G, face, pivot) -> None:
    perceptual = WeightFreePerceptual()
    before = reconstruction_metrics(G, face, pivot, perceptual)
    res = tune(G, face, pivot, perceptual, TuneConfig(max_steps=10, locality=False, lpips_threshold=0.0))
    after = reconstruction_metrics(res.G, face, pivot, perceptual)
    assert after["mse"] < before["mse"] and after["perceptual"] < before["perceptual"]


def test_one_pivot_per_target() -> None:
    G = tiny_generator()
    t = torch.zeros(1, 3, 64, 64)
    p = torch.zeros(1, G.num_ws, G.w_dim)
    with pytest.raises(ValueError, match="one pivot per target"):
        tune(G, [t, t], [p], WeightFreePerceptual(), TuneConfig(max_steps=1))


# ---------------------------------------------------------------------------- the config


NAN, INF = float("nan"), float("inf")
# Every field, with values it must refuse: out of range, not finite, or of the wrong kind.
TUNE_REFUSED = {
    "precision": ["fp16", "BF16", None, 32],
    "impl": ["triton-cuda", "REF", None, 1, "prefer:triton"],
    "lr": [0.0, -3e-4, NAN, INF, "3e-4"],
    "max_steps": [0, -1, 2.5, True],
    "lpips_threshold": [-0.01, NAN, INF],
    "l2_lambda": [-1.0, INF],
    "lpips_lambda": [-1.0, NAN],
    "locality": [1, "yes", None],
    "locality_alpha": [0.0, -30.0, INF],  # a distance from the pivot
    "locality_psi": [1.01, -1.01, NAN],  # truncation psi, [-1, 1]
    "locality_l2_lambda": [-0.1],
    "locality_lpips_lambda": [-0.1],
    "locality_samples": [0, 1.0],
    "locality_interval": [0, -2, 1.5],  # step % 0 divided by zero before
    "seed": [-1, 2**64, 1.5],
}
# The edges of each range, which must be accepted.
TUNE_EDGES = [
    dict(
        lr=1e-12,
        max_steps=1,
        lpips_threshold=0.0,
        l2_lambda=0.0,
        lpips_lambda=0.0,
        locality=False,
        locality_alpha=1e-6,
        locality_psi=-1.0,
        locality_l2_lambda=0.0,
        locality_lpips_lambda=0.0,
        locality_samples=1,
        locality_interval=1,
        seed=None,
    ),
    dict(locality_psi=1.0, seed=2**64 - 1, max_steps=np.int64(3)),
]


def test_every_tune_config_field_has_refused_values() -> None:
    assert set(TUNE_REFUSED) == field_names(TuneConfig)


@pytest.mark.parametrize("name,value", refused_cases(TUNE_REFUSED))
def test_a_bad_tune_config_is_refused_naming_the_field(name, value) -> None:
    assert_refused(TuneConfig, name, value)


@pytest.mark.parametrize("edges", TUNE_EDGES)
def test_the_edges_of_each_range_are_accepted(edges) -> None:
    assert_accepted(TuneConfig, edges)


def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_fp32_weights() -> None:
    """--precision bf16: the same loop with bfloat16 forward passes; the weights stay float32 and move
    differently from fp32's (it really ran in bf16), the losses still fall. fp32 stays the default."""
    from pti.engine.generator import tiny_generator
    from pti.engine.losses import WeightFreePerceptual
    from pti.engine.tune import TuneConfig, tune

    G = tiny_generator()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        pivot = G.mapping(torch.randn(1, G.z_dim, generator=g), truncation_psi=0.7)
        target = G.synthesis(G.mapping(torch.randn(1, G.z_dim, generator=g), truncation_psi=0.7), noise_mode="const")
    runs = {
        p: tune(
            G, target, pivot, WeightFreePerceptual(), TuneConfig(max_steps=6, lr=3e-3, lpips_threshold=0.0, precision=p)
        )
        for p in ("fp32", "bf16")
    }
    assert TuneConfig().precision == "fp32"
    a, b = (dict(runs[p].G.synthesis.named_parameters()) for p in ("fp32", "bf16"))
    assert all(t.dtype == torch.float32 for t in b.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert runs["bf16"].curves["loss"][-1] < runs["bf16"].curves["loss"][0]
    with pytest.raises(ValueError, match="precision"):
        TuneConfig(precision="fp16")
