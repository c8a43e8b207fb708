"""A tuning step's two renders in one call: the pivot and the locality sample as one batch of two.

`tune` evaluates, on a regularized step with one locality sample, `pivot_terms` (the tuned network at the
pivot, noise 'const', against the target) and `locality_terms` (the tuned network at w_r, noise 'none',
against the frozen original at w_r). `pivot_and_locality_terms` computes the same four terms with one
synthesis call on [pivot, w_r] (per-sample noise ('const', 'none'), `SynthesisLayer.per_sample_noise`) and
one perceptual call on the two pairs, so every layer runs once at batch 2 instead of twice at batch 1.

The definitions are the two functions', term for term: MSE over the whole image, the perceptual distance
of the same pairs (`perceptual(synth, target)`, and `perceptual(new, old)` for their `perceptual(old, new)`:
the same value, pti's perceptual distances being symmetric), the forward in `precision`'s autocast and the
losses in float32. Only the batch differs, so the values agree to float32 rounding (a batched convolution
may sum in another order), not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pti.kernels.precision import autocast_scope

NOISE = ("const", "none")  # the pivot renders with the constant noise maps, the locality sample without

# Where one batch of two was measured faster than two batches of one, per device kind: the largest generator
# resolution (benchmarks/bench_batched.py, results/batched_cpu.json, fp32, the reference ops). On the 2-core
# CPU the 64 px tiny generator (1 thread) steps 1.16-1.23x faster batched (half the ops dispatched for the
# tuned render); paper256 (256 px, 2 threads) 5-7 % slower: there the dispatch saved is small, and a profile shows
# the memory-bound elementwise ops (bias, activation, clamp, noise add) taking up to twice as long per image
# at batch 2 (the 'none' sample also gets a noise add of zeros). CUDA: not measured yet, so off.
BATCHED_MAX_RESOLUTION = {"cpu": 64}


def prefer_batched(G, device: torch.device | str) -> bool:
    """Whether `tune` should render the pivot and the locality sample as one batch for `G` on `device`."""
    return G.img_resolution <= BATCHED_MAX_RESOLUTION.get(torch.device(device).type, 0)


def pivot_and_locality_terms(
    synthesis, orig_synthesis, perceptual, pivot, target, w_r, precision: str, fused_modconv: bool | None = None
):
    """(MSE, perceptual) at the pivot against the target and (MSE, perceptual) between the tuned and the
    original renders at w_r, as `pivot_terms` and `locality_terms` return them, from one tuned render of
    [pivot, w_r]. pivot, w_r: [1, num_ws, w_dim]; target: [1, 3, R, R]. `fused_modconv` is the tuned
    render's form (None: the network's default, as the two calls render; False: one shared-weight
    convolution over the batch instead of a grouped one, the same values to float32 rounding)."""
    ws = torch.cat([pivot, w_r])  # [2, num_ws, w_dim]
    with autocast_scope(precision, pivot.device):
        both = synthesis(ws, noise_mode=NOISE, force_fp32=True, fused_modconv=fused_modconv)  # [2, 3, R, R]
        with torch.no_grad():
            old = orig_synthesis(w_r, noise_mode="none", force_fp32=True)
    both, old = both.float(), old.float()
    synth, new = both[:1], both[1:]
    # Per image, then one entry each: [synth vs target, new vs old]. The locality pair's arguments are swapped
    # from `locality_terms`' perceptual(old, new), which pti's perceptual distances do not see: LPIPS squares
    # a difference of features computed for each argument alone, and MS-SSIM's formula is symmetric, so both
    # are symmetric bit for bit (tests/test_batched_step.py). The rendered batch goes in as it is, with no
    # copy; and the other order, perceptual(cat([synth, old]), cat([target, new])), gets gradients 2 % off
    # under torch.compile's inductor on CPU (torch 2.13; eager and aot_eager are right).
    lp = perceptual(both, torch.cat([target, old]))  # [2]
    return F.mse_loss(synth, target), lp[0], F.mse_loss(old, new), lp[1]
