"""Our .safetensors format, the content hash, the built-in generator, format sniffing errors, and the
device argument (CUDA renders what the CPU renders, forward and backward: a `gpu` test)."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
import torch

from helpers import fan_in_and_depth, fp32_reorder_tolerance, small_generator
from pti.engine.checkpoint import generator_hash, load_checkpoint, load_generator, save_generator, summarize
from pti.engine.generator import Generator, tiny_generator
from pti.errors import CheckpointError


@pytest.fixture(scope="module")
def G() -> Generator:
    return small_generator()


def test_round_trip_is_bit_exact(tmp_path, G):
    digest = save_generator(G, tmp_path / "g.safetensors")
    loaded = load_checkpoint(tmp_path / "g.safetensors")
    assert loaded.format == "pti-safetensors"
    G2 = loaded.generator
    assert G2.init_kwargs == G.init_kwargs
    sd, sd2 = G.state_dict(), G2.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    assert generator_hash(G2) == digest == generator_hash(G)
    z = torch.randn(2, 32)
    with torch.no_grad():
        assert torch.equal(G2(z, None, noise_mode="const"), G(z, None, noise_mode="const"))
    assert not G2.training and not any(p.requires_grad for p in G2.parameters())


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, G):
    out = tmp_path / "sub" / "g.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"old")
    save_generator(G, out)
    assert [p.name for p in out.parent.iterdir()] == ["g.safetensors"]
    assert load_generator(out).img_resolution == 16


def test_one_file_holds_config_and_hash(tmp_path, G):
    save_generator(G, tmp_path / "g.safetensors")
    data = (tmp_path / "g.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    assert meta["format"] == "pti.generator" and meta["format_version"] == "1"
    assert json.loads(meta["config"]) == G.init_kwargs
    assert meta["content_hash"] == generator_hash(G)


def test_hash_changes_with_any_weight_or_config(G):
    base = generator_hash(G)
    G2 = G.clone()
    with torch.no_grad():
        G2.synthesis.b8.conv0.bias[0] += 1e-6
    assert generator_hash(G2) != base
    G3 = G.clone()
    G3.init_kwargs = {**G3.init_kwargs, "z_dim": 33}
    assert generator_hash(G3) != base
    assert generator_hash(G.clone()) == base


def test_modified_file_fails_the_hash_check(tmp_path, G):
    save_generator(G, tmp_path / "g.safetensors")
    data = bytearray((tmp_path / "g.safetensors").read_bytes())
    data[-3] ^= 0xFF  # flip bits in the last tensor's bytes
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_generator(tmp_path / "bad.safetensors")


def test_foreign_safetensors_is_explained(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="without a pti generator config.*pti convert"):
        load_generator(tmp_path / "other.safetensors")


def test_builtin_tiny_generator():
    for name in (None, "builtin:tiny"):
        loaded = load_checkpoint(name)
        assert loaded.format == "builtin" and "not a trained model" in loaded.label
    assert generator_hash(load_generator()) == generator_hash(load_generator("builtin:tiny"))


def test_summary(G):
    s = summarize(G)
    assert (s.resolution, s.num_ws, s.conv_clamp, s.fp16_resolutions) == (16, 6, 256, [16])
    assert s.params_total == s.params_mapping + s.params_synthesis == sum(p.numel() for p in G.parameters())
    assert s.content_hash == generator_hash(G)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("photo.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "is a PNG image, not a generator checkpoint"),
        ("notes.txt", b"hello, I am not a network\n", "is a text file, not a generator checkpoint"),
        ("empty.pkl", b"", "is empty"),
        ("noise.bin", bytes(range(200, 256)) * 2, "unrecognized binary file"),
        ("cut.safetensors", struct.pack("<Q", 10_000) + b'{"a":', "truncated safetensors"),
    ],
)
def test_not_a_checkpoint(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as e:
        load_generator(tmp_path / name)
    assert name in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pkl: no such file"):
        load_generator(tmp_path / "nope.pkl")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_generator(tmp_path)


def test_truncated_safetensors(tmp_path, G):
    save_generator(G, tmp_path / "g.safetensors")
    data = (tmp_path / "g.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="cut.safetensors is a corrupt or truncated safetensors file"):
        load_generator(tmp_path / "cut.safetensors")


# ---------------------------------------------------------------------------- the device argument
#
# `load_generator(path, device)` on CUDA must render what it renders on the CPU, forward and backward
# (tuning backpropagates through everything), up to float32 summation order. The tolerance is
# `helpers.fp32_reorder_tolerance`; the CPU test below shows it admits a real reordering (fused vs
# shared-weight modulated conv) and rejects TF32 arithmetic, which CUDA convolutions use by default.


def _render_and_grad(G, device: str = "cpu", fused_modconv: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The image at two fixed z's (psi 0.7, noise 'const', fp32) and the gradient of <image, probe>
    with respect to the w's and every synthesis parameter, flattened into one vector."""
    G = G.clone().to(device).requires_grad_(False)
    G.synthesis.requires_grad_(True)
    z = torch.randn([2, G.z_dim], generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ws = G.mapping(z, truncation_psi=0.7)
    ws.requires_grad_(True)
    img = G.synthesis(ws, noise_mode="const", force_fp32=True, fused_modconv=fused_modconv)
    probe = torch.randn(img.shape, generator=torch.Generator().manual_seed(2)).to(device)
    (img * probe).sum().backward()
    grad = torch.cat([ws.grad.flatten()] + [p.grad.flatten() for p in G.synthesis.parameters()])
    return img.detach().cpu(), grad.cpu()


def _tolerances(G, img: torch.Tensor, grad: torch.Tensor) -> tuple[float, float]:
    """(largest image difference, gradient difference in norm) two float32 summation orders may give.

    The image: `depth` layers of `fan_in` terms at the image's scale. The gradient, compared in norm
    (single entries can be sums that cancel): the backward pass runs through the forward's layers and
    back (twice the depth), and weight gradients also sum over every output position (N * R * R terms).
    """
    fan_in, depth = fan_in_and_depth(G)
    positions = img.shape[0] * img.shape[2] * img.shape[3]
    return (
        fp32_reorder_tolerance(float(img.abs().max()), fan_in, depth),
        fp32_reorder_tolerance(float(grad.norm()), max(fan_in, positions), 2 * depth),
    )


def _tf32(G):
    """G with every conv weight rounded to TF32's 10-bit mantissa, as TF32 convolutions read them."""
    G = G.clone()
    with torch.no_grad():
        for p in G.synthesis.parameters():
            if p.ndim == 4:
                p.copy_((p.view(torch.int32) & ~0x1FFF).view(torch.float32))
    return G


def test_the_fp32_tolerance_admits_reordering_and_catches_tf32() -> None:
    G = tiny_generator()
    img, grad = _render_and_grad(G, fused_modconv=True)
    img_tol, grad_tol = _tolerances(G, img, grad)
    reordered, tf32 = _render_and_grad(G, fused_modconv=False), _render_and_grad(_tf32(G), fused_modconv=True)
    assert (reordered[0] - img).abs().max() <= img_tol and (reordered[1] - grad).norm() <= grad_tol
    assert (tf32[0] - img).abs().max() > 3 * img_tol and (tf32[1] - grad).norm() > 3 * grad_tol


@contextlib.contextmanager
def _no_tf32():
    """Float32 means float32: CUDA convolutions (and, on some versions, matmuls) default to TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
def test_generator_on_cuda_renders_what_it_renders_on_cpu(tmp_path) -> None:
    save_generator(tiny_generator(), tmp_path / "tiny.safetensors")
    G_cpu = load_generator(tmp_path / "tiny.safetensors")
    G_cuda = load_generator(tmp_path / "tiny.safetensors", device="cuda")
    assert all(t.device.type == "cuda" for t in list(G_cuda.parameters()) + list(G_cuda.buffers()))
    assert generator_hash(G_cuda) == generator_hash(G_cpu)
    img, grad = _render_and_grad(G_cpu, "cpu")
    with _no_tf32():
        img_cuda, grad_cuda = _render_and_grad(G_cuda, "cuda")
    img_tol, grad_tol = _tolerances(G_cpu, img, grad)
    assert float((img_cuda - img).abs().max()) <= img_tol
    assert float((grad_cuda - grad).norm()) <= grad_tol
