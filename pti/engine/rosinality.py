"""rosinality stylegan2-pytorch `.pt` checkpoints -> our (NVIDIA-named) Generator.

The file is read with `torch.load(weights_only=True)` (plus `argparse.Namespace`, which training
checkpoints carry as `args`); no code runs. Sizes are inferred from tensor shapes: resolution from the
number of `to_rgbs`, `style_dim` and `n_mlp` from the mapping layers, channels per resolution from the
conv weights (expressed as NVIDIA's `channel_base` / `channel_max`).

Parameter mapping (rosinality -> NVIDIA), storage conventions checked to agree:
- `style.{i+1}` EqualLinear -> `mapping.fc{i}`: both store unscaled weights and apply
  `lr_mul / sqrt(in)` to the weight and `lr_mul` to the bias at run time (lr_mul 0.01, rosinality's
  fixed `lr_mlp`), so the tensors copy unchanged; `latent_avg` -> `mapping.w_avg`.
- `input.input` [1,C,4,4] -> `synthesis.b4.const` [C,4,4].
- `conv1`, `convs.{2i}`, `convs.{2i+1}` StyledConv -> `b4.conv1`, `b{r}.conv0`, `b{r}.conv1`:
  `conv.weight` [1,O,I,k,k] -> `weight` [O,I,k,k] (the up-conv kernels are stored flipped in both
  repos, so no flip), `conv.modulation` -> `affine`, `noise.weight` [1] -> `noise_strength` [],
  `activate.bias` -> `bias`, `noises.noise_{j}` [1,1,r,r] -> `noise_const` [r,r].
- `to_rgb1`, `to_rgbs.{i}` -> `b4.torgb`, `b{r}.torgb`; `bias` [1,3,1,1] -> [3].
- blur/upsample `kernel` buffers must be rosinality's default [1,3,3,1] (our `resample_filter`).

Exactness: the two codes compute the same function but not in the same float order. rosinality
scales the modulated conv weight by 1/sqrt(fan_in) before demodulating, NVIDIA demodulates the
unscaled weight (its 1e-8 epsilon thus weighs fan_in times less) and, for toRGB, puts the scale on
the styles instead; the up-convolution and blur are written differently. Measured against rosinality's own model.py
(CPU, fp32, size 32, 512 channels, noise const, truncation 0.7, both fused and unfused modconv):
mapping outputs agree bit for bit; images differ by at most 6.7e-6 (mean 1e-6, images spanning +-5).
tests/test_checkpoint_rosinality.py checks the mapping against an independent re-implementation.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import torch

from pti.engine.loaded import LoadedGenerator, build_generator
from pti.engine.safe_pickle import load_weights_only, pickle_refusal
from pti.errors import CheckpointError, first_line

LR_MLP = 0.01  # rosinality's Generator(lr_mlp=0.01); not stored in checkpoints
W_AVG_SAMPLES = 10000  # mapped z's averaged when a checkpoint has no latent_avg
W_AVG_SEED = 0


def load_rosinality(path: Path) -> LoadedGenerator:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path} is a torch file holding a {type(ckpt).__name__}, not a rosinality checkpoint dict"
        )
    key = "g_ema" if "g_ema" in ckpt else "g" if "g" in ckpt else None
    if key is None:
        keys = ", ".join(sorted(map(str, ckpt))[:8]) or "nothing"
        raise CheckpointError(
            f"{path} is a torch file without 'g_ema' or 'g' (a rosinality checkpoint); its keys: {keys}"
        )
    sd = ckpt[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: '{key}' is not a state dict of tensors")
    args = ckpt.get("args")
    cm = getattr(args, "channel_multiplier", None) if isinstance(args, argparse.Namespace) else None
    kwargs = rosinality_config(sd, str(path), channel_multiplier=cm)
    state = convert_state_dict(sd, kwargs, str(path))
    notes = []
    latent_avg = ckpt.get("latent_avg")
    if isinstance(latent_avg, torch.Tensor):
        state["mapping.w_avg"] = latent_avg.reshape(-1).float()
        G = build_generator(kwargs, state, str(path), derive_filters=True)
    else:
        state["mapping.w_avg"] = torch.zeros(kwargs["w_dim"])
        G = build_generator(kwargs, state, str(path), derive_filters=True)
        _estimate_w_avg(G)
        notes.append(
            f"w_avg estimated from {W_AVG_SAMPLES} mapped z's (seed {W_AVG_SEED}): the checkpoint has no latent_avg"
        )
    return LoadedGenerator(G, "rosinality-pt", str(path), f"rosinality stylegan2-pytorch checkpoint, {key}", notes)


def _torch_load(path: Path) -> Any:
    try:
        return load_weights_only(path, (argparse.Namespace,))
    except Exception as e:  # truncated zip, foreign pickled classes, ...
        refusal = pickle_refusal(e)
        if refusal is not None:
            raise CheckpointError(
                f"{path}: refused: a torch file holding more than weights and tensors; {refusal}"
            ) from None
        raise CheckpointError(f"{path} is a truncated or corrupt torch file ({first_line(e, 160)})") from None


def rosinality_config(
    sd: dict[str, torch.Tensor], source: str, channel_multiplier: int | None = None
) -> dict[str, Any]:
    """NVIDIA-style Generator kwargs for a rosinality state dict, inferred from its shapes."""
    try:
        n_mlp = len([k for k in sd if re.fullmatch(r"style\.\d+\.weight", k)])
        style_dim = sd["conv1.conv.modulation.weight"].shape[1]
        num_rgbs = len([k for k in sd if re.fullmatch(r"to_rgbs\.\d+\.conv\.weight", k)])
        res = 4 * 2**num_rgbs
        channels = {4: sd["conv1.conv.weight"].shape[1]}
        for i in range(num_rgbs):
            channels[8 * 2**i] = sd[f"convs.{2 * i}.conv.weight"].shape[1]
        img_channels = sd["to_rgb1.conv.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"{source}: not a rosinality StyleGAN2 generator state dict (no {e})") from None
    if n_mlp == 0:
        raise CheckpointError(f"{source}: rosinality state dict without mapping layers (style.N)")
    base, cmax = _channel_base_max(channels, channel_multiplier, source)
    blur = sd.get("convs.0.conv.blur.kernel")
    if blur is not None and not torch.allclose(blur, _default_blur(), atol=1e-6):
        raise CheckpointError(f"{source}: non-default blur kernel; only rosinality's [1,3,3,1] is supported")
    return dict(
        z_dim=style_dim,
        c_dim=0,
        w_dim=style_dim,
        img_resolution=res,
        img_channels=img_channels,
        mapping_kwargs=dict(num_layers=n_mlp, lr_multiplier=LR_MLP),
        synthesis_kwargs=dict(channel_base=base, channel_max=cmax, num_fp16_res=0, conv_clamp=None),
    )


def _default_blur() -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = k[:, None] * k[None, :]
    return k / k.sum() * 4  # rosinality's Blur for a x2 upsample multiplies by factor**2


def _channel_base_max(channels: dict[int, int], cm: int | None, source: str) -> tuple[int, int]:
    """channel_base/max with min(base // r, max) == channels[r] at every resolution."""
    cmax = max(channels.values())
    fits = lambda base: all(min(base // r, cmax) == c for r, c in channels.items())  # noqa: E731
    # rosinality's table is 16384 * channel_multiplier with 512 at most; prefer it (same network either
    # way, but the config then reads like the original), then the smallest base that fits.
    for candidate in [16384 * m for m in ([cm] if cm else []) + [2, 1]] + sorted(c * r for r, c in channels.items()):
        if candidate and fits(candidate):
            return candidate, cmax
    raise CheckpointError(f"{source}: channel layout {channels} cannot be expressed as NVIDIA channel_base/channel_max")


def convert_state_dict(sd: dict[str, torch.Tensor], kwargs: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Rename and reshape rosinality tensors to NVIDIA names (resample filters excluded: they are derived)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise CheckpointError(f"{source}: rosinality state dict lacks {name}")
        used.add(name)
        return sd[name].float()

    for i in range(kwargs["mapping_kwargs"]["num_layers"]):
        out[f"mapping.fc{i}.weight"] = take(f"style.{i + 1}.weight")
        out[f"mapping.fc{i}.bias"] = take(f"style.{i + 1}.bias")
    out["synthesis.b4.const"] = take("input.input")[0]

    def styled_conv(src: str, dst: str, noise_idx: int) -> None:
        out[f"{dst}.weight"] = take(f"{src}.conv.weight")[0]
        out[f"{dst}.affine.weight"] = take(f"{src}.conv.modulation.weight")
        out[f"{dst}.affine.bias"] = take(f"{src}.conv.modulation.bias")
        out[f"{dst}.noise_strength"] = take(f"{src}.noise.weight").reshape([])
        out[f"{dst}.bias"] = take(f"{src}.activate.bias")
        out[f"{dst}.noise_const"] = take(f"noises.noise_{noise_idx}")[0, 0]

    def to_rgb(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = take(f"{src}.conv.weight")[0]
        out[f"{dst}.affine.weight"] = take(f"{src}.conv.modulation.weight")
        out[f"{dst}.affine.bias"] = take(f"{src}.conv.modulation.bias")
        out[f"{dst}.bias"] = take(f"{src}.bias").reshape(-1)

    styled_conv("conv1", "synthesis.b4.conv1", 0)
    to_rgb("to_rgb1", "synthesis.b4.torgb")
    for i in range(int(math.log2(kwargs["img_resolution"])) - 2):
        r = 8 * 2**i
        styled_conv(f"convs.{2 * i}", f"synthesis.b{r}.conv0", 2 * i + 1)
        styled_conv(f"convs.{2 * i + 1}", f"synthesis.b{r}.conv1", 2 * i + 2)
        to_rgb(f"to_rgbs.{i}", f"synthesis.b{r}.torgb")

    leftover = sorted(k for k in set(sd) - used if not k.endswith(".kernel"))
    if leftover:
        raise CheckpointError(
            f"{source}: rosinality state dict has unexpected tensors {leftover[:3]} ({len(leftover)})"
        )
    return out


@torch.no_grad()
def _estimate_w_avg(G: torch.nn.Module) -> None:
    """Average of mapping(z) over many z, for checkpoints saved without `latent_avg`."""
    G.eval()  # in training mode the mapping would move w_avg itself
    gen = torch.Generator().manual_seed(W_AVG_SEED)
    z = torch.randn([W_AVG_SAMPLES, G.z_dim], generator=gen)
    G.mapping.w_avg.copy_(G.mapping(z, None)[:, 0].mean(0))
