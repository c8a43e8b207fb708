"""Step 2 of PTI: pivotal tuning, with locality regularization and joint multi-identity tuning.

Single identity (REFERENCE §1): Adam at lr 3e-4 over the synthesis parameters; each step renders
`synthesis(pivot, noise_mode='const')` in fp32, loss = 1 * MSE + 1 * LPIPS-alex at full resolution;
stop as soon as LPIPS <= 0.06, checked before the backward pass so that step is not applied;
at most 350 steps.

Locality regularization (the paper's, on by default here): each regularized step draws z ~ N(0, I),
maps it with psi 0.5, moves 30 units from the pivot towards it (w_r = w_p + 30 (w_z - w_p) /
||w_z - w_p||, the norm over the whole [1, num_ws, w_dim] tensor), and penalizes 0.1 * MSE +
0.1 * LPIPS between the tuned and the frozen original generator at w_r (noise 'none').

Joint tuning (the paper's multi-ID): one shared generator, `max_steps` passes over all images,
one Adam step per image per pass, no early stop.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from pti.engine.batched import pivot_and_locality_terms, prefer_batched
from pti.engine.config import IMPLS, ProgressFn, check_fields, one_of, real, seeded_generator, whole
from pti.engine.generator import Generator
from pti.engine.losses import Perceptual
from pti.engine.speed import StepRunner
from pti.engine.ssim import ms_ssim
from pti.kernels.precision import PRECISIONS, autocast_scope


@dataclass(frozen=True)
class TuneConfig:
    lr: float = 3e-4  # Adam learning rate, constant
    max_steps: int = 350  # steps (single) or passes over all images (joint)
    lpips_threshold: float = 0.06  # early stop when the perceptual term reaches this (single only)
    l2_lambda: float = 1.0  # weight of MSE at the pivot
    lpips_lambda: float = 1.0  # weight of LPIPS at the pivot
    locality: bool = True  # locality regularization (paper); False = the repo's default
    locality_alpha: float = 30.0  # distance moved from the pivot towards a sampled w
    locality_psi: float = 0.5  # truncation of the sampled w's
    locality_l2_lambda: float = 0.1  # weight of MSE between tuned and original renders
    locality_lpips_lambda: float = 0.1  # weight of LPIPS between them
    locality_samples: int = 1  # sampled w's per regularized step
    locality_interval: int = 1  # regularize every N-th step
    seed: int | None = 0  # seeds the locality samples; None = nondeterministic
    precision: str = "fp32"  # fp32 (the paper), tf32, or bf16 autocast forward passes (pti.kernels.precision)
    impl: str = "auto"  # ref (the faithful path), compile, triton, or auto (pti.engine.config.IMPLS)

    def __post_init__(self):
        check_fields(
            self,
            {
                "precision": one_of(*PRECISIONS),
                "impl": one_of(*IMPLS),
                "lr": real(0, above=True),
                "max_steps": whole(1),
                "lpips_threshold": real(0),  # 0: never stop early
                "l2_lambda": real(0),
                "lpips_lambda": real(0),
                "locality": one_of(True, False),
                "locality_alpha": real(0, above=True),  # a distance from the pivot, divided by ||w_z - w_p||
                "locality_psi": real(-1, 1),  # truncation psi, as `pti generate --trunc` takes it
                "locality_l2_lambda": real(0),
                "locality_lpips_lambda": real(0),
                "locality_samples": whole(1),  # the loss is a mean over them
                "locality_interval": whole(1),  # step % interval
                "seed": whole(0, 2**64 - 1, optional=True),  # torch.Generator's range
            },
        )


@dataclass
class TuneResult:
    G: torch.nn.Module  # the tuned generator (a new module; the input G is untouched)
    steps: int = 0  # optimizer steps applied
    early_stopped: bool = False
    curves: dict[str, list[float]] = field(default_factory=dict)  # per-step loss terms
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    impl: dict = field(default_factory=dict)  # what ran (pti.engine.speed.StepRunner.record)


def locality_ws(G_orig, pivot: torch.Tensor, cfg: TuneConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """Latents `alpha` units from the pivot, towards truncated samples of the original mapping."""
    device = pivot.device
    z = torch.randn([cfg.locality_samples, G_orig.z_dim], generator=gen, device=device)
    with torch.no_grad():
        w_samples = G_orig.mapping(z, truncation_psi=cfg.locality_psi)  # [S, num_ws, C]
    out = []
    for w_z in w_samples:
        direction = w_z.unsqueeze(0) - pivot
        out.append(pivot + cfg.locality_alpha * direction / direction.norm(p=2))
    return out


def pivot_terms(synthesis, perceptual, pivot, target, precision: str):
    """(MSE, perceptual) of the render at the pivot (noise 'const') against the target: the forward pass
    in `precision`, the losses in float32 (SSIM's variances cancel badly in bfloat16)."""
    with autocast_scope(precision, pivot.device):
        synth = synthesis(pivot, noise_mode="const", force_fp32=True)
    synth = synth.float()
    return F.mse_loss(synth, target), perceptual(synth, target).mean()


def locality_terms(synthesis, orig_synthesis, perceptual, w_r, precision: str):
    """(MSE, perceptual) between the tuned and the original renders at w_r (noise 'none')."""
    with autocast_scope(precision, w_r.device):
        new = synthesis(w_r, noise_mode="none", force_fp32=True)
        with torch.no_grad():
            old = orig_synthesis(w_r, noise_mode="none", force_fp32=True)
    new, old = new.float(), old.float()
    return F.mse_loss(old, new), perceptual(old, new).mean()


def locality_loss(
    G, G_orig, pivot, perceptual: Perceptual, cfg: TuneConfig, gen, terms=locality_terms
) -> tuple[torch.Tensor, dict]:
    """Mean over samples of 0.1 MSE + 0.1 LPIPS between tuned and original renders near the pivot;
    `terms` is `locality_terms` as the implementation setting runs it. The logged terms come back as
    detached tensors per sample (`logged` turns them into numbers, with one host synchronisation)."""
    total = 0.0
    ws_list = locality_ws(G_orig, pivot, cfg, gen)
    l2s, lps = [], []
    for w_r in ws_list:
        l2, lp = terms(G.synthesis, G_orig.synthesis, perceptual, w_r, cfg.precision)
        total = total + cfg.locality_l2_lambda * l2 + cfg.locality_lpips_lambda * lp
        l2s.append(l2.detach())
        lps.append(lp.detach())
    return total / len(ws_list), {"reg_l2": l2s, "reg_lpips": lps}


def logged(terms: dict) -> dict[str, float]:
    """The step's logged terms as numbers, read from the device in one transfer: each a tensor, or a list of
    per-sample tensors whose mean is logged (summed in Python in sample order, then divided)."""
    flat = [t for v in terms.values() for t in (v if isinstance(v, list) else [v])]
    values = iter(torch.stack([t.reshape(()).float() for t in flat]).tolist())
    out = {}
    for key, v in terms.items():
        if isinstance(v, list):
            total = 0.0
            for _ in v:
                total += next(values)
            out[key] = total / len(v)
        else:
            out[key] = next(values)
    return out


def _prepare(G):
    """A trainable copy of G (synthesis params only) and a frozen copy of the original."""
    G_orig = G.clone().eval().requires_grad_(False)
    G_tuned = G.clone().eval().requires_grad_(False)
    G_tuned.synthesis.requires_grad_(True)
    return G_tuned, G_orig


def tune(
    G,
    targets: Sequence[torch.Tensor] | torch.Tensor,  # each [1, 3, R, R] in [-1, 1], or uint8 [1, 3, R, R]
    pivots: Sequence[torch.Tensor] | torch.Tensor,  # each [1, num_ws, w_dim]
    perceptual: Perceptual,
    cfg: TuneConfig = TuneConfig(),
    progress: ProgressFn | None = None,
) -> TuneResult:
    """Tune one generator so that every pivot renders its target. One target = single-ID PTI.

    uint8 targets (a clip's frames, 4x smaller than float32 where hundreds are held) are mapped to [-1, 1] as
    `pti.engine.images.from_uint8` maps them, on the device, when their step comes: the same floats."""
    # A sequence that reads its frames when asked (pti.clip's) stays one; each target is shaped when its step comes.
    targets = [targets] if isinstance(targets, torch.Tensor) else targets
    pivots = [p.reshape(1, *p.shape[-2:]).detach() for p in (pivots if isinstance(pivots, (list, tuple)) else [pivots])]
    if len(targets) != len(pivots) or not targets:
        raise ValueError(f"need one pivot per target, got {len(targets)} targets and {len(pivots)} pivots")
    joint = len(targets) > 1
    device = next(G.parameters()).device
    start = time.perf_counter()
    G_tuned, G_orig = _prepare(G)
    runner = StepRunner(cfg.impl, cfg.precision, device, "tune", progress, (G_tuned.synthesis, perceptual))
    G_tuned.impl = G_orig.impl = runner.network_impl()
    at_pivot, near_pivot = runner.fn(pivot_terms), runner.fn(locality_terms)
    # The pivot and a single locality sample in one batch of two where that was measured faster (small
    # generators on a CPU, pti.engine.batched): the same terms to float32 rounding.
    batched = cfg.locality and cfg.locality_samples == 1 and isinstance(G, Generator) and prefer_batched(G, device)
    both = runner.fn(pivot_and_locality_terms) if batched else None
    optimizer = torch.optim.Adam(G_tuned.synthesis.parameters(), lr=cfg.lr)
    gen = seeded_generator(cfg.seed, device)
    result = TuneResult(G=G_tuned, config=asdict(cfg))
    curves = result.curves
    for key in ("loss", "l2", "lpips") + (("reg_step", "reg_l2", "reg_lpips") if cfg.locality else ()):
        curves[key] = []  # reg_* are logged on regularized steps only; reg_step says which

    total = cfg.max_steps * len(targets)
    step = 0
    with runner:
        for _ in range(cfg.max_steps):
            for target, pivot in zip(targets, pivots):
                target = target.reshape(1, *target.shape[-3:]).to(device)
                if target.dtype == torch.uint8:
                    target = target.float() / 127.5 - 1
                pivot = pivot.to(device)
                with runner.step():
                    regularized = cfg.locality and step % cfg.locality_interval == 0
                    if batched and regularized:  # the sample is drawn first: a stopping step draws it unused
                        (w_r,) = locality_ws(G_orig, pivot, cfg, gen)
                        l2, lp, reg_l2, reg_lp = both(
                            G_tuned.synthesis, G_orig.synthesis, perceptual, pivot, target, w_r, cfg.precision
                        )
                    else:
                        l2, lp = at_pivot(G_tuned.synthesis, perceptual, pivot, target, cfg.precision)
                    loss = cfg.l2_lambda * l2 + cfg.lpips_lambda * lp
                    if not joint and float(lp.detach()) <= cfg.lpips_threshold:
                        result.early_stopped = True  # checked before backward: this step is not applied
                        break
                    terms = {"l2": l2.detach(), "lpips": lp.detach()}
                    if regularized:
                        if batched:  # locality_loss's sum over its one sample, in its order
                            reg = (0.0 + cfg.locality_l2_lambda * reg_l2 + cfg.locality_lpips_lambda * reg_lp) / 1
                            reg_terms = {"reg_l2": [reg_l2.detach()], "reg_lpips": [reg_lp.detach()]}
                        else:
                            reg, reg_terms = locality_loss(G_tuned, G_orig, pivot, perceptual, cfg, gen, near_pivot)
                        loss = loss + reg
                        terms.update(reg_terms)
                        curves["reg_step"].append(step)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                step += 1
                terms = logged({"loss": loss.detach(), **terms})  # the one read per step besides early stop's
                curves["loss"].append(terms.pop("loss"))
                for key, value in terms.items():
                    curves[key].append(value)
                if progress is not None:  # the perceptual term under the name of the loss that ran (lpips, 1-ms_ssim)
                    label = getattr(perceptual, "label", "lpips")
                    progress(
                        "tune",
                        step,
                        total,
                        {"loss": curves["loss"][-1], **{k.replace("lpips", label): v for k, v in terms.items()}},
                    )
            if result.early_stopped:
                break
    result.impl = {**runner.record(), "batched_locality": batched}
    result.steps = step
    result.seconds = time.perf_counter() - start
    G_tuned.requires_grad_(False)
    return result


@torch.no_grad()
def image_metrics(img: torch.Tensor, target: torch.Tensor, perceptual: Perceptual | None = None) -> dict:
    """MSE, MS-SSIM (and the perceptual distance when given) between two [-1, 1] images."""
    out = {"mse": float(F.mse_loss(img, target)), "ms_ssim": float(ms_ssim(img, target).mean())}
    if perceptual is not None:
        out["perceptual"] = float(perceptual(img, target).mean())
    return out
