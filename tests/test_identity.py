"""The identity file (`.pti`): renders from the file equal the in-memory tuned generator; refusals; size.

Tolerance of the default fp16-delta encoding: each stored delta (tuned - base) is rounded to fp16,
an error of at most 2^-11 of the delta (relative) or 2^-25 (absolute, near zero), and adding it back
to the fp32 base rounds once more (half an fp32 ulp of the weight). The weight test checks exactly
that bound. For renders we allow 2e-3 on [-1, 1] images: a quarter of one 8-bit level (2/255 = 7.8e-3),
so saved PNGs differ by at most one level at a rounding boundary; measured here it is 7e-5,
with deltas of realistic size (0.01-0.1, from tuning at 10x the paper's lr for 12 steps).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import tuned_tiny
from pti.engine.checkpoint import generator_hash, save_generator
from pti.engine.generator import Generator, tiny_generator
from pti.engine.identity import Identity
from pti.errors import IdentityError

RENDER_TOL = 2e-3  # on [-1, 1] images: a quarter of an 8-bit level (see the module docstring)


@pytest.fixture(scope="module")
def base():
    return tiny_generator()


@pytest.fixture(scope="module")
def base_hash(base) -> str:
    return generator_hash(base)


@pytest.fixture(scope="module")
def tuned(base):
    """A really tuned generator and its pivot (a random truncated w; the target is a blurred render of another)."""
    _, G_tuned, pivot = tuned_tiny()
    return G_tuned, pivot


def _render(G, pivot) -> torch.Tensor:
    with torch.no_grad():
        return G.synthesis(pivot, noise_mode="const", force_fp32=True)


@pytest.mark.parametrize("exact", [True, False])
def test_rendering_from_the_file_matches_the_tuned_generator(tmp_path, base, base_hash, tuned, exact) -> None:
    G_tuned, pivot = tuned
    path = Identity.from_tuning(base, G_tuned, pivot, base_hash, "builtin:tiny", exact=exact, meta={"steps": 12}).save(
        tmp_path / "me.pti"
    )
    ident = Identity.load(path)
    assert ident.exact is exact and ident.base_hash == base_hash and ident.base_hint == "builtin:tiny"
    assert ident.meta == {"steps": 12}
    assert torch.equal(ident.pivot, pivot[0])  # the pivot is stored exactly (fp32) in both encodings
    G_file = ident.apply(base)
    expected, got = _render(G_tuned, pivot), _render(G_file, ident.pivot[None])
    delta = {k: (p - b) for (k, p), b in zip(G_tuned.named_parameters(), base.parameters())}
    assert max(float(d.abs().max()) for d in delta.values()) > 0.01  # tuning moved the weights noticeably
    if exact:
        assert torch.equal(got, expected)
        for (k, a), b in zip(G_file.state_dict().items(), G_tuned.state_dict().values()):
            assert torch.equal(a, b), k
    else:
        for k, p in G_file.named_parameters():
            want = dict(G_tuned.named_parameters())[k]
            bound = delta[k].abs() * 2.0**-11 + 2.0**-25 + want.abs() * 2.0**-24
            assert ((p - want).abs() <= bound).all(), k
        assert (got - expected).abs().max() <= RENDER_TOL
        assert (got - _render(base, pivot)).abs().max() > 50 * RENDER_TOL  # and the identity is really in the file


def test_apply_does_not_touch_the_base(base, base_hash, tuned) -> None:
    before = {k: v.clone() for k, v in base.state_dict().items()}
    Identity.from_tuning(base, tuned[0], tuned[1], base_hash).apply(base)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert generator_hash(base) == base_hash


def test_a_different_base_generator_is_refused(tmp_path, base, base_hash, tuned) -> None:
    path = Identity.from_tuning(base, *tuned, base_hash, "builtin:tiny").save(tmp_path / "me.pti")
    other = base.clone()
    with torch.no_grad():
        other.synthesis.b4.conv1.weight[0, 0, 0, 0] += 1e-3  # one weight off
    ident = Identity.load(path)
    with pytest.raises(IdentityError, match="tuned on generator"):
        ident.apply(other)
    with pytest.raises(IdentityError, match="same --network"):
        ident.apply(
            Generator(
                z_dim=64,
                w_dim=64,
                img_resolution=64,
                mapping_kwargs=dict(num_layers=4),
                synthesis_kwargs=dict(channel_base=2048, channel_max=128),
            )
        )
    with pytest.raises(IdentityError):
        ident.apply(base, base_hash="0" * 64)
    ident.apply(base, base_hash=base_hash)  # the right base is accepted


def _bad_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "header only": data[: 8 + int.from_bytes(data[:8], "little")],
        "empty": b"",
        "flipped header": data[:8] + bytes(b ^ 0xFF for b in data[8:40]) + data[40:],
        "huge header length": (2**40).to_bytes(8, "little") + data[8:],
        "png": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
        "text": b"hello, I am not an identity\n",
    }
    out = {}
    for name, content in files.items():
        p = tmp_path / (name.replace(" ", "_") + ".pti")
        p.write_bytes(content)
        out[name] = p
    return out


def test_broken_files_raise_identity_error(tmp_path, base, base_hash, tuned) -> None:
    good = Identity.from_tuning(base, *tuned, base_hash).save(tmp_path / "good.pti")
    for name, path in _bad_files(tmp_path, good).items():
        with pytest.raises(IdentityError, match=str(path.name)):
            Identity.load(path)
    with pytest.raises(IdentityError, match="no such identity file"):
        Identity.load(tmp_path / "missing.pti")


def test_other_safetensors_files_are_not_identities(tmp_path, base) -> None:
    gen_file = tmp_path / "generator.safetensors"
    save_generator(base, gen_file)  # a valid safetensors file, but a generator
    with pytest.raises(IdentityError, match="not a pti identity file"):
        Identity.load(gen_file)


def test_newer_format_versions_are_refused(tmp_path, base, base_hash, tuned) -> None:
    from safetensors.torch import load_file, save_file

    good = Identity.from_tuning(base, *tuned, base_hash).save(tmp_path / "good.pti")
    future = tmp_path / "future.pti"
    save_file(load_file(good), future, metadata={"format": "pti-identity", "version": "99"})
    with pytest.raises(IdentityError, match="newer than this pti"):
        Identity.load(future)
    no_pivot = tmp_path / "nopivot.pti"
    tensors = {k: v for k, v in load_file(good).items() if k != "pivot"}
    save_file(tensors, no_pivot, metadata={"format": "pti-identity", "version": "1"})
    with pytest.raises(IdentityError, match="no pivot"):
        Identity.load(no_pivot)


def test_how_it_was_tuned_is_recorded_under_the_checksum_and_old_files_still_load(
    tmp_path, base, base_hash, tuned
) -> None:
    """The metadata's `impl` record (what the tuning ran) reads back as `tuned_with`; a file from before pti
    recorded it (v2 without it, or v1 without a checksum) still loads, as tuned with the reference ops (the only
    path `pti tune` ran then) at its precision, its flags unknown; and the record cannot be altered unnoticed."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from pti.engine.identity import describe

    flags = {"tf32_matmul": True, "tf32_cudnn": True}
    record = {"requested": "auto", "impl": "compile", "ops": {}, "precision": "tf32", "flags": flags}
    new = Identity.from_tuning(base, *tuned, base_hash, meta={"precision": "tf32", "impl": {"tune": record}})
    path = new.save(tmp_path / "new.pti")
    want = {"impl": "compile", "precision": "tf32", "flags": flags, "recorded": True}
    assert Identity.load(path).tuned_with == want and describe(path)["tuned_with"] == want
    assert describe(path)["impl"] == {"tune": record}

    old = Identity.from_tuning(base, *tuned, base_hash, meta={"precision": "bf16"}).save(tmp_path / "old.pti")
    was = {"impl": "ref", "precision": "bf16", "flags": None, "recorded": False}
    assert Identity.load(old).tuned_with == was and describe(old)["tuned_with"] == was
    with safe_open(str(old), framework="pt") as f:
        header = dict(f.metadata())
    v1 = tmp_path / "v1.pti"
    save_file(load_file(old), v1, metadata={**{k: v for k, v in header.items() if k != "checksum"}, "version": "1"})
    loaded = Identity.load(v1)
    assert loaded.checksum is None and loaded.notes and loaded.tuned_with == was
    assert loaded.apply(base, base_hash) is not None

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    meta = json.loads(header["meta"])
    meta["impl"]["tune"]["impl"] = "ref"  # the record rewritten, the checksum kept
    forged = tmp_path / "forged.pti"
    save_file(load_file(path), forged, metadata={**header, "meta": json.dumps(meta)})
    with pytest.raises(IdentityError, match="checksum mismatch"):
        Identity.load(forged)


def test_save_is_atomic(tmp_path, base, base_hash, tuned, monkeypatch) -> None:
    ident = Identity.from_tuning(base, *tuned, base_hash)
    target = tmp_path / "me.pti"
    ident.save(target)
    assert sorted(os.listdir(tmp_path)) == ["me.pti"]  # no temp file left beside it
    original = target.read_bytes()

    import safetensors.torch

    def dying_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # half a file on disk, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        ident.save(target)
    assert sorted(os.listdir(tmp_path)) == ["me.pti"]
    assert target.read_bytes() == original  # the old file is intact
    with pytest.raises(KeyboardInterrupt):
        ident.save(tmp_path / "new.pti")
    assert sorted(os.listdir(tmp_path)) == ["me.pti"]  # nothing partial appeared


def test_1024px_config_f_identity_is_about_56_mb(tmp_path) -> None:
    """fp16 deltas of the 28.27 M synthesis parameters of FFHQ config-f: 2 bytes each (vs 127 MB for a torch.save).

    `nbytes` is checked against the file written to disk: its size less the safetensors header
    (8 length bytes, then the JSON header of that length) is the tensor data.
    """
    G = Generator(
        z_dim=512,
        w_dim=512,
        img_resolution=1024,
        img_channels=3,
        mapping_kwargs=dict(num_layers=8),
        synthesis_kwargs=dict(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256),
    )
    assert sum(p.numel() for p in G.synthesis.parameters()) == pytest.approx(28.27e6, rel=1e-3)  # the published count
    ident = Identity.from_tuning(G, G, torch.zeros(1, G.num_ws, G.w_dim), "hash")
    del G
    path = ident.save(tmp_path / "config-f.pti")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    data_bytes = path.stat().st_size - 8 - header_len
    assert ident.nbytes == data_bytes
    assert data_bytes / 1e6 == pytest.approx(56.5, abs=0.3)
    del ident
    loaded = Identity.load(path)
    assert all(t.dtype == torch.float16 for t in loaded.tensors.values()) and loaded.pivot.dtype == torch.float32
    exact = sum(t.numel() for t in loaded.tensors.values()) * 4  # the exact=True encoding would be twice that
    assert exact / 1e6 == pytest.approx(113.1, abs=0.3)


@pytest.mark.parametrize(
    "tamper,match",
    [
        (lambda t: {**t, "evil.synthesis.b4.const": next(iter(t.values()))}, "does not fit"),
        (lambda t: {k: (v[:1] if i == 0 else v) for i, (k, v) in enumerate(t.items())}, "shape"),
        (lambda t: dict(list(t.items())[1:]), "lacks"),
    ],
)
def test_tampered_identity_tensors_are_refused(base, base_hash, tuned, tamper, match) -> None:
    G, pivot = tuned
    ident = Identity.from_tuning(base, G, pivot, base_hash)
    ident.tensors = tamper(ident.tensors)
    with pytest.raises(IdentityError, match=match):
        ident.apply(base, base_hash)
