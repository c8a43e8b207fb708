"""StyleGAN2 generator (config-f, skip architecture), faithful to stylegan2-ada-pytorch.

Module, parameter and buffer names equal NVIDIA's (`mapping.fc0.weight`, `synthesis.b8.conv0.affine.bias`,
`synthesis.b1024.torgb.weight`, ...), so their state dicts load strictly, and the arithmetic follows
theirs op for op (including the fp16 blocks, the overflow guard and `conv_clamp`), so the same
weights render the same pixels to float32 rounding.

Every op goes through `pti.kernels` with `impl=`: set `G.impl = "ref"` (or pass `impl=` to
`synthesis`) to force the pure-PyTorch reference; "auto" lets registered kernels take over.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from pti import kernels
from pti.errors import CheckpointError
from pti.fsutil import plain

NOISE_MODES = ("random", "const", "none")


def check_noise_mode(noise_mode, n: int):
    """`noise_mode` as a layer applies it: one of NOISE_MODES for the whole batch, or a tuple (or list) of
    them, one per sample, for a batch that mixes modes (tuning renders the pivot with 'const' and a
    locality sample with 'none' in one call). A tuple of one mode repeated is that mode (bit for bit the
    same render); a mixed one comes back as a tuple."""
    if isinstance(noise_mode, str):
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        return noise_mode
    if not isinstance(noise_mode, (tuple, list)):
        raise ValueError(f"noise_mode must be one of {NOISE_MODES} or a tuple of them, got {noise_mode!r}")
    bad = [m for m in noise_mode if not isinstance(m, str) or m not in NOISE_MODES]
    if bad:
        raise ValueError(f"each per-sample noise_mode must be one of {NOISE_MODES}, got {bad[0]!r}")
    if len(noise_mode) != n:
        raise ValueError(f"noise_mode has {len(noise_mode)} per-sample modes for a batch of {n}")
    return noise_mode[0] if len(set(noise_mode)) == 1 else tuple(noise_mode)


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale each vector to unit root-mean-square (the mapping network's input normalization)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def check_shape(t: torch.Tensor, shape: list[int | None], name: str) -> None:
    """NVIDIA's `assert_shape` as a ValueError: `t` has len(shape) dimensions, each the size given (None:
    any size, the batch). Only fixed sizes are compared, plain Python ints even while `torch.export`
    traces with a dynamic batch, so the checks cost the exported graphs nothing."""
    if t.ndim != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = ", ".join("N" if size is None else str(size) for size in shape)
        raise ValueError(f"{name} must be [{want}], got {tuple(t.shape)}")


class FullyConnectedLayer(nn.Module):
    """Linear layer with equalized learning rate: weights stored as N(0,1)/lr_mul, scaled at run time."""

    def __init__(
        self,
        in_features: int,  # input features
        out_features: int,  # output features
        bias: bool = True,  # additive bias before the activation
        activation: str = "linear",  # 'linear' or 'lrelu'
        lr_multiplier: float = 1.0,  # learning-rate multiplier (0.01 in the mapping network)
        bias_init: float = 0.0,  # initial bias (1 for the style affines: styles start near 1)
    ):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        # He-style constant 1/sqrt(fan_in) applied in forward: equalized learning rate.
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        x = x.matmul(w.t())
        return kernels.bias_act(x, b, act=self.activation, impl=impl)


class MappingNetwork(nn.Module):
    """z -> w: normalize, 8 equalized-lr fully connected layers, broadcast to num_ws, truncate."""

    def __init__(
        self,
        z_dim: int,  # input latent (Z) size
        c_dim: int,  # conditioning size; only 0 is supported
        w_dim: int,  # intermediate latent (W) size
        num_ws: int,  # number of w's to broadcast to
        num_layers: int = 8,  # fully connected layers
        embed_features: int | None = None,  # label embedding size (conditional models only)
        layer_features: int | None = None,  # hidden width, None = w_dim
        activation: str = "lrelu",  # hidden activation
        lr_multiplier: float = 0.01,  # learning-rate multiplier of every layer
        w_avg_beta: float | None = 0.995,  # decay of the tracked w average, None = no tracking
    ):
        super().__init__()
        if c_dim != 0:
            raise CheckpointError(f"conditional generators (c_dim={c_dim}) are not supported")
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.num_ws, self.num_layers, self.w_avg_beta = num_ws, num_layers, w_avg_beta
        layer_features = w_dim if layer_features is None else layer_features
        features = [z_dim] + [layer_features] * (num_layers - 1) + [w_dim]
        for idx in range(num_layers):
            layer = FullyConnectedLayer(
                features[idx], features[idx + 1], activation=activation, lr_multiplier=lr_multiplier
            )
            setattr(self, f"fc{idx}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self,
        z: torch.Tensor,  # [N, z_dim]
        c: torch.Tensor | None = None,  # unused (unconditional)
        truncation_psi: float = 1.0,  # 1 = no truncation; w <- w_avg + psi * (w - w_avg)
        truncation_cutoff: int | None = None,  # truncate only the first `cutoff` w's
        skip_w_avg_update: bool = False,
        impl: str = "auto",
    ) -> torch.Tensor:  # [N, num_ws, w_dim]
        check_shape(z, [None, self.z_dim], "z")
        x = normalize_2nd_moment(z.to(torch.float32))
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x, impl=impl)
        if self.w_avg_beta is not None and self.training and not skip_w_avg_update:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x = x.clone()
                x[:, :truncation_cutoff] = self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi)
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally 2x up), per-pixel noise, bias + lrelu * sqrt(2), clamp."""

    def __init__(
        self,
        in_channels: int,  # input feature maps
        out_channels: int,  # output feature maps
        w_dim: int,  # intermediate latent (W) size: the style affine's input
        resolution: int,  # output resolution of this layer (and of its noise map)
        kernel_size: int = 3,  # convolution kernel size (3x3 in StyleGAN2)
        up: int = 1,  # 2 = transposed conv + FIR up-sampling (a block's conv0), 1 = none
        use_noise: bool = True,  # add per-pixel noise scaled by a learned strength
        activation: str = "lrelu",  # after the bias: 'lrelu' (slope 0.2, gain sqrt 2), 'linear', ...
        resample_filter=(1, 3, 3, 1),  # low-pass FIR taps of the up-sampling (separable, normalized)
        conv_clamp: float | None = None,  # clamp activations to +-conv_clamp (fp16 safety), None = off
    ):
        super().__init__()
        self.resolution, self.up, self.use_noise = resolution, up, use_noise
        self.activation, self.conv_clamp = activation, conv_clamp
        self.register_buffer("resample_filter", kernels.setup_filter(list(resample_filter)))
        self.padding = kernel_size // 2
        self.act_gain = kernels.activation_gain(activation)
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x, w, noise_mode="random", fused_modconv=True, gain=1, impl="auto"):
        in_resolution = self.resolution // self.up
        check_shape(x, [None, self.weight.shape[1], in_resolution, in_resolution], "a synthesis layer's x")
        check_shape(w, [None, self.affine.weight.shape[1]], "a synthesis layer's w")
        noise_mode = check_noise_mode(noise_mode, x.shape[0])  # a mode, or a mixed tuple (one per sample)
        styles = self.affine(w, impl=impl)  # [NI]
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = (
                torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device) * self.noise_strength
            )
        if self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        if self.use_noise and isinstance(noise_mode, tuple):
            noise = self.per_sample_noise(noise_mode, x.device)
        act_clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return kernels.modulated_conv2d_act(  # modulated conv, then bias_act (one kernel where one is registered)
            x,
            self.weight,
            styles,
            noise=noise,
            up=self.up,
            padding=self.padding,
            resample_filter=self.resample_filter,
            flip_weight=(self.up == 1),
            fused_modconv=fused_modconv,
            bias=self.bias,
            act=self.activation,
            gain=self.act_gain * gain,
            clamp=act_clamp,
            impl=impl,
        )

    def per_sample_noise(self, modes: tuple[str, ...], device) -> torch.Tensor:  # [N, 1, R, R]
        """One noise map per sample, stacked: 'const' is the layer's constant map times the strength (the
        same product, so the same bits, as the whole-batch 'const'), 'none' zeros (adding +0.0 leaves every
        activation's value as it was, and no gradient reaches the strength from it), 'random' a fresh draw
        per sample (its own torch.randn call, so not the numbers a whole-batch 'random' would draw). A
        concatenation rather than a 0/1 mask: building a mask tensor from Python values would copy it to
        the device at every layer (a host synchronisation on CUDA, and a break in a CUDA graph)."""
        r = self.resolution
        scaled = self.noise_const * self.noise_strength if "const" in modes else None  # [R, R]
        pieces = []
        for mode in modes:
            if mode == "const":
                pieces.append(scaled.expand(1, 1, r, r))
            elif mode == "random":
                pieces.append(torch.randn([1, 1, r, r], device=device) * self.noise_strength)
            else:
                pieces.append(torch.zeros([1, 1, r, r], dtype=self.noise_const.dtype, device=device))
        return torch.cat(pieces)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv to RGB, no demodulation."""

    def __init__(
        self,
        in_channels: int,  # input feature maps
        out_channels: int,  # image channels (3: RGB)
        w_dim: int,  # intermediate latent (W) size: the style affine's input
        kernel_size: int = 1,  # convolution kernel size (1x1)
        conv_clamp: float | None = None,  # clamp the output to +-conv_clamp, None = off
    ):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x, w, fused_modconv=True, impl="auto"):
        check_shape(x, [None, self.weight.shape[1], None, None], "toRGB's x")
        check_shape(w, [None, self.affine.weight.shape[1]], "toRGB's w")
        styles = self.affine(w, impl=impl) * self.weight_gain
        return kernels.modulated_conv2d_act(
            x,
            self.weight,
            styles,
            demodulate=False,
            fused_modconv=fused_modconv,
            bias=self.bias,
            clamp=self.conv_clamp,
            impl=impl,
        )


class SynthesisBlock(nn.Module):
    """One resolution: (const | up-conv0), conv1, toRGB added onto the up-sampled skip image."""

    def __init__(
        self,
        in_channels: int,  # input feature maps, 0 = the first block (a learned constant input)
        out_channels: int,  # output feature maps
        w_dim: int,  # intermediate latent (W) size
        resolution: int,  # this block's resolution, twice the previous block's
        img_channels: int,  # image channels (3: RGB)
        is_last: bool,  # the highest resolution's block (with 'skip' every block has a toRGB)
        architecture: str = "skip",  # only 'skip': each block's toRGB added onto the up-sampled image
        resample_filter=(1, 3, 3, 1),  # low-pass FIR taps of conv0's and the skip image's up-sampling
        conv_clamp: float | None = None,  # clamp every layer's output to +-conv_clamp (fp16 safety), None = off
        use_fp16: bool = False,  # run this block's activations in float16 (unless force_fp32)
        **layer_kwargs,  # kernel_size, use_noise, activation: for both SynthesisLayers
    ):
        super().__init__()
        if architecture != "skip":
            raise CheckpointError(f"architecture {architecture!r} is not supported (only 'skip', StyleGAN2 config-f)")
        self.in_channels, self.w_dim, self.resolution = in_channels, w_dim, resolution
        self.img_channels, self.is_last, self.architecture = img_channels, is_last, architecture
        self.use_fp16 = use_fp16
        self.register_buffer("resample_filter", kernels.setup_filter(list(resample_filter)))
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(
                in_channels,
                out_channels,
                w_dim=w_dim,
                resolution=resolution,
                up=2,
                resample_filter=resample_filter,
                conv_clamp=conv_clamp,
                **layer_kwargs,
            )
            self.num_conv += 1
        self.conv1 = SynthesisLayer(
            out_channels, out_channels, w_dim=w_dim, resolution=resolution, conv_clamp=conv_clamp, **layer_kwargs
        )
        self.num_conv += 1
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
        self.num_torgb += 1

    def forward(self, x, img, ws, force_fp32=False, fused_modconv=None, impl="auto", **layer_kwargs):
        check_shape(ws, [None, self.num_conv + self.num_torgb, self.w_dim], "a synthesis block's ws")
        prev = self.resolution // 2  # the previous block's resolution: x's and the skip image's
        if self.in_channels != 0:
            check_shape(x, [None, self.in_channels, prev, prev], "a synthesis block's x")
        if img is not None:
            check_shape(img, [None, self.img_channels, prev, prev], "a synthesis block's img")
        w_iter = iter(ws.unbind(dim=1))
        dtype = torch.float16 if self.use_fp16 and not force_fp32 else torch.float32
        if fused_modconv is None:
            # Fused (grouped) conv is fastest for inference; training uses the shared-weight form.
            fused_modconv = (not self.training) and (
                dtype == torch.float32 or int(x.shape[0] if x is not None else ws.shape[0]) == 1
            )
        if self.in_channels == 0:
            x = self.const.to(dtype=dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, impl=impl, **layer_kwargs)
        else:
            x = x.to(dtype=dtype)
            x = self.conv0(x, next(w_iter), fused_modconv=fused_modconv, impl=impl, **layer_kwargs)
            x = self.conv1(x, next(w_iter), fused_modconv=fused_modconv, impl=impl, **layer_kwargs)
        if img is not None:
            img = kernels.upsample2d(img, self.resample_filter, impl=impl)
        y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv, impl=impl).to(torch.float32)
        img = img + y if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] -> image [N, C, R, R] in about [-1, 1]."""

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int = 32768,  # channels at resolution r: min(channel_base // r, channel_max)
        channel_max: int = 512,
        num_fp16_res: int = 0,  # run the N highest resolutions in float16
        **block_kwargs,
    ):
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise CheckpointError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        log2 = int(math.log2(img_resolution))
        self.block_resolutions = [2**i for i in range(2, log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(
                channels[res // 2] if res > 4 else 0,
                channels[res],
                w_dim=w_dim,
                resolution=res,
                img_channels=img_channels,
                is_last=(res == img_resolution),
                use_fp16=(res >= fp16_resolution),
                **block_kwargs,
            )
            # Consecutive blocks share a w: block b uses ws[idx : idx + num_conv + 1], the last
            # one being the toRGB's, which is also the next block's first conv's.
            self.num_ws += block.num_conv
            setattr(self, f"b{res}", block)
        self.num_ws += 1  # the last block's toRGB
        self.impl = "auto"

    @property
    def fp16_resolutions(self) -> list[int]:
        return [r for r in self.block_resolutions if getattr(self, f"b{r}").use_fp16]

    def forward(self, ws, noise_mode="random", force_fp32=False, fused_modconv=None, impl=None):
        check_shape(ws, [None, self.num_ws, self.w_dim], "ws")
        impl = impl or self.impl
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            cur = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(
                x, img, cur, force_fp32=force_fp32, fused_modconv=fused_modconv, impl=impl, noise_mode=noise_mode
            )
        return img


_SYNTHESIS_KEYS = {
    "channel_base",
    "channel_max",
    "num_fp16_res",
    "architecture",
    "resample_filter",
    "conv_clamp",
    "fp16_channels_last",
    "kernel_size",
    "use_noise",
    "activation",
}
_MAPPING_KEYS = {"num_layers", "embed_features", "layer_features", "activation", "lr_multiplier", "w_avg_beta"}
# NVIDIA's `fp16_channels_last` says how the fp16 blocks lay their tensors out in memory (channels-last,
# for speed on their CUDA setup), not what they compute. Their generators' init kwargs may carry it, so it
# is accepted (and kept in `init_kwargs`), but nothing here has a memory-format switch: it goes no further.
_LAYOUT_ONLY_KEYS = {"fp16_channels_last"}


class Generator(nn.Module):
    """z -> w -> image. Same constructor arguments as stylegan2-ada-pytorch's `Generator`."""

    def __init__(
        self,
        z_dim: int = 512,
        c_dim: int = 0,
        w_dim: int = 512,
        img_resolution: int = 1024,
        img_channels: int = 3,
        mapping_kwargs: dict | None = None,
        synthesis_kwargs: dict | None = None,
        **extra_synthesis_kwargs,
    ):
        super().__init__()
        mapping_kwargs = dict(mapping_kwargs or {})
        synthesis_kwargs = {**(synthesis_kwargs or {}), **extra_synthesis_kwargs}
        for name, got, allowed in (
            ("mapping", mapping_kwargs, _MAPPING_KEYS),
            ("synthesis", synthesis_kwargs, _SYNTHESIS_KEYS),
        ):
            unknown = sorted(set(got) - allowed)
            if unknown:
                raise CheckpointError(f"unsupported {name} options {unknown}: not a StyleGAN2 (config-f) generator")
        if c_dim != 0:
            raise CheckpointError(f"conditional generators (c_dim={c_dim}) are not supported")
        self.init_kwargs: dict[str, Any] = plain(
            dict(
                z_dim=z_dim,
                c_dim=c_dim,
                w_dim=w_dim,
                img_resolution=img_resolution,
                img_channels=img_channels,
                mapping_kwargs=mapping_kwargs,
                synthesis_kwargs=synthesis_kwargs,
            )
        )
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        layers_kwargs = {k: v for k, v in synthesis_kwargs.items() if k not in _LAYOUT_ONLY_KEYS}
        self.synthesis = SynthesisNetwork(
            w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels, **layers_kwargs
        )
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws, **mapping_kwargs)

    @property
    def impl(self) -> str:
        return self.synthesis.impl

    @impl.setter
    def impl(self, value: str) -> None:
        self.synthesis.impl = value

    def forward(self, z, c=None, truncation_psi=1.0, truncation_cutoff=None, **synthesis_kwargs):
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, **synthesis_kwargs)

    def clone(self) -> "Generator":
        """An independent copy (weights, buffers, config and impl)."""
        return copy.deepcopy(self)


# The built-in tiny generator: random weights from a fixed seed, for offline demos and tests.
# It is NOT a trained model; everything that uses it says so.
TINY_CONFIG = dict(
    z_dim=64,
    c_dim=0,
    w_dim=64,
    img_resolution=64,
    img_channels=3,
    mapping_kwargs=dict(num_layers=4),
    synthesis_kwargs=dict(channel_base=2048, channel_max=128, num_fp16_res=0, conv_clamp=256),
)
TINY_SEED = 20220613
TINY_LABEL = "built-in tiny generator (64 px, random weights from a fixed seed, not a trained model)"


def tiny_generator(device: str | torch.device = "cpu") -> Generator:
    """The built-in tiny generator: same seed, same weights, on every machine."""
    gen = torch.Generator().manual_seed(TINY_SEED)
    G = Generator(**copy.deepcopy(TINY_CONFIG))
    with torch.no_grad():
        for name, t in sorted(list(G.named_parameters()) + list(G.named_buffers())):
            if name.endswith("resample_filter") or name.endswith("w_avg"):
                continue
            if name.endswith("noise_strength"):
                t.fill_(0.05)
            elif name.endswith(".bias") and ".affine." in name:
                t.fill_(1.0)
            elif name.endswith(".bias"):
                t.zero_()
            else:
                t.copy_(torch.randn(t.shape, generator=gen))
        # Some structure instead of pure noise: lr-multiplied mapping weights stay at their
        # equalized scale (randn / lr_multiplier), as a freshly constructed network has them.
        for idx in range(G.mapping.num_layers):
            fc = getattr(G.mapping, f"fc{idx}")
            fc.weight.div_(fc.bias_gain)
        z = torch.randn([4096, G.z_dim], generator=gen)
        G.mapping.w_avg.copy_(G.mapping(z)[:, 0].mean(0))
    return G.eval().requires_grad_(False).to(device)
