"""Our Generator -> a rosinality stylegan2-pytorch checkpoint (`pti.export.rosinality`).

rosinality's Generator has 512 feature maps up to 32 px whatever its options, so the generators here keep
its channel table at 16 px (4 px for the refusals, 64 px where the channel multiplier matters). The writer
is a pure renaming: through a file and pti's own rosinality loader the state dict comes back bit for bit
and so do the images. What rosinality's `Generator.load_state_dict(strict=True)` needs is checked against
`rosinality_skeleton`, its module tree restated from model.py's constructors (names come from torch's own
module naming there, not from the writer's strings). Deliberately wrong checkpoints are shown to fail the
round trip.

Set PTI_ROSINALITY_PATH to a checkout of rosinality/stylegan2-pytorch to also run the file through its
own model.py on the CPU (its CUDA ops are not compiled: the CPU paths use its native fallbacks).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from clirun import error_lines, files_under, no_traceback, run_pti
from helpers import fan_in_and_depth, fp32_reorder_tolerance, small_generator
from pti.engine.checkpoint import generator_hash, load_checkpoint, save_generator
from pti.engine.identity import Identity, open_identity
from pti.engine.generator import Generator
from pti.errors import ExportError
from pti.export.rosinality import check_rosinality, rosinality_checkpoint, write_rosinality

STYLE_DIM, N_MLP = 32, 2


def config(size=16, z_dim=STYLE_DIM, w_dim=STYLE_DIM, mapping=None, **synthesis) -> dict:
    """A StyleGAN2 config on rosinality's channel table (channel_multiplier 2: NVIDIA's config-f base)."""
    return dict(
        z_dim=z_dim,
        c_dim=0,
        w_dim=w_dim,
        img_resolution=size,
        img_channels=synthesis.pop("img_channels", 3),
        mapping_kwargs=dict(num_layers=N_MLP, **(mapping or {})),
        synthesis_kwargs={**dict(channel_base=32768, channel_max=512, num_fp16_res=0, conv_clamp=None), **synthesis},
    )


@pytest.fixture(scope="module")
def G() -> Generator:
    """16 px, every parameter moved off its init (noise strengths and biases non-zero), w_avg random."""
    return small_generator(seed=5, config=config())


def distinct_ws(G: Generator, n: int = 2, seed: int = 1) -> torch.Tensor:
    """[n, num_ws, w_dim], a different w at every layer, so a layer reading another layer's w shows."""
    z = torch.randn(n * G.num_ws, G.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return G.mapping(z, truncation_psi=0.7)[:, 0].reshape(n, G.num_ws, G.w_dim)


def render(G: Generator, ws: torch.Tensor, fused_modconv: bool = True) -> torch.Tensor:
    with torch.no_grad():
        return G.synthesis(ws, noise_mode="const", force_fp32=True, fused_modconv=fused_modconv)


# ---------------------------------------------------------------------------- rosinality's module tree


def make_kernel_x2() -> torch.Tensor:
    """rosinality's make_kernel([1,3,3,1]) times factor**2 for its x2 Blur and Upsample."""
    k = torch.tensor([1, 3, 3, 1], dtype=torch.float32)
    k = k[None, :] * k[:, None]
    k /= k.sum()
    return k * 2**2


def _module(params=(), buffers=(), **children) -> nn.Module:
    m = nn.Module()
    for name, shape in params:
        m.register_parameter(name, nn.Parameter(torch.empty(shape)))
    for name, t in buffers:
        m.register_buffer(name, t)
    for name, child in children.items():
        m.add_module(name, child)
    return m


def rosinality_skeleton(size: int, style_dim: int, n_mlp: int, channel_multiplier: int) -> nn.Module:
    """The parameters and buffers of rosinality's Generator(size, style_dim, n_mlp, channel_multiplier), in
    its module tree: EqualLinear (weight, bias), ModulatedConv2d (weight [1,O,I,k,k], a Blur when it
    upsamples, a modulation EqualLinear), StyledConv (conv, NoiseInjection weight [1], FusedLeakyReLU bias),
    ToRGB (bias [1,3,1,1], an Upsample except the first, a 1x1 conv), noise buffers [1,1,r,r]."""
    cm = channel_multiplier
    channels = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm, 512: 32 * cm}
    channels[1024] = 16 * cm
    res = [r for r in channels if r <= size]

    def linear(i, o):
        return _module([("weight", (o, i)), ("bias", (o,))])

    def modconv(i, o, k, up):
        blur = {"blur": _module(buffers=[("kernel", make_kernel_x2())])} if up else {}
        return _module([("weight", (1, o, i, k, k))], **blur, modulation=linear(style_dim, i))

    def styled(i, o, up):
        return _module(conv=modconv(i, o, 3, up), noise=_module([("weight", (1,))]), activate=_module([("bias", (o,))]))

    def rgb(i, up):
        upsample = {"upsample": _module(buffers=[("kernel", make_kernel_x2())])} if up else {}
        return _module([("bias", (1, 3, 1, 1))], **upsample, conv=modconv(i, 3, 1, False))

    convs = []
    for prev, r in zip(res, res[1:]):
        convs += [styled(channels[prev], channels[r], True), styled(channels[r], channels[r], False)]
    noise_res = [4] + [r for r in res[1:] for _ in range(2)]  # one per conv: conv1, then two per resolution
    return _module(
        style=nn.Sequential(nn.Module(), *[linear(style_dim, style_dim) for _ in range(n_mlp)]),  # 0: PixelNorm
        input=_module([("input", (1, channels[4], 4, 4))]),
        conv1=styled(channels[4], channels[4], False),
        to_rgb1=rgb(channels[4], False),
        convs=nn.ModuleList(convs),
        upsamples=nn.ModuleList(),
        to_rgbs=nn.ModuleList([rgb(channels[r], True) for r in res[1:]]),
        noises=_module(buffers=[(f"noise_{j}", torch.empty(1, 1, r, r)) for j, r in enumerate(noise_res)]),
    )


def test_names_shapes_and_buffers_are_rosinalitys(G):
    notes, info = check_rosinality(G)
    assert notes == [] and info == dict(size=16, style_dim=STYLE_DIM, n_mlp=N_MLP, channel_multiplier=2)
    ckpt = rosinality_checkpoint(G)
    assert sorted(ckpt) == ["g_ema", "latent_avg"]
    sd = ckpt["g_ema"]
    expected = rosinality_skeleton(**info).state_dict()
    assert list(sd) == list(expected)  # the same names, in rosinality's own order
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    rosinality_skeleton(**info).load_state_dict(sd, strict=True)
    for name in [k for k in expected if k.endswith(".kernel")]:
        assert torch.equal(sd[name], expected[name]), name
    assert torch.equal(ckpt["latent_avg"], G.mapping.w_avg) and ckpt["latent_avg"].shape == (STYLE_DIM,)
    ours = {t.untyped_storage().data_ptr() for t in G.state_dict().values()}
    for name, t in [*sd.items(), ("latent_avg", ckpt["latent_avg"])]:
        assert t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous(), name
        assert t.untyped_storage().data_ptr() not in ours, f"{name} shares storage with G"


def _round_trip(G: Generator, ckpt: dict, path: Path) -> list[str]:
    """What differs from G after `ckpt` goes through a file and pti's rosinality loader (`_differences`)."""
    torch.save(ckpt, path)
    return _differences(G, path)


def _differences(G: Generator, path: Path) -> list[str]:
    """What differs from G in the rosinality checkpoint at `path`, read by pti's loader: tensor names,
    'images', or the loader's refusal."""
    try:
        loaded = load_checkpoint(path)
    except Exception as e:  # a renaming that lost or reshaped a tensor
        return [f"refused: {e}"]
    assert loaded.format == "rosinality-pt"
    ours, back = G.state_dict(), loaded.generator.state_dict()
    diffs = sorted(set(ours) ^ set(back))
    diffs += [k for k in sorted(set(ours) & set(back)) if not torch.equal(ours[k], back[k])]
    ws = distinct_ws(G)
    if not all(torch.equal(render(G, ws, f), render(loaded.generator, ws, f)) for f in (True, False)):
        diffs.append("images")
    return diffs


def test_round_trip_through_a_file_is_bit_exact(G, tmp_path):
    """A pure renaming: the state dict comes back bit for bit (resample filters included, which the loader
    derives), so the images do too, fused and unfused; the file is plain tensors in dicts."""
    notes, info = write_rosinality(G, tmp_path / "r.pt")
    assert notes == [] and info["channel_multiplier"] == 2
    loaded = load_checkpoint(tmp_path / "r.pt")
    assert loaded.notes == [] and loaded.generator.init_kwargs["img_resolution"] == 16
    plain = torch.load(tmp_path / "r.pt", weights_only=True)
    assert plain.keys() == {"g_ema", "latent_avg"} and all(isinstance(t, torch.Tensor) for t in plain["g_ema"].values())
    assert _differences(G, tmp_path / "r.pt") == []
    assert [p.name for p in tmp_path.iterdir()] == ["r.pt"]  # no temporary file left


def _swap(a: str, b: str):
    def corrupt(sd):
        sd[a], sd[b] = sd[b], sd[a]

    return corrupt


def _apply(name: str, fn):
    def corrupt(sd):
        sd[name] = fn(sd[name])

    return corrupt


def _renumber_style_from_0(sd):
    for i in range(1, N_MLP + 1):
        for p in ("weight", "bias"):
            sd[f"style.{i - 1}.{p}"] = sd.pop(f"style.{i}.{p}")


# Checkpoints a plausible writer bug would produce; each must fail the round trip.
WRONG = {
    "noise maps swapped between the 8 px convs": _swap("noises.noise_1", "noises.noise_2"),
    "noise maps one layer late at 16 px": _swap("noises.noise_3", "noises.noise_4"),
    "mapping weight transposed": _apply("style.1.weight", lambda w: w.t()),
    "up-conv weight flipped": _apply("convs.0.conv.weight", lambda w: w.flip([3, 4])),
    "up-conv and conv swapped": _swap("convs.2.conv.weight", "convs.3.conv.weight"),
    "toRGB affines swapped": _swap("to_rgbs.0.conv.modulation.weight", "to_rgbs.1.conv.modulation.weight"),
    "style numbered from 0 (PixelNorm is style.0)": _renumber_style_from_0,
}


@pytest.mark.parametrize("wrong", WRONG)
def test_a_wrong_checkpoint_fails_the_round_trip(G, tmp_path, wrong):
    ckpt = rosinality_checkpoint(G)
    WRONG[wrong](ckpt["g_ema"])
    assert _round_trip(G, ckpt, tmp_path / "wrong.pt") != []


def test_notes_for_what_computes_differently(tmp_path):
    """conv_clamp and float16 blocks load (rosinality has neither), with a note each; the images are pti's
    fp32 render's, bit for bit, while no activation reaches the clamp (256, far above these)."""
    G = small_generator(seed=6, config=config(size=8, num_fp16_res=1, conv_clamp=256))
    notes, info = write_rosinality(G, tmp_path / "r.pt")
    assert info == dict(size=8, style_dim=STYLE_DIM, n_mlp=N_MLP, channel_multiplier=2)
    assert len(notes) == 2 and "conv_clamp 256" in notes[0] and "[8] px in float16" in notes[1]
    loaded = load_checkpoint(tmp_path / "r.pt").generator
    assert loaded.synthesis.fp16_resolutions == [] and loaded.init_kwargs["synthesis_kwargs"]["conv_clamp"] is None
    ws = distinct_ws(G)
    assert torch.equal(render(G, ws), render(loaded, ws))


def test_without_a_tracked_w_avg(tmp_path):
    """A generator that tracks no w average (w_avg_beta=None) is written without latent_avg, with a note;
    pti's loader then estimates one, and says so."""
    G = Generator(**config(size=4, mapping=dict(w_avg_beta=None))).eval()
    notes, _ = write_rosinality(G, tmp_path / "r.pt")
    assert notes == ["no latent_avg written: this generator tracks no w average (mapping w_avg_beta=None)"]
    assert "latent_avg" not in torch.load(tmp_path / "r.pt", weights_only=True)
    assert any("w_avg estimated" in n for n in load_checkpoint(tmp_path / "r.pt").notes)


@pytest.mark.parametrize(
    "size, channel_base, channel_multiplier",
    [(64, 16384, 1), (64, 32768, 2), (32, 16384, 2)],  # up to 32 px every multiplier fits: rosinality's default
)
def test_channel_multiplier(size, channel_base, channel_multiplier):
    G = Generator(**config(size=size, channel_base=channel_base))
    assert check_rosinality(G)[1]["channel_multiplier"] == channel_multiplier
    assert (
        rosinality_checkpoint(G)["g_ema"].keys()
        == rosinality_skeleton(size, STYLE_DIM, N_MLP, channel_multiplier).state_dict().keys()
    )


# Generators rosinality's Generator(size, style_dim, n_mlp, channel_multiplier) cannot be: (config, reason).
REFUSED = {
    "z_dim != w_dim": (config(size=4, z_dim=64), r"mapping widths \[64, 32, 32\]"),
    "hidden width != w_dim": (config(size=4, mapping=dict(layer_features=64)), r"mapping widths \[32, 64, 32\]"),
    "lr_multiplier 1": (
        config(size=4, mapping=dict(lr_multiplier=1.0)),
        "mapping lr_multiplier 1.0; rosinality's is 0.01",
    ),
    "mapping activation": (config(size=4, mapping=dict(activation="linear")), "mapping activation 'linear'"),
    "grayscale": (config(size=4, img_channels=1), "1 image channels; rosinality's toRGB makes 3"),
    "256 channels at 8 px": (
        config(size=8, channel_max=256),
        r"channels \{4: 256, 8: 256\}.*integer channel_multiplier",
    ),
    "not 256*cm at 64 px": (config(size=64, channel_base=20000), r"channels \{4: 512, .* 64: 312\}"),
    "resample filter [1,2,1]": (config(size=8, resample_filter=[1, 2, 1]), r"resample filter other than \[1,3,3,1\]"),
    "resample filter [1,2,2,1]": (config(size=8, resample_filter=[1, 2, 2, 1]), r"resample filter other than"),
    "no noise": (config(size=4, use_noise=False), "synthesis layers without noise"),
    "synthesis activation": (config(size=4, activation="relu"), "synthesis activation 'relu'"),
    "1x1 convs": (config(size=4, kernel_size=1), "1x1 convolutions; rosinality's are 3x3"),
    "2048 px": (
        config(size=2048, channel_base=8192, channel_max=4),
        "resolution 2048; rosinality's is a power of two from 4 to 1024",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_with_one_line(tmp_path, case):
    cfg, reason = REFUSED[case]
    G = Generator(**cfg)
    with pytest.raises(
        ExportError,
        match=r"^rosinality's Generator\(size, style_dim, n_mlp, channel_multiplier\) "
        r"cannot hold this generator: .*" + reason,
    ) as e:
        write_rosinality(G, tmp_path / "r.pt")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_every_reason_in_the_one_line():
    G = Generator(**config(size=4, z_dim=64, img_channels=1, mapping=dict(lr_multiplier=1.0)))
    with pytest.raises(ExportError) as e:
        check_rosinality(G)
    message = str(e.value)
    assert "\n" not in message
    for reason in ("mapping widths [64, 32, 32]", "mapping lr_multiplier 1.0", "1 image channels"):
        assert reason in message


# ---------------------------------------------------------------------------- through the CLI


def _tuned_person(tmp_path: Path, G: Generator) -> tuple[Path, Path, Generator]:
    """G saved as a base (pti safetensors), an identity on it (fp16 deltas of 0.02 on every synthesis
    parameter), and the tuned generator the identity stands for."""
    base_path = tmp_path / "base.safetensors"
    save_generator(G, base_path)
    base = load_checkpoint(base_path).generator
    tuned = base.clone()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tuned.synthesis.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    pivot = distinct_ws(base, n=1)
    ident = Identity.from_tuning(base, tuned, pivot, generator_hash(base), str(base_path))
    path = ident.save(tmp_path / "person.pti")
    return path, base_path, open_identity(path).G


def test_cli_tuned_person_to_rosinality(G, tmp_path):
    """`pti export person.pti --format rosinality`: the file reads back, through pti's rosinality loader, as
    the tuned generator the identity gives, bit for bit (state dict and images); the output says how to
    load it."""
    person, _, tuned = _tuned_person(tmp_path, G)
    proc = run_pti("export", person, "--format", "rosinality", "-o", tmp_path / "person.pt")
    assert proc.returncode == 0, proc.stderr
    assert "Generator(size=16, style_dim=32, n_mlp=2, channel_multiplier=2)" in proc.stdout
    assert _differences(tuned, tmp_path / "person.pt") == []
    assert not torch.equal(tuned.synthesis.b8.conv0.weight, G.synthesis.b8.conv0.weight)  # tuned, not the base


def test_cli_refuses_with_one_line(tmp_path):
    """The built-in tiny generator (128 channels) cannot be rosinality's: exit 1, one line, no file."""
    proc = run_pti("export", "builtin:tiny", "--format", "rosinality", "-o", tmp_path / "tiny.pt")
    assert proc.returncode == 1 and no_traceback(proc)
    assert error_lines(proc.stderr) == [
        "error: rosinality's Generator(size, style_dim, n_mlp, channel_multiplier) cannot hold this generator: "
        "channels {4: 128, 8: 128, 16: 128, 32: 64, 64: 32}; rosinality's are 512 up to 32 px, then 256*cm at "
        "64 px, 128*cm at 128 px, ... for an integer channel_multiplier cm"
    ]
    assert files_under(tmp_path) == []


def test_cli_keeps_an_existing_file(tmp_path):
    (tmp_path / "taken.pt").write_bytes(b"mine")
    proc = run_pti("export", "builtin:tiny", "--format", "rosinality", "-o", tmp_path / "taken.pt")
    assert proc.returncode == 1 and len(error_lines(proc.stderr)) == 1 and "--force" in proc.stderr
    assert (tmp_path / "taken.pt").read_bytes() == b"mine"


# ---------------------------------------------------------------------------- rosinality's own model.py


@contextlib.contextmanager
def _without_cuda_build():
    """Within the block, `torch.utils.cpp_extension.load` (which rosinality's op/ calls at import to compile
    its CUDA kernels) returns a stand-in; only the CUDA paths would call it."""
    import torch.utils.cpp_extension as ext

    saved = ext.load
    ext.load = lambda name, *args, **kwargs: types.SimpleNamespace(name=name)
    try:
        yield
    finally:
        ext.load = saved


def import_rosinality(checkout: str):
    """rosinality's model.py from a checkout, as a module named rosinality_model (its `op` package is left in
    sys.modules under that name only while importing)."""
    names = ("op", "op.fused_act", "op.upfirdn2d", "op.conv2d_gradfix")
    saved = {n: sys.modules.pop(n, None) for n in names}
    sys.path.insert(0, checkout)
    try:
        with _without_cuda_build():
            spec = importlib.util.spec_from_file_location("rosinality_model", Path(checkout) / "model.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    finally:
        sys.path.remove(checkout)
        for n in names:
            sys.modules.pop(n, None)
            if saved[n] is not None:
                sys.modules[n] = saved[n]


@pytest.mark.skipif(
    not os.environ.get("PTI_ROSINALITY_PATH"),
    reason="set PTI_ROSINALITY_PATH to a rosinality/stylegan2-pytorch checkout",
)
@pytest.mark.parametrize(
    "size, channel_base",
    [pytest.param(16, 32768, id="16px"), pytest.param(64, 16384, id="64px-cm1", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("fused", [True, False])
def test_rosinalitys_generator_loads_and_renders_it(tmp_path, size, channel_base, fused):
    model = import_rosinality(os.environ["PTI_ROSINALITY_PATH"])
    G = small_generator(seed=7, config=config(size=size, channel_base=channel_base))
    _, info = write_rosinality(G, tmp_path / "r.pt")
    ckpt = torch.load(tmp_path / "r.pt")  # as rosinality's code loads it
    g = model.Generator(**info).eval()
    assert list(ckpt["g_ema"]) == list(g.state_dict())
    g.load_state_dict(ckpt["g_ema"], strict=True)
    for m in g.modules():
        if isinstance(m, model.ModulatedConv2d):
            m.fused = fused
    ws = distinct_ws(G)
    z = torch.randn(4, STYLE_DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = {
            "images from ws": g([ws], input_is_latent=True, randomize_noise=False)[0],
            "mapping": g.style(z),
            "images from z, truncation 0.7": g(
                [z], truncation=0.7, truncation_latent=ckpt["latent_avg"], randomize_noise=False
            )[0],
        }
        ours = {
            "images from ws": render(G, ws, fused),
            "mapping": G.mapping(z)[:, 0],
            "images from z, truncation 0.7": render(G, G.mapping(z, truncation_psi=0.7), fused),
        }
    fan_in, depth = fan_in_and_depth(G)
    for what, ref in ours.items():
        # Same function, other float order (the pti.engine.rosinality docstring): the fp32 reordering bound
        # at the values' scale, for the mapping alone (fan-in style_dim, n_mlp layers) or the whole network.
        scale = float(ref.abs().max())
        tol = (
            fp32_reorder_tolerance(scale, STYLE_DIM, N_MLP)
            if what == "mapping"
            else fp32_reorder_tolerance(scale, fan_in, depth)
        )
        diff = float((theirs[what] - ref).abs().max())
        print(f"{size} px, fused={fused}, {what}: max |rosinality - pti| {diff:.3g}, tol {tol:.3g}, scale {scale:.3g}")
        assert diff <= tol, what


@pytest.mark.skipif(
    not os.environ.get("PTI_ROSINALITY_PATH"),
    reason="set PTI_ROSINALITY_PATH to a rosinality/stylegan2-pytorch checkout",
)
@pytest.mark.parametrize("wrong", ["noise maps swapped between the 8 px convs", "up-conv weight flipped"])
def test_rosinalitys_generator_shows_a_wrong_checkpoint(G, wrong):
    """The bound above is tight enough: rosinality's own renders of a wrong checkpoint fall far outside it."""
    model = import_rosinality(os.environ["PTI_ROSINALITY_PATH"])
    _, info = check_rosinality(G)
    ckpt = rosinality_checkpoint(G)
    WRONG[wrong](ckpt["g_ema"])
    g = model.Generator(**info).eval()
    g.load_state_dict(ckpt["g_ema"], strict=True)
    ws = distinct_ws(G)
    with torch.no_grad():
        theirs = g([ws], input_is_latent=True, randomize_noise=False)[0]
    ours = render(G, ws)
    fan_in, depth = fan_in_and_depth(G)
    tol = fp32_reorder_tolerance(float(ours.abs().max()), fan_in, depth)
    diff = float((theirs - ours).abs().max())
    print(f"{wrong}: max |rosinality - pti| {diff:.3g}, tol {tol:.3g}")
    assert diff > 10 * tol
