"""Encoders that predict a W+ pivot in one pass: e4e (omertov/encoder4editing) and ReStyle-e4e
(yuval-alaluf/restyle-encoder), restated from their papers' code with the same state-dict names, so the
checkpoints people have (`e4e_ffhq_encode.pt`, ReStyle's `restyle_e4e_ffhq_encode.pt`) load strictly.

The network, as its authors wrote it (shapes for the 256 px input both use):
- IR-SE50 backbone: an input layer (3x3 conv, BatchNorm, PReLU; 3 input channels for e4e, 6 for ReStyle:
  the image and the current reconstruction) then 24 bottleneck_IR_SE units in four stages of 64, 128, 256
  and 512 channels (3, 4, 14, 3 units; each stage's first unit halves the resolution). A unit is
  BatchNorm -> conv3x3 -> PReLU -> conv3x3 (stride) -> BatchNorm -> squeeze-excitation, plus a shortcut
  (a stride-only 1x1 max-pool when the channels stay, else 1x1 conv + BatchNorm). BatchNorm uses the
  running statistics (eval mode) throughout.
- e4e reads three levels: c1 (unit 6, 128 ch, 64 px), c2 (unit 20, 256 ch, 32 px), c3 (unit 23, 512 ch,
  16 px). The coarse styles (0-2) read c3; the middle ones (3-6) read p2 = upsample(c3) + latlayer1(c2);
  the fine ones (7-) read p1 = upsample(p2) + latlayer2(c1); the upsampling is bilinear with
  align_corners=True (their `_upsample_add`). ReStyle-e4e reads only the last 16 px map for every style.
- A style block: stride-2 3x3 convs with LeakyReLU(0.01) down to 1x1, then an EqualLinear (weight scaled
  by 1/sqrt(512) at run time, as rosinality's StyleGAN2 stores it).
- Codes: style 0 gives w0, and every layer i >= 1 gets w0 + style_i (the progressive deltas; a trained
  encoder runs every delta at inference: `ProgressiveStage.Inference`, its constructor's default, which
  checkpoints do not store). Then + latent_avg (e4e with `start_from_latent_avg`; ReStyle: on its first
  iteration, later ones add the delta to the previous codes).
- ReStyle's loop starts from the average image (the generator's render of latent_avg, average-pooled to
  256 px) and feeds cat([x, y_hat]) each iteration, y_hat the previous codes' render pooled to 256 px.

Input: the aligned face resized to 256x256 as their inference transform does (torchvision's Resize on a
PIL image, which is PIL's BILINEAR with its antialiasing support when shrinking, rounded back to uint8),
then ToTensor's /255 and Normalize(0.5, 0.5); done here with Pillow alone.

Checkpoints are `torch.save`d plain dicts ({"state_dict": {"encoder.*", "decoder.*"}, "latent_avg",
"opts": dict}) read with weights_only=True: nothing in the file runs. The `decoder.*` tensors are a
rosinality StyleGAN2 generator; pti renders with its base generator instead, so they only tell which
generator the encoder was trained for (check_encoder_fits).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pti.engine.loaded import state_mismatch
from pti.engine.safe_pickle import load_weights_only, pickle_refusal
from pti.errors import CheckpointError, first_line

ENCODER_KINDS = ("e4e", "restyle")  # --init e4e | restyle (ReStyle-e4e)
UPSTREAM_TYPES = {"Encoder4Editing": "e4e", "ProgressiveBackboneEncoder": "restyle"}  # opts["encoder_type"]
INPUT_SIZE = 256  # both encoders were trained on 256x256 inputs
W_DIM = 512  # fixed in both repositories (GradualStyleBlock(512, 512, ...))
STAGES = ((64, 3), (128, 4), (256, 14), (512, 3))  # IR-SE50: (channels, units); first unit of each strides 2
C1, C2, C3 = 6, 20, 23  # e4e's feature taps: the last unit of the 128, 256 and 512 channel stages
COARSE, MIDDLE = 3, 7  # e4e: styles [0, 3) read c3, [3, 7) read p2, [7, n) read p1


# ---------------------------------------------------------------------------- the IR-SE50 backbone


class SEModule(nn.Module):
    """Squeeze-excitation: scale each channel by sigmoid(fc2(relu(fc1(mean over the map))))."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)  # [N, C, 1, 1]
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class BottleneckIRSE(nn.Module):
    """One IR-SE unit; `res_layer` and `shortcut_layer` indices are the upstream state-dict names."""

    def __init__(
        self,
        in_channels: int,  # channels of the unit's input
        depth: int,  # channels of its output
        stride: int,  # 2 for a stage's first unit (halves the resolution), else 1
    ):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)  # a 1x1 max-pool is plain subsampling
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False),
                nn.BatchNorm2d(depth),
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def ir_se50_body() -> nn.Sequential:
    units, c_in = [], 64
    for depth, n in STAGES:
        for k in range(n):
            units.append(BottleneckIRSE(c_in if k == 0 else depth, depth, 2 if k == 0 else 1))
        c_in = depth
    return nn.Sequential(*units)


def input_layer(in_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))


class EqualLinear(nn.Module):
    """rosinality's EqualLinear with lr_mul 1 and no activation: the weight is stored unscaled."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.scale = 1 / math.sqrt(in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, bias=self.bias * 1)  # `* lr_mul`, kept for the same rounding


class GradualStyleBlock(nn.Module):
    """A feature map of `spatial` px -> one 512-d style: log2(spatial) stride-2 convs to 1x1, then EqualLinear."""

    def __init__(self, spatial: int, channels: int = W_DIM):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(channels, channels, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(channels, channels)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).view(-1, self.channels))


def upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The FPN step: x resized to y's size (bilinear, align_corners=True, as upstream) plus y."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class Encoder4EditingNet(nn.Module):
    """omertov/encoder4editing `Encoder4Editing(50, 'ir_se')`: image [N,3,256,256] -> deltas [N, n, 512]."""

    def __init__(self, num_styles: int):
        super().__init__()
        self.input_layer = input_layer(3)
        self.body = ir_se50_body()
        self.styles = nn.ModuleList(
            GradualStyleBlock(16 if i < COARSE else 32 if i < MIDDLE else 64) for i in range(num_styles)
        )
        self.latlayer1 = nn.Conv2d(256, 512, 1)
        self.latlayer2 = nn.Conv2d(128, 512, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_layer(x)
        taps = {}
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in (C1, C2, C3):
                taps[i] = x
        c1, c2, c3 = taps[C1], taps[C2], taps[C3]
        w0 = self.styles[0](c3)
        codes, features = [w0], c3
        for i in range(1, len(self.styles)):
            if i == COARSE:
                p2 = features = upsample_add(c3, self.latlayer1(c2))  # middle features
            elif i == MIDDLE:
                features = upsample_add(p2, self.latlayer2(c1))  # fine features
            codes.append(w0 + self.styles[i](features))
        return torch.stack(codes, dim=1)


class ReStyleE4ENet(nn.Module):
    """yuval-alaluf/restyle-encoder `ProgressiveBackboneEncoder(50, 'ir_se')`: cat([x, y_hat]) [N,6,256,256]
    -> deltas [N, n, 512], every style read from the last (16 px) feature map."""

    def __init__(self, num_styles: int, in_channels: int = 6):
        super().__init__()
        self.input_layer = input_layer(in_channels)
        self.body = ir_se50_body()
        self.styles = nn.ModuleList(GradualStyleBlock(16) for _ in range(num_styles))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.input_layer(x))
        w0 = self.styles[0](x)
        return torch.stack([w0] + [w0 + self.styles[i](x) for i in range(1, len(self.styles))], dim=1)


# ---------------------------------------------------------------------------- the encoder pti uses


class Encoder(nn.Module):
    """A loaded encoder, always in eval mode without gradients. `encode` runs it."""

    def __init__(
        self,
        kind: str,  # "e4e" | "restyle"
        stylegan_size: int,  # the decoder resolution it was trained for (opts stylegan_size / output_size)
        latent_avg: torch.Tensor | None,  # [num_ws, w_dim]; None: e4e trained without start_from_latent_avg
        source: str = "",  # the file, for messages
        decoder: tuple[int, int] | None = None,  # (resolution, style_dim) of the checkpoint's decoder, if any
    ):
        super().__init__()
        if kind not in ENCODER_KINDS:
            raise ValueError(f"kind must be one of {ENCODER_KINDS}, got {kind!r}")
        self.kind, self.stylegan_size, self.source, self.decoder = kind, stylegan_size, source, decoder
        self.num_ws, self.w_dim = 2 * int(math.log2(stylegan_size)) - 2, W_DIM
        self.net = Encoder4EditingNet(self.num_ws) if kind == "e4e" else ReStyleE4ENet(self.num_ws)
        self.start_from_latent_avg = latent_avg is not None
        self.register_buffer("latent_avg", torch.zeros(self.num_ws, W_DIM) if latent_avg is None else latent_avg)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Encoder":
        return super().train(False)  # BatchNorm must keep its running statistics

    def describe(self) -> str:
        name = "e4e" if self.kind == "e4e" else "ReStyle-e4e"
        return f"{name} encoder for a {self.stylegan_size} px generator ({self.num_ws} x {self.w_dim} W+)"


def load_encoder(path: str | Path, kind: str | None = None, device: str | torch.device = "cpu") -> Encoder:
    """An e4e or ReStyle-e4e checkpoint as its training code saves it -> Encoder (nothing in the file runs)."""
    if kind is not None and kind not in ENCODER_KINDS:
        raise ValueError(f"kind must be one of {ENCODER_KINDS} or None, got {kind!r}")
    source = str(path)
    ckpt = _torch_load(Path(path))
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        what = f"keys {', '.join(sorted(map(str, ckpt))[:6])}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{source}: not an e4e/ReStyle checkpoint (no 'state_dict'; it holds {what})")
    sd, opts = ckpt["state_dict"], ckpt.get("opts")
    if not isinstance(opts, dict):
        raise CheckpointError(f"{source}: the checkpoint has no 'opts' dict (the encoder's training options)")
    enc_sd = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    dec_sd = {k[len("decoder.") :]: v for k, v in sd.items() if k.startswith("decoder.")}
    if not enc_sd or not all(isinstance(v, torch.Tensor) for v in [*enc_sd.values(), *dec_sd.values()]):
        raise CheckpointError(f"{source}: 'state_dict' holds no encoder.* tensors (not an e4e/ReStyle checkpoint)")
    found = _kind_of(opts, enc_sd, source)
    if kind is not None and kind != found:
        raise CheckpointError(f"{source} is a {_label(found)} checkpoint, not {_label(kind)}")
    size_key = "stylegan_size" if found == "e4e" else "output_size"
    size = opts.get(size_key, opts.get("stylegan_size", opts.get("output_size")))
    if not isinstance(size, int) or size < 8 or size & (size - 1):
        raise CheckpointError(f"{source}: opts[{size_key!r}] is {size!r}, not a generator resolution")
    decoder = _decoder_shape(dec_sd, source) if dec_sd else None
    if decoder is not None and decoder[0] != size:
        raise CheckpointError(f"{source}: its decoder is {decoder[0]} px but opts[{size_key!r}] says {size}")
    latent_avg = _latent_avg(ckpt, opts, found, size, source)
    enc = Encoder(found, size, latent_avg, source, decoder)
    mismatch = state_mismatch(enc.net.state_dict(), enc_sd)
    if mismatch:
        raise CheckpointError(f"{source}: encoder weights do not fit {enc.describe()}: {mismatch}")
    enc.net.load_state_dict({k: v.float() for k, v in enc_sd.items()}, strict=True)
    return enc.to(device)


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"encoder checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch's zip container, or a legacy torch pickle
        raise CheckpointError(f"{path} is not a readable torch checkpoint (neither torch's zip container nor a pickle)")
    try:
        return load_weights_only(path)
    except Exception as e:  # truncated zip, pickled classes, ...
        refusal = pickle_refusal(e)
        if refusal is not None:
            raise CheckpointError(f"{path}: refused: {refusal}") from None
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({first_line(e, 160)})") from None


def _label(kind: str) -> str:
    return "e4e" if kind == "e4e" else "ReStyle-e4e"


def _kind_of(opts: dict, enc_sd: dict[str, torch.Tensor], source: str) -> str:
    """From opts["encoder_type"], else from the input layer: 6 channels (image + reconstruction) is ReStyle."""
    etype = opts.get("encoder_type")
    if etype is not None:
        if etype not in UPSTREAM_TYPES:
            known = ", ".join(f"{t} ({_label(k)})" for t, k in UPSTREAM_TYPES.items())
            raise CheckpointError(f"{source}: encoder_type {etype!r} is not supported; pti runs {known}")
        return UPSTREAM_TYPES[etype]
    w = enc_sd.get("input_layer.0.weight")
    if w is None or w.ndim != 4:
        raise CheckpointError(f"{source}: no encoder_type in opts and no input layer to tell the encoder by")
    return "restyle" if w.shape[1] == 6 else "e4e"


def _decoder_shape(dec_sd: dict[str, torch.Tensor], source: str) -> tuple[int, int]:
    """(resolution, style_dim) of the rosinality generator saved beside the encoder, from its tensor shapes."""
    try:
        style_dim = dec_sd["conv1.conv.modulation.weight"].shape[1]
    except KeyError:
        raise CheckpointError(f"{source}: decoder.* tensors are not a rosinality StyleGAN2 generator") from None
    num_rgbs = len([k for k in dec_sd if re.fullmatch(r"to_rgbs\.\d+\.conv\.weight", k)])
    return 4 * 2**num_rgbs, int(style_dim)


def _latent_avg(ckpt: dict, opts: dict, kind: str, size: int, source: str) -> torch.Tensor | None:
    """[num_ws, 512] (e4e saves it repeated per layer; a [512] one is repeated the same way), or None when
    an e4e was trained without start_from_latent_avg (its codes are then used as predicted)."""
    num_ws = 2 * int(math.log2(size)) - 2
    avg = ckpt.get("latent_avg")
    if avg is None:
        if kind == "e4e" and opts.get("start_from_latent_avg") is False:
            return None
        raise CheckpointError(
            f"{source}: the checkpoint has no latent_avg (the average W its codes are relative to); "
            "pti has no way to estimate it without the training generator"
        )
    if not isinstance(avg, torch.Tensor) or avg.shape[-1] != W_DIM or avg.numel() not in (W_DIM, num_ws * W_DIM):
        shape = list(avg.shape) if isinstance(avg, torch.Tensor) else type(avg).__name__
        raise CheckpointError(f"{source}: latent_avg is {shape}, expected [{num_ws}, {W_DIM}] or [{W_DIM}]")
    avg = avg.detach().float()
    return avg.reshape(1, W_DIM).repeat(num_ws, 1) if avg.numel() == W_DIM else avg.reshape(num_ws, W_DIM).clone()


def check_encoder_fits(enc: Encoder, G) -> None:
    """One CheckpointError line when the encoder was trained for another generator than G."""
    want = (G.img_resolution, G.num_ws, G.w_dim)
    have = (enc.stylegan_size, enc.num_ws, enc.w_dim)
    problems = []
    if have != want:
        problems.append(f"it predicts {enc.num_ws} x {enc.w_dim} W+ codes for a {enc.stylegan_size} px generator")
    if tuple(enc.latent_avg.shape) != (G.num_ws, G.w_dim):
        problems.append(f"its latent_avg is {list(enc.latent_avg.shape)}")
    if enc.decoder is not None and enc.decoder != (G.img_resolution, G.w_dim):
        problems.append(f"its decoder is {enc.decoder[0]} px with {enc.decoder[1]}-d styles")
    if problems:
        raise CheckpointError(
            f"{enc.source or 'the encoder'} was trained for another generator: {'; '.join(problems)}, but the base "
            f"is {G.img_resolution} px with {G.num_ws} x {G.w_dim} W+; use an encoder trained for this base"
        )


# ---------------------------------------------------------------------------- running it


def encoder_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """[N,3,H,W] uint8 aligned faces -> [N,3,256,256] float32 in [-1,1], as the authors' inference transform
    (Resize((256, 256)) on a PIL image, ToTensor, Normalize(0.5, 0.5)) makes it."""
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"expected [N, 3, H, W] uint8 images, got {list(images_uint8.shape)} {images_uint8.dtype}")
    out = []
    for img in images_uint8.cpu():
        pil = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy(), "RGB")
        if pil.size != (INPUT_SIZE, INPUT_SIZE):
            pil = pil.resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR)  # PIL's support-scaled (antialiased) filter
        out.append(torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1))
    x = torch.stack(out).to(torch.float32).div(255)  # ToTensor
    return x.sub(0.5).div(0.5)  # Normalize(mean 0.5, std 0.5)


def _render_256(G, codes: torch.Tensor) -> torch.Tensor:
    """G's image for W+ codes (constant noise, fp32, as ReStyle's decoder with randomize_noise=False), average-pooled
    to 256 px (their face_pool; a smaller image is replicated up by the same adaptive pooling)."""
    img = G.synthesis(codes, noise_mode="const", force_fp32=True)
    return F.adaptive_avg_pool2d(img.float(), (INPUT_SIZE, INPUT_SIZE))


@torch.no_grad()
def encode(enc: Encoder, images_uint8: torch.Tensor, G=None, iterations: int = 5) -> torch.Tensor:
    """Aligned faces [N,3,H,W] uint8 -> W+ codes [N, num_ws, w_dim] float32.

    e4e: one pass, + latent_avg. ReStyle-e4e: `iterations` refinements from the average image, G (pti's
    generator for the same W space) rendering each reconstruction."""
    device = enc.latent_avg.device
    x = encoder_input(images_uint8).to(device)
    if enc.kind == "e4e":
        codes = enc.net(x)
        return codes + enc.latent_avg if enc.start_from_latent_avg else codes
    if G is None:
        raise ValueError("ReStyle needs the generator to render its reconstructions (G)")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    check_encoder_fits(enc, G)
    avg = enc.latent_avg[None]  # [1, num_ws, w_dim]
    y_hat = _render_256(G, avg).expand(x.shape[0], -1, -1, -1)  # the average image starts every face
    codes = None
    for it in range(iterations):
        delta = enc.net(torch.cat([x, y_hat], dim=1))
        codes = delta + avg if codes is None else delta + codes
        if it + 1 < iterations:
            y_hat = _render_256(G, codes)
    return codes
