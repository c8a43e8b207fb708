"""Helpers only tests (and the benchmarks) use: small generators, stand-in networks in the real file
formats, NVIDIA-layout pickles, reconstruction metrics, the alignment recipe's geometry, and the
float32 tolerance the parity tests share.

Test files `import helpers` (pytest puts tests/ on sys.path); `benchmarks/bench_tune.py` adds tests/
to sys.path itself. Nothing in `pti/` imports this module.
"""

from __future__ import annotations

import collections
import contextlib
import math
import pickle
import re
import sys
import types
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pti.engine import perceptual as P
from pti.engine import weights as W
from pti.engine.align import face_quad
from pti.engine.generator import Generator
from pti.engine.losses import LPIPSPerceptual
from pti.engine.tune import image_metrics

# ---------------------------------------------------------------------------- small generators

# 16 px, 2 mapping layers, fp16 at the last resolution and conv_clamp: every code path, small and fast.
SMALL = dict(
    z_dim=32,
    c_dim=0,
    w_dim=32,
    img_resolution=16,
    img_channels=3,
    mapping_kwargs=dict(num_layers=2),
    synthesis_kwargs=dict(channel_base=256, channel_max=32, num_fp16_res=1, conv_clamp=256),
)


def small_generator(seed: int = 0, config: dict = SMALL) -> Generator:
    """`config` with its default init plus N(0, 0.1) on every parameter and a random w_avg (seeded)."""
    torch.manual_seed(seed)
    G = Generator(**config).eval()
    with torch.no_grad():
        for name, t in G.named_parameters():
            t.add_(torch.randn_like(t) * 0.1)
        G.mapping.w_avg.normal_()
    return G


# ---------------------------------------------------------------------------- float32 parity


def fp32_reorder_tolerance(scale: float, fan_in: int, depth: int) -> float:
    """How far two float32 evaluations of one network may differ when they sum in different orders.

    Each layer sums `fan_in` products; another summation order moves the sum by about eps * sqrt(fan_in)
    of its magnitude (a random walk of that many roundings, each at most eps/2 relative). The layers keep
    unit gain (demodulation, equalized lr), so the errors of `depth` layers add up, at the value `scale`.
    """
    return torch.finfo(torch.float32).eps * math.sqrt(fan_in) * depth * scale


def fan_in_and_depth(G: Generator) -> tuple[int, int]:
    """The largest fan-in of any weight of G, and the layers on its longest path z -> image
    (mapping layers, every synthesis conv, the last toRGB)."""
    fan_in = max(p[0].numel() for p in G.parameters() if p.ndim >= 2)
    convs = sum(1 for name, m in G.synthesis.named_modules() if name.rsplit(".", 1)[-1] in ("conv0", "conv1"))
    return fan_in, G.mapping.num_layers + convs + 1


# ---------------------------------------------------------------------------- perceptual stand-ins


class VGG16StandIn(nn.Module):
    """A small random network with the TorchScript VGG16's call signature.

    Returns [N, D] features, each tap unit-normalised per position and scaled by 1/sqrt(H*W), the
    same layout as the real network's `return_lpips=True` output (so distances are LPIPS-like).
    """

    def __init__(self, seed: int = 0, width: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor, resize_images: bool = True, return_lpips: bool = False) -> torch.Tensor:
        if resize_images:
            x = F.interpolate(x, size=(224, 224), mode="area")
        x = x / 127.5 - 1  # the real network also takes [0, 255]
        h1 = F.relu(self.conv1(x))
        h2 = F.relu(self.conv2(F.avg_pool2d(h1, 2)))
        outs: list[torch.Tensor] = []
        for h in [h1, h2]:
            if return_lpips:
                h = h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-8)
                h = h / float(h.shape[2] * h.shape[3]) ** 0.5
            outs.append(h.flatten(1))
        return torch.cat(outs, dim=1)


def make_scripted_vgg16_standin(path: str | Path, seed: int = 0) -> Path:
    """Save a `VGG16StandIn` as TorchScript at `path` (loadable by `VGG16Metric(path)`)."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(VGG16StandIn(seed).eval()), str(path))
    return path


def random_lpips_state_dicts(net: str = "alex", seed: int = 0) -> tuple[dict, dict]:
    """Random LPIPS weights in the official formats: a torchvision trunk (He-scaled, plus a classifier
    key that loading must ignore) and lpips v0.1 heads (nonnegative, as trained heads are)."""
    g = torch.Generator().manual_seed(seed)
    trunk = {
        k: torch.randn(t.shape, generator=g) * (2.0 / max(1, t[0].numel())) ** 0.5
        for k, t in P.Trunk(net).state_dict().items()
    }
    trunk["classifier.1.weight"] = torch.zeros(4, 4)
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(P.CHANNELS[net])}
    return trunk, heads


def random_lpips(seed: int = 1) -> LPIPSPerceptual:
    """LPIPS-alex v0.1 with `random_lpips_state_dicts` weights, as the tuning loss."""
    return LPIPSPerceptual(
        P.LPIPS.from_state_dicts("alex", *random_lpips_state_dicts("alex", seed)), name="lpips-alex (random weights)"
    )


def standin_registry(cache: Path) -> W.Registry:
    """The real weight entries with their checksums dropped, so files the tests make can be imported."""
    return W.Registry(
        [replace(e, sha256=None, sha256_prefix=None, size=None) for e in W.DEFAULT_ENTRIES], cache_dir=cache
    )


# ---------------------------------------------------------------------------- reconstruction


@torch.no_grad()
def reconstruction_metrics(G, target: torch.Tensor, pivot: torch.Tensor, perceptual=None) -> dict:
    """`image_metrics` of G's render at the pivot (noise 'const', fp32) against the target."""
    device = next(G.parameters()).device
    img = G.synthesis(pivot.to(device), noise_mode="const", force_fp32=True)
    return image_metrics(img, target.to(device), perceptual)


# ---------------------------------------------------------------------------- alignment geometry


def map_to_output(points: np.ndarray, quad: np.ndarray, output_size: int) -> np.ndarray:
    """Where source pixel positions land in the aligned image (the quad is a similarity transform).

    Pixel centres are at integer coordinates in both images; the recipe samples with (quad + 0.5),
    i.e. it treats the quad as corner coordinates, which is where the half-pixel shifts come from.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    origin, ex, ey = quad[0], quad[3] - quad[0], quad[1] - quad[0]  # TL corner and the two edges
    rel = pts + 0.5 - (origin + 0.5)
    u = rel @ ex / (ex @ ex)  # 0..1 across the output
    v = rel @ ey / (ey @ ey)  # 0..1 down the output
    return np.stack([u, v], axis=1) * output_size - 0.5


def canonical_positions(landmarks: np.ndarray, output_size: int) -> dict[str, np.ndarray]:
    """Where the recipe puts the eye centres and mouth corners of a face with these landmarks.

    By construction the eye midpoint lands on the vertical centre line, a tenth of the eye-mouth
    distance above the image centre, and the mouth midpoint 0.9 of it below; the quad size sets
    the scale. Tests check alignment against the recipe this way rather than against magic numbers.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    quad, _ = face_quad(lm)
    pts = np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[48], lm[54]])
    out = map_to_output(pts, quad, output_size)
    return dict(zip(["eye_left", "eye_right", "mouth_left", "mouth_right"], out))


# ---------------------------------------------------------------------------- NVIDIA network pickles
#
# Pickles in NVIDIA's real layout: stand-in `torch_utils.persistence` and `dnnlib.util` modules are
# registered in sys.modules while pickling, and each network object reduces to
# `torch_utils.persistence._reconstruct_persistent_obj(meta)` with meta = {type, version, module_src,
# class_name, state}, state being the module's __dict__ (parameters, buffers, submodules, init kwargs).

HARMLESS_SRC = "# the network's source code would be here\n"


@contextlib.contextmanager
def fake_nvidia_modules():
    """Register stand-ins for NVIDIA's `torch_utils.persistence` and `dnnlib.util` so pickle can name them."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called by the loader under test
        raise AssertionError("NVIDIA's reconstruct hook must not run")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj

    util = types.ModuleType("dnnlib.util")
    EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    util.EasyDict = EasyDict
    names = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": persistence,
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": util,
    }
    saved = {k: sys.modules.get(k) for k in names}
    sys.modules.update(names)
    try:
        yield types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class Persistent:
    """Pickles exactly as a `torch_utils.persistence` object does."""

    def __init__(self, hook, class_name: str, state: dict, module_src: str = HARMLESS_SRC):
        self.hook, self.meta = (
            hook,
            dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state),
        )

    def __reduce__(self):
        return self.hook, (self.meta,)


def as_persistent(module: torch.nn.Module, fake, init_kwargs=None, module_src=HARMLESS_SRC, rename=None) -> Persistent:
    """Wrap a module tree like NVIDIA's persistent classes pickle it (Module.__dict__ as the state)."""
    state = {
        "training": False,
        "_parameters": collections.OrderedDict((k, v) for k, v in module._parameters.items()),
        "_buffers": collections.OrderedDict((k, v) for k, v in module._buffers.items()),
        "_non_persistent_buffers_set": set(),
        "_backward_hooks": collections.OrderedDict(),
        "_forward_hooks": collections.OrderedDict(),
        "_modules": collections.OrderedDict(
            ((rename or {}).get(k, k), as_persistent(m, fake, module_src=module_src))
            for k, m in module._modules.items()
        ),
        "_init_args": (),
        "_init_kwargs": init_kwargs if init_kwargs is not None else {},
        "weight_gain": np.float64(0.125),  # NVIDIA modules keep numpy scalars as attributes
    }
    return Persistent(fake.reconstruct, type(module).__name__, state, module_src)


def easy(fake, d: dict):
    """`d` (recursively) as NVIDIA's EasyDicts."""
    return fake.EasyDict({k: easy(fake, v) if isinstance(v, dict) else v for k, v in d.items()})


def write_nvidia_pickle(
    path: Path,
    G: Generator,
    protocol: int = 3,
    module_src: str = HARMLESS_SRC,
    kwargs_override: dict | None = None,
    rename=None,
    snapshot: bool = True,
) -> Path:
    """A network-snapshot-like pickle: dict(G, D, G_ema, training_set_kwargs, augment_pipe)."""
    with fake_nvidia_modules() as fake:
        init_kwargs = easy(fake, {**G.init_kwargs, **(kwargs_override or {})})
        G_p = as_persistent(G, fake, init_kwargs, module_src, rename=rename)
        if snapshot:
            D = Persistent(fake.reconstruct, "Discriminator", {"_parameters": {"w": torch.ones(3)}, "_modules": {}})
            obj = dict(
                G=G_p,
                D=D,
                G_ema=G_p,
                training_set_kwargs=easy(fake, dict(path="ffhq.zip", resolution=16)),
                augment_pipe=None,
            )
        else:
            obj = dict(G_ema=G_p)
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


# ---------------------------------------------------------------------------- config dataclasses


def field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def refused_cases(refused: dict[str, list]) -> list:
    """pytest params (field, value) from a table {field: [values the config must refuse]}."""
    return [pytest.param(name, value, id=f"{name}={value!r}") for name, values in refused.items() for value in values]


def assert_refused(cls, name: str, value) -> None:
    """`cls(name=value)` raises one ValueError line naming the class, the field, the rule and the value."""
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{name} must be .+, got {re.escape(repr(value))}$"):
        cls(**{name: value})


def assert_accepted(cls, values: dict):
    """`cls(**values)` is built and keeps the values; returns it."""
    cfg = cls(**values)
    assert asdict(cfg).items() >= values.items()
    return cfg


# ---------------------------------------------------------------------------- CLI


def command_app(command_module):
    """A Typer app holding one `pti.commands` module's command (a root callback keeps it a subcommand)."""
    import typer

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    command_module.register(app)
    return app


# ---------------------------------------------------------------------------- a tuned identity


def tuned_tiny(seed: int = 3, steps: int = 12):
    """The built-in tiny generator really tuned (10x the paper's lr, `steps` steps) towards a blurred
    render of another w, and its pivot [1, num_ws, w_dim]: weights moved by 0.01-0.1, like real tuning."""
    from pti.engine.generator import tiny_generator
    from pti.engine.losses import WeightFreePerceptual
    from pti.engine.tune import TuneConfig, tune

    base = tiny_generator()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pivot = base.mapping(torch.randn(1, base.z_dim, generator=g), truncation_psi=0.7)
        other = base.mapping(torch.randn(1, base.z_dim, generator=g), truncation_psi=0.7)
        target = base.synthesis(other, noise_mode="const", force_fp32=True)
    res = tune(
        base,
        target,
        pivot,
        WeightFreePerceptual(),
        TuneConfig(max_steps=steps, lr=3e-3, locality=False, lpips_threshold=0.0),
    )
    return base, res.G, pivot


def ffhq_shaped_generator(seed: int = 0) -> Generator:
    """ws shaped like FFHQ's [18, 512] (1024 px, w_dim 512) at a few channels, so FFHQ directions fit."""
    torch.manual_seed(seed)
    return (
        Generator(
            z_dim=512,
            w_dim=512,
            img_resolution=1024,
            img_channels=3,
            mapping_kwargs=dict(num_layers=2),
            synthesis_kwargs=dict(channel_base=4096, channel_max=4, num_fp16_res=0),
        )
        .eval()
        .requires_grad_(False)
    )
