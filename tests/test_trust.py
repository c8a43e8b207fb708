"""A wrong result never exits 0, and hostile or damaged files are refused in one line (issue 16, §3 and §4).

Everything runs through the installed console script: a `.pti` with a flipped byte, non-finite edit values
and direction files, renders whose pixels are not finite, a full disk during `pti tune`, a truncated export,
hostile pickles as direction files and as --network, `pti directions ganspace` with its own defaults, and
`pti info` on the direction files pti writes.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from clirun import error_lines, files_under, no_traceback, run_pti, temp_files_under
from helpers import tuned_tiny
from pti.engine import edits as E
from pti.engine.checkpoint import generator_hash
from pti.engine.identity import FORMAT, Identity

META = {"photo": "face.png", "steps": {"invert": 5, "tune": 12}}


@pytest.fixture(scope="module")
def person(tmp_path_factory):
    """An identity file of the really tuned tiny generator, its tensors and metadata, and a GANSpace file."""
    base, G_tuned, pivot = tuned_tiny()
    tmp = tmp_path_factory.mktemp("trust")
    ident = Identity.from_tuning(base, G_tuned, pivot, generator_hash(base), "builtin:tiny", meta=META)
    path = ident.save(tmp / "me.pti")
    dirs = E.save_ganspace(E.ganspace(base, components=4, samples=2000, seed=0), tmp / "dirs.pt")
    return dict(path=path, ident=ident, dirs=dirs, tmp=tmp)


def _one_line(res, code: int, *needles: str) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and no_traceback(res), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "bug in pti" not in lines[0]
    return lines[0]


def _header(data: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


class _Reduce:
    """Pickles as a call of `fn(*args)`: what a hostile file does to run code when it is unpickled."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


# ------------------------------------------------------------------------------------ identity checksum


def test_a_flipped_byte_in_a_tensor_is_refused_by_render_and_info(person, tmp_path):
    data = bytearray(person["path"].read_bytes())
    n, header = _header(bytes(data))
    key = next(k for k in header if k.startswith("delta."))
    start, end = header[key]["data_offsets"]
    data[8 + n + (start + end) // 2] ^= 0x01  # one bit of one weight's delta
    damaged = tmp_path / "damaged.pti"
    damaged.write_bytes(bytes(data))
    for args in (["render", damaged, "-o", tmp_path / "out", "--device", "cpu"], ["info", damaged]):
        _one_line(run_pti(*args), 1, "damaged.pti", "checksum mismatch", "pti tune")
    assert not (tmp_path / "out").exists()
    intact = run_pti("info", person["path"])
    assert intact.returncode == 0 and "sha256 verified" in intact.stdout, intact.stderr


def test_a_changed_byte_in_the_metadata_is_refused(person, tmp_path):
    data = person["path"].read_bytes()
    assert data.count(b"face.png") == 1
    damaged = tmp_path / "edited.pti"
    damaged.write_bytes(data.replace(b"face.png", b"fake.png"))  # same length: the header stays valid JSON
    for args in (["render", damaged, "-o", tmp_path / "out", "--device", "cpu"], ["info", damaged]):
        _one_line(run_pti(*args), 1, "edited.pti", "checksum mismatch")


def test_an_identity_written_before_checksums_still_renders_with_a_note(person, tmp_path):
    from safetensors.torch import save_file

    ident = person["ident"]
    old = tmp_path / "old.pti"
    save_file(
        {"pivot": ident.pivot, **ident.tensors},
        str(old),
        metadata={  # the v1 layout, as pti wrote it
            "format": FORMAT,
            "version": "1",
            "base_hash": ident.base_hash,
            "base_hint": ident.base_hint,
            "encoding": "delta-fp16",
            "meta": json.dumps(META),
        },
    )
    res = run_pti("render", old, "-o", tmp_path / "out", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "old.pti has no checksum" in " ".join(res.stdout.split())
    assert (tmp_path / "out" / "reconstruction.png").is_file()
    info = run_pti("info", old)
    assert info.returncode == 0 and "no checksum" in info.stdout, info.stderr


# ------------------------------------------------------------------------------------ non-finite values


@pytest.mark.parametrize("value", ["1e309", "-1e309", "-1e308:1e308:3"])
def test_non_finite_edit_values_are_usage_errors(person, tmp_path, value):
    res = run_pti(
        "render", person["path"], "--edit", f"{person['dirs']}:0={value}", "-o", tmp_path / "out", "--device", "cpu"
    )
    assert res.returncode == 2 and no_traceback(res), res.stderr
    assert "finite" in " ".join(res.stderr.split())
    assert not (tmp_path / "out").exists()


def test_direction_files_holding_nan_or_inf_are_refused(person, tmp_path):
    np.save(tmp_path / "nan.npy", np.full((1, 64), np.nan, dtype=np.float32))
    pca = torch.load(person["dirs"], weights_only=True)
    torch.save({**pca, "std": torch.full_like(pca["std"], float("inf"))}, tmp_path / "inf.pt")
    for edit in (f"{tmp_path / 'nan.npy'}=1", f"{tmp_path / 'inf.pt'}:0=1"):
        res = run_pti("render", person["path"], "--edit", edit, "-o", tmp_path / "out", "--device", "cpu")
        _one_line(res, 1, "not finite")
        assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == []


def test_a_render_whose_pixels_are_not_finite_writes_nothing(person, tmp_path):
    # Finite numbers everywhere in the file, but an sd of 3e38 overflows the generator's float32 arithmetic.
    pca = torch.load(person["dirs"], weights_only=True)
    torch.save({**pca, "std": torch.full_like(pca["std"], 3e38)}, tmp_path / "huge.pt")
    out = tmp_path / "out"
    res = run_pti("render", person["path"], "--edit", f"{tmp_path / 'huge.pt'}:0=1", "-o", out, "--device", "cpu")
    _one_line(res, 1, "huge.pt_0+1", "not finite")
    assert not out.exists() or files_under(out) == []


def test_lpips_threshold_must_be_a_finite_number(tmp_path):
    for value in ("inf", "nan"):
        res = run_pti("tune", tmp_path / "x.png", "--lpips-threshold", value, "-o", tmp_path / "out")
        assert res.returncode == 2 and no_traceback(res), res.stderr
        assert "lpips-threshold" in res.stderr and "bug in pti" not in res.stderr
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ a full disk


def _file_size_limit(limit: int):
    def preexec():  # in the child: writes past `limit` fail with EFBIG instead of killing it with SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_a_write_that_fails_during_tune_is_one_line(tmp_path):
    photo = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "out"
    # The PNGs of a 64 px run are about 10 kB; the identity file about 2 MB: 1 MB lets the first through.
    res = run_pti(
        "tune",
        photo,
        "--no-align",
        "-o",
        out,
        "--device",
        "cpu",
        "--invert-steps",
        "1",
        "--tune-steps",
        "1",
        preexec_fn=_file_size_limit(1 << 20),
    )
    _one_line(res, 1, str(out / "x.pti"), "larger than this system allows")
    assert not (out / "x.pti").exists() and temp_files_under(out) == []


def test_identity_save_maps_a_failed_write_to_an_output_error(person, tmp_path):
    script = (
        "import sys; from pti.engine.identity import Identity; from pti.errors import OutputError\n"
        "try:\n    Identity.load(sys.argv[1]).save(sys.argv[2])\n"
        "except OutputError as e:\n    print('OutputError:', e); sys.exit(3)\n"
    )
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", script, str(person["path"]), str(tmp_path / "copy.pti")],
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(1 << 16),
    )
    assert proc.returncode == 3, proc.stderr
    assert "larger than this system allows" in proc.stdout and files_under(tmp_path) == []


# ------------------------------------------------------------------------------------ hostile pickles


def test_a_hostile_pickle_as_a_direction_file_is_refused_in_one_line(person, tmp_path):
    sentinel = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"mean": _Reduce(os.system, (f"touch {sentinel}",))}, evil)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Reduce(os.system, (f"touch {sentinel}",)), protocol=2))
    for path in (evil, raw):
        res = run_pti("render", person["path"], "--edit", f"{path}:0=1", "-o", tmp_path / "out", "--device", "cpu")
        line = _one_line(res, 1, f"{path}: refused", "never runs", "not a direction file")
        assert "system" in line  # what it would have called
        assert "weights_only" not in res.stderr + res.stdout and "site-packages" not in res.stderr + res.stdout
    assert not sentinel.exists()


@pytest.mark.parametrize("name", ["evil.pkl", "evil.pt"])
def test_a_hostile_torch_file_as_network_is_refused_in_one_whole_line(person, tmp_path, name):
    sentinel = tmp_path / "ran"
    evil = tmp_path / name
    torch.save({"g_ema": _Reduce(os.system, (f"touch {sentinel}",))}, evil)  # a torch zip, whatever its name
    res = run_pti("render", person["path"], "--network", evil, "-o", tmp_path / "out", "--device", "cpu")
    line = _one_line(res, 1, f"{evil}: refused", "system", "never runs")
    assert line.endswith("which pti never runs"), line  # whole, not cut mid-word
    assert "weights_only" not in line and "site-packages" not in res.stderr
    assert not sentinel.exists()


# ------------------------------------------------------------------------------------ pti directions, pti info


def test_directions_ganspace_works_with_its_own_defaults(tmp_path):
    out = tmp_path / "d.pt"
    res = run_pti("directions", "ganspace", "--out", out, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "64 components" in res.stdout and "w_dim" in res.stdout
    assert E.load_direction_file(out, 63).kind == "ganspace"


def test_directions_ganspace_n_is_the_network_as_everywhere(tmp_path):
    out = tmp_path / "d.pt"
    res = run_pti(
        "directions", "ganspace", "-n", "builtin:tiny", "-k", "4", "--samples", "1000", "--out", out, "--device", "cpu"
    )
    assert res.returncode == 0, res.stderr
    assert torch.load(out, weights_only=True)["comp"].shape == (4, 1, 64)
    res = run_pti("directions", "ganspace", "--components", "65", "--out", tmp_path / "e.pt", "--device", "cpu")
    assert res.returncode == 2 and "w_dim is 64" in " ".join(res.stderr.split()) and no_traceback(res)


def test_info_describes_the_direction_files_pti_reads(person, tmp_path):
    res = run_pti("info", person["dirs"])
    assert res.returncode == 0, res.stderr
    assert "GANSpace" in res.stdout and "4 components" in res.stdout and "w_dim 64" in res.stdout
    np.save(tmp_path / "age.npy", np.ones((10, 64), dtype=np.float32))
    record = json.loads(run_pti("info", tmp_path / "age.npy", "--json").stdout)
    assert record["kind"] == "direction" and record["type"] == "interfacegan"
    assert record["shape"] == [10, 64] and record["layers"] == 10 and record["w_dim"] == 64
    np.save(tmp_path / "nan.npy", np.full((1, 64), np.nan, dtype=np.float32))
    _one_line(run_pti("info", tmp_path / "nan.npy"), 1, "not finite")


# ------------------------------------------------------------------------------------ exports


@pytest.mark.slow
def test_info_checks_the_files_an_export_contract_describes(person, tmp_path):
    pytest.importorskip("onnx", reason="pip install 'pti[export]'")
    pytest.importorskip("onnxruntime", reason="pip install 'pti[export]'")
    folder = tmp_path / "x"
    res = run_pti("export", person["path"], "--format", "onnx", "-o", folder, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    contract = json.loads((folder / "contract.json").read_text())
    model = folder / "model.onnx"
    assert contract["checksums"]["model.onnx"]["bytes"] == model.stat().st_size
    for target in (folder, model):
        ok = run_pti("info", target)
        assert ok.returncode == 0 and "sizes and sha256 match" in ok.stdout, ok.stderr
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    for target in (folder, model, folder / "contract.json"):
        _one_line(run_pti("info", target), 1, "model.onnx", "contract")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(flipped))
    _one_line(run_pti("info", folder), 1, "model.onnx", "sha256")
    model.write_bytes(data)
    del contract["checksums"]  # a contract from before checksums
    (folder / "contract.json").write_text(json.dumps(contract))
    old = run_pti("info", folder)
    assert old.returncode == 0 and "not checked" in old.stdout, old.stderr
