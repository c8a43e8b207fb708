"""Step 1 of PTI: invert a target image to a pivot w (the StyleGAN2-ADA projector as PTI runs it).

The recipe (REFERENCE §1): start from w_avg, the mean of 600 mapped z's from RandomState(123);
Adam (0.9, 0.999) over w and every noise buffer; lr 0.01 with a 5 % cosine ramp-up and a 25 %
ramp-down; exploration noise on w of w_std * 0.05 * max(0, 1 - t / 0.75)^2; noise_mode 'const' in
fp32; loss = perceptual distance + 1e5 * noise autocorrelation penalty; every noise buffer is
renormalized after each step. The optimized noise is discarded: the pivot is w repeated num_ws times.

`space="w+"` optimizes one w per layer instead (same schedule), a common variant that fits better
and edits worse.

A start (`invert(..., start=pivot)`: an encoder's W+ codes or a user's pivot file) makes the projector a
refine of that pivot: the same schedule (the lr ramp-up from 0 leaves the start untouched at step 0, and
the cosine ramp-down), noise buffers and penalty, from the start instead of w_avg, in W+ when the start's
layers differ (an encoder's codes) and in `cfg.space` when they are all one w (NVIDIA's projected_w). What
a start changes: no exploration noise on w. The projector's w_std * 0.05 noise is there to shake a cold
start out of the average face; a warm start is already near the target, and that noise (decaying only by
75 % of the steps) would first throw away part of what the encoder found; w_avg and w_std are then not
computed at all. `steps=0` is allowed only with a start (the pivot is used as given, by the caller).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pti.engine.config import IMPLS, ProgressFn, check_fields, one_of, real, seeded_generator, whole
from pti.engine.losses import ProjectorMetric, to_0_255
from pti.engine.speed import StepRunner
from pti.kernels.precision import PRECISIONS, autocast_scope


# ---------------------------------------------------------------------------- the projector


@dataclass(frozen=True)
class InvertConfig:
    steps: int = 450  # optimizer steps (PTI: first_inv_steps); 0 = none, only after a start (encoder, file)
    space: str = "w"  # "w": one w for all layers (the paper); "w+": one per layer
    w_avg_samples: int = 600  # z samples for w_avg / w_std (PTI passes 600)
    w_avg_seed: int = 123  # RandomState seed of those samples (the projector's)
    initial_lr: float = 0.01  # peak learning rate (the projector's; PTI's 5e-3 is unused)
    lr_rampup: float = 0.05  # fraction of steps for the cosine ramp-up
    lr_rampdown: float = 0.25  # fraction of steps for the cosine ramp-down
    initial_noise_factor: float = 0.05  # exploration noise on w, as a fraction of w_std
    noise_ramp: float = 0.75  # exploration noise decays to zero by this fraction of steps
    noise_reg_weight: float = 1e5  # weight of the noise-map autocorrelation penalty
    seed: int | None = 0  # seeds noise init and exploration; None = nondeterministic
    precision: str = "fp32"  # fp32 (the paper), tf32, or bf16 autocast forward passes (pti.kernels.precision)
    impl: str = "auto"  # ref (the faithful path), compile, triton, or auto (pti.engine.config.IMPLS)

    def __post_init__(self):
        check_fields(
            self,
            {
                "precision": one_of(*PRECISIONS),
                "impl": one_of(*IMPLS),
                "steps": whole(0),  # 0: the caller uses its start as given (pti.pipeline refuses 0 without one)
                "space": one_of("w", "w+"),
                "w_avg_samples": whole(1),
                "w_avg_seed": whole(0, 2**32 - 1),  # numpy's RandomState takes 32-bit seeds
                "initial_lr": real(0, above=True),
                "lr_rampup": real(0, 1, above=True),  # divides: t / lr_rampup
                "lr_rampdown": real(0, 1, above=True),  # divides: (1 - t) / lr_rampdown
                "initial_noise_factor": real(0),
                "noise_ramp": real(0, above=True),  # divides: t / noise_ramp
                "noise_reg_weight": real(0),
                "seed": whole(0, 2**64 - 1, optional=True),  # torch.Generator's range
            },
        )


@dataclass
class InversionResult:
    pivot: torch.Tensor  # [1, num_ws, w_dim]
    losses: list[float] = field(default_factory=list)  # total loss per step
    dists: list[float] = field(default_factory=list)  # perceptual distance per step
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    impl: dict = field(default_factory=dict)  # what ran (pti.engine.speed.StepRunner.record)


def learning_rate(step: int, cfg: InvertConfig) -> float:
    """Cosine ramp-down over the last `lr_rampdown` and linear ramp-up over the first `lr_rampup`."""
    t = step / cfg.steps
    r = min(1.0, (1.0 - t) / cfg.lr_rampdown)
    r = 0.5 - 0.5 * math.cos(r * math.pi)
    r = r * min(1.0, t / cfg.lr_rampup)
    return cfg.initial_lr * r


def w_noise_scale(step: int, w_std: float, cfg: InvertConfig) -> float:
    t = step / cfg.steps
    return w_std * cfg.initial_noise_factor * max(0.0, 1.0 - t / cfg.noise_ramp) ** 2


@torch.no_grad()
def w_stats(G, samples: int = 600, seed: int = 123) -> tuple[torch.Tensor, float]:
    """w_avg [1, 1, w_dim] and the scalar w_std = sqrt(sum of squared deviations / N)."""
    device = next(G.parameters()).device
    z = torch.from_numpy(np.random.RandomState(seed).randn(samples, G.z_dim)).to(device)
    w = G.mapping(z, skip_w_avg_update=True)[:, :1, :].float()  # [N, 1, C]; never touch G.w_avg
    w_avg = w.mean(dim=0, keepdim=True)
    w_std = ((w - w_avg).double().square().sum() / samples).sqrt().item()
    return w_avg, w_std


def noise_regularization(noise_bufs: list[torch.Tensor]) -> torch.Tensor:
    """Penalize spatial autocorrelation of each noise map at every scale down to 8x8."""
    reg = 0.0
    for buf in noise_bufs:
        noise = buf[None, None]  # [1, 1, H, W]
        while True:
            reg = reg + (noise * torch.roll(noise, shifts=1, dims=3)).mean() ** 2
            reg = reg + (noise * torch.roll(noise, shifts=1, dims=2)).mean() ** 2
            if noise.shape[2] <= 8:
                break
            noise = F.avg_pool2d(noise, kernel_size=2)
    return reg


def step_loss(synthesis, metric: ProjectorMetric, ws, prepared, noise_bufs, noise_reg_weight: float, precision: str):
    """(loss, distance) of one projector step: the render at ws (noise 'const') in `precision`, the metric
    in float32, plus the weighted noise autocorrelation penalty."""
    with autocast_scope(precision, ws.device):
        synth = synthesis(ws, noise_mode="const", force_fp32=True)
    dist = metric.distance(to_0_255(synth.float()), prepared)  # the metric in float32
    return dist + noise_regularization(noise_bufs) * noise_reg_weight, dist


def invert(
    G,
    target: torch.Tensor,  # [1, 3, R, R] or [3, R, R] in [-1, 1], R = G.img_resolution
    metric: ProjectorMetric,
    cfg: InvertConfig = InvertConfig(),
    progress: ProgressFn | None = None,
    start: torch.Tensor | None = None,  # [1, num_ws, w_dim] or [num_ws, w_dim]: refine this pivot (module docstring)
) -> InversionResult:
    """Find the pivot w whose render best matches `target` under `metric`, from w_avg or from `start`.
    G is not modified."""
    device = next(G.parameters()).device
    target = target.reshape(1, G.img_channels, G.img_resolution, G.img_resolution).to(device, torch.float32)
    began = time.perf_counter()
    gen = seeded_generator(cfg.seed, device)
    if start is None:
        if cfg.steps < 1:
            raise ValueError("InvertConfig.steps must be >= 1 without a start pivot")
        w_avg, w_std = w_stats(G, cfg.w_avg_samples, cfg.w_avg_seed)
        w_start = w_avg if cfg.space == "w" else w_avg.repeat([1, G.num_ws, 1])
    else:
        start = start.detach().reshape(1, G.num_ws, G.w_dim).to(device, torch.float32)
        one_w = bool((start == start[:, :1]).all())  # every layer the same w: a W pivot, refined in W
        w_start = start[:, :1] if one_w and cfg.space == "w" else start
        w_std = 0.0  # no exploration noise from a warm start (module docstring)
    # A private copy of the synthesis network: its noise buffers become optimization variables.
    synthesis = copy.deepcopy(G.synthesis).eval().requires_grad_(False).float()
    noise_bufs = [buf for name, buf in synthesis.named_buffers() if "noise_const" in name]
    with torch.no_grad():
        for buf in noise_bufs:
            buf.copy_(torch.randn(buf.shape, generator=gen, device=device))
            buf.requires_grad_(True)

    w_opt = w_start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w_opt] + noise_bufs, betas=(0.9, 0.999), lr=cfg.initial_lr)
    prepared = metric.prepare(to_0_255(target))
    result = InversionResult(pivot=w_start, config=asdict(cfg))
    runner = StepRunner(cfg.impl, cfg.precision, device, "invert", progress, (synthesis, metric))
    synthesis.impl = runner.network_impl()
    loss_of = runner.fn(step_loss)

    with runner:
        for step in range(cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            w_noise = torch.randn(w_opt.shape, generator=gen, device=device) * w_noise_scale(step, w_std, cfg)
            ws = (w_opt + w_noise if w_std else w_opt).repeat([1, G.num_ws // w_opt.shape[1], 1])
            with runner.step():
                loss, dist = loss_of(synthesis, metric, ws, prepared, noise_bufs, cfg.noise_reg_weight, cfg.precision)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            with torch.no_grad():  # renormalize every noise map to zero mean, unit variance
                for buf in noise_bufs:
                    buf -= buf.mean()
                    buf *= buf.square().mean().rsqrt()
            result.losses.append(float(loss.detach()))
            result.dists.append(float(dist.detach()))
            if progress is not None:
                progress("invert", step + 1, cfg.steps, {"loss": result.losses[-1], "dist": result.dists[-1]})
    result.impl = runner.record()

    pivot = w_opt.detach()
    result.pivot = pivot.repeat([1, G.num_ws // pivot.shape[1], 1])
    result.seconds = time.perf_counter() - began
    return result
