"""Our .safetensors format, the content hash, the built-in generator and format sniffing errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from pti.engine.checkpoint import generator_hash, load_checkpoint, load_generator, save_generator, summarize
from pti.engine.generator import Generator
from pti.errors import CheckpointError

SMALL = dict(
    z_dim=32, c_dim=0, w_dim=32, img_resolution=16, img_channels=3,
    mapping_kwargs=dict(num_layers=2),
    synthesis_kwargs=dict(channel_base=256, channel_max=32, num_fp16_res=1, conv_clamp=256),
)


@pytest.fixture(scope="module")
def G() -> Generator:
    torch.manual_seed(0)
    G = Generator(**SMALL).eval()
    with torch.no_grad():
        for t in G.parameters():
            t.add_(torch.randn_like(t) * 0.1)
        G.mapping.w_avg.normal_()
    return G


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
    meta = json.loads(data[8:8 + n])["__metadata__"]
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


@pytest.mark.parametrize("name, content, message", [
    ("photo.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "is a PNG image, not a generator checkpoint"),
    ("notes.txt", b"hello, I am not a network\n", "is a text file, not a generator checkpoint"),
    ("empty.pkl", b"", "is empty"),
    ("noise.bin", bytes(range(200, 256)) * 2, "unrecognized binary file"),
    ("cut.safetensors", struct.pack("<Q", 10_000) + b'{"a":', "truncated safetensors"),
])
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
