"""Our (NVIDIA-named) Generator -> a rosinality stylegan2-pytorch checkpoint `{"g_ema": ..., "latent_avg": ...}`.

The inverse of `pti.engine.rosinality.convert_state_dict`, for the code built on rosinality's `Generator`
(e4e, StyleCLIP, HyperStyle, ...): `Generator(size, style_dim, n_mlp, channel_multiplier)` then
`load_state_dict(ckpt["g_ema"], strict=True)`. The file holds plain tensors and dicts only, so rosinality's
plain `torch.load` and our `weights_only` loader both read it.

Names and layouts (ours -> rosinality; the loader's docstring says why the storage conventions agree):
- `mapping.fc{i}` -> `style.{i+1}` (`style.0` is rosinality's PixelNorm, which has no tensors), unchanged;
  `mapping.w_avg` -> `latent_avg` [style_dim].
- `synthesis.b4.const` [C,4,4] -> `input.input` [1,C,4,4].
- `b4.conv1`, `b{r}.conv0`, `b{r}.conv1` -> `conv1`, `convs.{2i}`, `convs.{2i+1}` (r = 8 * 2**i):
  `weight` [O,I,3,3] -> `conv.weight` [1,O,I,3,3], `affine` -> `conv.modulation`, `noise_strength` [] ->
  `noise.weight` [1], `bias` -> `activate.bias`, `noise_const` [r,r] -> `noises.noise_{j}` [1,1,r,r]
  (j counts the convs in order: 0 for b4.conv1, then 2i+1 and 2i+2).
- `b4.torgb`, `b{r}.torgb` -> `to_rgb1`, `to_rgbs.{i}`; `bias` [3] -> [1,3,1,1].
- rosinality's modules also register their FIR `kernel` buffers, which strict loading needs: the
  up-convs' `conv.blur.kernel` and the toRGBs' `upsample.kernel`, both the normalized outer product of
  [1,3,3,1] times factor**2 = 4 (a x2 upsampling spreads each pixel over four: the gain keeps the mean).

`check_rosinality` says what rosinality's Generator cannot be (a one-line `ExportError`) and what loads
but computes slightly differently (notes); `write_rosinality` checks, then writes atomically.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from pti.engine.generator import Generator
from pti.errors import ExportError
from pti.fsutil import atomic_path

LR_MLP = 0.01  # rosinality's Generator(lr_mlp=0.01), the mapping's learning-rate multiplier
BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)  # rosinality's Generator(blur_kernel=[1, 3, 3, 1])
UP = 2  # every upsampling in the generator is x2
MAX_SIZE = 1024  # rosinality's channel table stops at 1024 px
SIGNATURE = "rosinality's Generator(size, style_dim, n_mlp, channel_multiplier)"


def rosinality_channels(size: int, channel_multiplier: int) -> dict[int, int]:
    """rosinality's channel table: 512 feature maps up to 32 px, then 256 * cm at 64 px, halving per octave."""
    res = [2**i for i in range(2, int(math.log2(size)) + 1)]
    return {r: 512 if r <= 32 else 16384 * channel_multiplier // r for r in res}


def rosinality_kernel() -> torch.Tensor:
    """The `kernel` buffer of rosinality's x2 Blur and Upsample: outer([1,3,3,1]) / 64 * 4 (exact in float32)."""
    k = torch.tensor(BLUR_TAPS)
    k = torch.outer(k, k)
    return k / k.sum() * UP**2


def check_rosinality(G: Generator) -> tuple[list[str], dict[str, int]]:
    """Whether rosinality's Generator can hold G: ExportError (one line, every reason) if not; else the notes
    on what loads but computes slightly differently, and the Generator's arguments (size, style_dim, n_mlp,
    channel_multiplier)."""
    problems: list[str] = []
    mapping, syn = G.mapping, G.synthesis
    size = G.img_resolution
    fcs = [getattr(mapping, f"fc{i}") for i in range(mapping.num_layers)]

    if G.c_dim != 0:
        problems.append(f"a conditional generator (c_dim={G.c_dim}); rosinality's is unconditional")
    if G.z_dim != G.w_dim or any(tuple(fc.weight.shape) != (G.w_dim, G.w_dim) for fc in fcs):
        widths = [G.z_dim] + [fc.weight.shape[0] for fc in fcs]
        problems.append(f"mapping widths {widths}; rosinality's maps style_dim to style_dim at every layer")
    if not fcs:
        problems.append("no mapping layers; rosinality's n_mlp is at least 1")
    gains = sorted({fc.bias_gain for fc in fcs})
    if any(g != LR_MLP for g in gains):
        problems.append(f"mapping lr_multiplier {gains[0] if len(gains) == 1 else gains}; rosinality's is {LR_MLP}")
    acts = sorted({fc.activation for fc in fcs} - {"lrelu"})
    if acts:
        problems.append(f"mapping activation {acts[0]!r}; rosinality's is leaky ReLU ('lrelu')")
    if G.img_channels != 3:
        problems.append(f"{G.img_channels} image channels; rosinality's toRGB makes 3")
    if size < 4 or size & (size - 1) or size > MAX_SIZE:
        problems.append(f"resolution {size}; rosinality's is a power of two from 4 to {MAX_SIZE}")

    blocks = [getattr(syn, f"b{r}") for r in syn.block_resolutions]
    layers = [layer for b in blocks for layer in (getattr(b, "conv0", None), b.conv1) if layer is not None]
    channels = {b.resolution: b.conv1.weight.shape[0] for b in blocks}
    cm = _channel_multiplier(channels)
    if cm is None:
        problems.append(
            f"channels {channels}; rosinality's are 512 up to 32 px, then 256*cm at 64 px, 128*cm at 128 px, ..."
            " for an integer channel_multiplier cm"
        )
    if any(layer.weight.shape[-1] != 3 for layer in layers):
        problems.append(f"{layers[0].weight.shape[-1]}x{layers[0].weight.shape[-1]} convolutions; rosinality's are 3x3")
    if any(not layer.use_noise for layer in layers):
        problems.append("synthesis layers without noise; rosinality's add noise at every conv")
    acts = sorted({layer.activation for layer in layers} - {"lrelu"})
    if acts:
        problems.append(f"synthesis activation {acts[0]!r}; rosinality's is leaky ReLU ('lrelu')")
    expected = rosinality_kernel() / UP**2  # ours are normalized to unit gain
    filters = [m.resample_filter for m in [*blocks, *layers]]
    if any(f.shape != expected.shape or not torch.equal(f.float().cpu(), expected) for f in filters):
        problems.append("a resample filter other than [1,3,3,1]; rosinality's Generator(blur_kernel=...) is fixed")
    if problems:
        raise ExportError(f"{SIGNATURE} cannot hold this generator: " + "; ".join(problems))

    notes = []
    clamps = sorted({c for c in [*(layer.conv_clamp for layer in layers), *(b.torgb.conv_clamp for b in blocks)] if c})
    if clamps:
        notes.append(
            f"conv_clamp {clamps[0]:g} is dropped: rosinality has no activation clamp, so images agree while no"
            " activation reaches it"
        )
    if syn.fp16_resolutions:
        notes.append(
            f"rosinality runs in float32 everywhere; pti runs {syn.fp16_resolutions} px in float16 unless told"
            " fp32, so compare with pti's fp32 renders"
        )
    if not hasattr(mapping, "w_avg"):
        notes.append("no latent_avg written: this generator tracks no w average (mapping w_avg_beta=None)")
    info = dict(size=size, style_dim=G.w_dim, n_mlp=len(fcs), channel_multiplier=cm)
    return notes, info


def _channel_multiplier(channels: dict[int, int]) -> int | None:
    """The integer cm whose rosinality table is `channels` (2, rosinality's default, when every cm fits:
    up to 32 px the table does not depend on it), or None."""
    beyond = channels.get(64)
    candidates = [2] if beyond is None else [beyond // 256] if beyond % 256 == 0 and beyond >= 256 else []
    size = max(channels)
    return next((cm for cm in candidates if rosinality_channels(size, cm) == channels), None)


def rosinality_checkpoint(G: Generator) -> dict[str, Any]:
    """`{"g_ema": state_dict, "latent_avg": w_avg}` in rosinality's names and layouts (module docstring),
    every tensor float32, contiguous, on the CPU and a copy (no storage shared with G). Does not check G:
    `check_rosinality` does."""
    sd = {k: v.detach() for k, v in G.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = t.to(device="cpu", dtype=torch.float32).clone(memory_format=torch.contiguous_format)

    for i in range(G.mapping.num_layers):  # style.0 is PixelNorm (no tensors)
        put(f"style.{i + 1}.weight", sd[f"mapping.fc{i}.weight"])
        put(f"style.{i + 1}.bias", sd[f"mapping.fc{i}.bias"])
    put("input.input", sd["synthesis.b4.const"][None])

    # Each helper writes in the order rosinality's modules register their tensors (own parameters,
    # then submodules), so the dict reads like rosinality's own state_dict().
    noises: list[torch.Tensor] = []

    def styled_conv(src: str, dst: str, up: bool) -> None:
        put(f"{dst}.conv.weight", sd[f"{src}.weight"][None])
        if up:
            put(f"{dst}.conv.blur.kernel", rosinality_kernel())
        put(f"{dst}.conv.modulation.weight", sd[f"{src}.affine.weight"])
        put(f"{dst}.conv.modulation.bias", sd[f"{src}.affine.bias"])
        put(f"{dst}.noise.weight", sd[f"{src}.noise_strength"].reshape(1))
        put(f"{dst}.activate.bias", sd[f"{src}.bias"])
        noises.append(sd[f"{src}.noise_const"][None, None])

    def to_rgb(src: str, dst: str, up: bool) -> None:
        put(f"{dst}.bias", sd[f"{src}.bias"].reshape(1, -1, 1, 1))
        if up:
            put(f"{dst}.upsample.kernel", rosinality_kernel())
        put(f"{dst}.conv.weight", sd[f"{src}.weight"][None])
        put(f"{dst}.conv.modulation.weight", sd[f"{src}.affine.weight"])
        put(f"{dst}.conv.modulation.bias", sd[f"{src}.affine.bias"])

    styled_conv("synthesis.b4.conv1", "conv1", up=False)
    to_rgb("synthesis.b4.torgb", "to_rgb1", up=False)
    res = G.synthesis.block_resolutions[1:]
    for i, r in enumerate(res):
        styled_conv(f"synthesis.b{r}.conv0", f"convs.{2 * i}", up=True)
        styled_conv(f"synthesis.b{r}.conv1", f"convs.{2 * i + 1}", up=False)
    for i, r in enumerate(res):  # registered after every conv (rosinality's `upsamples` list is empty)
        to_rgb(f"synthesis.b{r}.torgb", f"to_rgbs.{i}", up=True)
    for j, noise in enumerate(noises):
        put(f"noises.noise_{j}", noise)

    ckpt: dict[str, Any] = {"g_ema": out}
    if "mapping.w_avg" in sd:
        ckpt["latent_avg"] = sd["mapping.w_avg"].to(device="cpu", dtype=torch.float32).clone()
    return ckpt


def write_rosinality(G: Generator, path: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
    """Check G, then write its rosinality checkpoint to `path` atomically (replacing what is there: the
    caller decides whether it may). Returns what `check_rosinality` returns."""
    checked = check_rosinality(G)
    ckpt = rosinality_checkpoint(G)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return checked
