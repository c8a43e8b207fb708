"""Where the pivot starts, through the console script: `pti tune --init projector|e4e|restyle|FILE`.

- `--init FILE` in each pivot format other tools write: used as given (0 projector steps) the identity's pivot
  is the file's, bit for bit; `--invert-steps N` refines it (it moves, the loss curve has N entries).
- `--init e4e --encoder CKPT`: a checkpoint in encoder4editing's own layout (a `torch.save`d plain dict of
  `encoder.*` / `decoder.*` tensors, `latent_avg`, `opts`) with random weights, on a base generator with e4e's
  w_dim 512; the identity's pivot is the encoder's codes; a misfit encoder is refused in one line.
- The manifest's settings fingerprint holds the start, so another start is another setting; a folder run with
  two workers loads the encoder once per worker (each report records which load made its pivot); offline,
  the registry's default encoder names the `pti weights import` command.

Random weights: the encoder's big tensors share one random storage per shape (`torch.save` writes a storage
once), so a 90 M-parameter IR-SE50 checkpoint is a few MB on disk.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clirun import error_lines, no_traceback, run_pti
from helpers import fp32_reorder_tolerance
from pti.engine.checkpoint import save_generator
from pti.engine.generator import Generator, tiny_generator
from pti.engine.identity import Identity
from pti.fsutil import sha256_file

FAST = ("--no-align", "--tune-steps", "1", "--no-locality", "--seed", "0")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PTI_HOME", str(tmp_path / "pti-home"))  # never read the user's cache


def _photo(path: Path, size: int, seed: int = 0) -> Path:
    rng = np.random.RandomState(seed)
    Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8)).save(path)
    return path


def _pivot_of(identity: Path) -> torch.Tensor:
    pivot = Identity.load(identity).pivot
    return pivot.reshape(-1, pivot.shape[-1])


def _report(out: Path, name: str) -> dict:
    return json.loads((out / name / "report.json").read_text())


# ---------------------------------------------------------------------------- --init FILE


def _write_pivot(path: Path, w: torch.Tensor, fmt: str) -> Path:
    """`w` [num_ws, w_dim] saved the way each tool saves its pivot."""
    if fmt == "npz [1, num_ws, w_dim]":  # NVIDIA's projector: np.savez(projected_w.npz, w=...)
        np.savez(path, w=w[None].numpy())
    elif fmt == "npy [num_ws, w_dim]":
        np.save(path, w.numpy())
    elif fmt == "pt [1, num_ws, w_dim]":  # the authors' PTI: torch.save of the pivot tensor (0.pt)
        torch.save(w[None].clone(), path)
    elif fmt == "pt [1, w_dim]":  # one w for every layer
        torch.save(w[:1].clone(), path)
    return path


FORMATS = {
    "npz [1, num_ws, w_dim]": "w.npz",
    "npy [num_ws, w_dim]": "w.npy",
    "pt [1, num_ws, w_dim]": "w.pt",
    "pt [1, w_dim]": "w1.pt",
}


@pytest.fixture(scope="module")
def tiny_w() -> torch.Tensor:
    """A W+ pivot for the built-in tiny generator whose layers all differ, [num_ws, w_dim]."""
    G = tiny_generator()
    with torch.no_grad():
        return G.mapping(torch.randn(G.num_ws, G.z_dim, generator=torch.Generator().manual_seed(4)))[:, 0].clone()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_pivot_file_is_used_as_given_bit_for_bit(tmp_path, tiny_w, fmt) -> None:
    pivot_file = _write_pivot(tmp_path / FORMATS[fmt], tiny_w, fmt)
    photo = _photo(tmp_path / "face.png", 64)
    out = tmp_path / "out"
    p = run_pti("tune", photo, "--init", pivot_file, *FAST, "-o", out)
    assert p.returncode == 0, p.stderr
    assert f"pivot from {pivot_file}" in p.stdout
    expected = tiny_w[:1].expand_as(tiny_w) if fmt == "pt [1, w_dim]" else tiny_w
    assert torch.equal(_pivot_of(out / "face.pti"), expected)  # bit for bit: no projector step ran
    rep = _report(out, "face")
    init = rep["init"]
    assert init["init"] == "file" and init["path"] == str(pivot_file.resolve())
    assert init["sha256"] == sha256_file(pivot_file) and init["refine_steps"] == 0
    assert rep["steps"]["invert"] == 0 and rep["curves"]["invert_loss"] == []
    assert init["start_metrics"] == rep["before_tuning"]  # nothing refined: the start is what tuning got
    assert set(rep["before_tuning"]) >= {"mse"}
    info = run_pti("info", out / "face.pti")
    assert info.returncode == 0 and f"pivot file ({pivot_file.name}" in info.stdout
    assert "+ 0 projector steps" in info.stdout


def test_a_pivot_file_refined_by_n_projector_steps_moves(tmp_path, tiny_w) -> None:
    pivot_file = _write_pivot(tmp_path / "w.npz", tiny_w, "npz [1, num_ws, w_dim]")
    photo = _photo(tmp_path / "face.png", 64)
    out = tmp_path / "out"
    p = run_pti("tune", photo, "--init", pivot_file, "--invert-steps", "3", *FAST, "-o", out)
    assert p.returncode == 0, p.stderr
    pivot = _pivot_of(out / "face.pti")
    rep = _report(out, "face")
    assert rep["steps"]["invert"] == 3 and len(rep["curves"]["invert_loss"]) == 3
    assert rep["init"]["refine_steps"] == 3
    moved = (pivot - tiny_w).abs()
    assert moved.max() > 0 and bool((moved.amax(dim=1) > 0).all())  # W+: every layer was optimized
    # the refine starts at the file's pivot: 3 Adam steps at the ramp-up's small lr stay near it
    assert float(moved.max()) < 0.1 * float(tiny_w.abs().max())
    assert rep["init"]["start_metrics"]["mse"] != rep["before_tuning"]["mse"]


def test_a_w_start_is_refined_in_w_and_steps_0_needs_a_start(tiny_w) -> None:
    """The refine in the engine: a start whose layers are one w (NVIDIA's projected_w) stays one w, a W+ start is
    refined per layer, and 0 steps without a start is refused (there would be no pivot)."""
    from pti.engine.invert import InvertConfig, invert
    from pti.engine.losses import WeightFreeProjectorMetric

    G = tiny_generator()
    with torch.no_grad():
        target = G.synthesis(tiny_w[None], noise_mode="const", force_fp32=True)
    one_w = tiny_w[:1].expand_as(tiny_w)[None]
    res = invert(G, target, WeightFreeProjectorMetric(), InvertConfig(steps=3), start=one_w)
    assert len(res.losses) == 3 and not torch.equal(res.pivot, one_w)
    assert torch.equal(res.pivot, res.pivot[:, :1].expand_as(res.pivot))  # still one w for every layer
    plus = invert(G, target, WeightFreeProjectorMetric(), InvertConfig(steps=3), start=tiny_w[None] * 0.5)
    assert not torch.equal(plus.pivot[:, 0], plus.pivot[:, 1])
    with pytest.raises(ValueError, match="steps must be >= 1 without a start"):
        invert(G, target, WeightFreeProjectorMetric(), InvertConfig(steps=0))


def test_pivot_file_errors_are_one_line(tmp_path, tiny_w) -> None:
    photo = _photo(tmp_path / "face.png", 64)
    other = _photo(tmp_path / "other.png", 64, seed=1)
    missing = run_pti("tune", photo, "--init", tmp_path / "nope.npz", *FAST, "-o", tmp_path / "o1")
    assert missing.returncode == 1 and no_traceback(missing)
    assert error_lines(missing.stderr) == [f"error: {tmp_path / 'nope.npz'}: no such pivot file"]
    wrong = _write_pivot(tmp_path / "w.npy", torch.zeros(3, 64), "npy [num_ws, w_dim]")
    p = run_pti("tune", photo, "--init", wrong, *FAST, "-o", tmp_path / "o2")
    assert p.returncode == 1 and len(error_lines(p.stderr)) == 1 and "shape [3, 64]" in p.stderr
    assert not (tmp_path / "o2").exists()  # refused before any work
    good = _write_pivot(tmp_path / "w.npz", tiny_w, "npz [1, num_ws, w_dim]")
    many = run_pti("tune", photo, other, "--init", good, *FAST, "-o", tmp_path / "o3")
    assert many.returncode == 1 and len(error_lines(many.stderr)) == 1 and "2 photos" in many.stderr
    zero = run_pti("tune", photo, "--invert-steps", "0", *FAST, "-o", tmp_path / "o4")
    assert zero.returncode == 2 and no_traceback(zero) and "--invert-steps" in zero.stderr


# ---------------------------------------------------------------------------- e4e


def _base(path: Path, resolution: int) -> Path:
    """A small generator with e4e's w_dim 512 (num_ws = 2 log2(resolution) - 2), saved as pti's safetensors."""
    torch.manual_seed(0)
    G = Generator(
        z_dim=32,
        w_dim=512,
        img_resolution=resolution,
        img_channels=3,
        mapping_kwargs=dict(num_layers=2),
        synthesis_kwargs=dict(channel_base=256, channel_max=16, num_fp16_res=0),
    ).eval()
    save_generator(G, path)
    return path


def _e4e_checkpoint(path: Path, stylegan_size: int, seed: int = 0, kind: str = "e4e") -> Path:
    """An e4e checkpoint laid out as encoder4editing's training coach saves it: {"state_dict": net.state_dict()
    (encoder.* and decoder.*), "opts": vars(opts), "latent_avg"}. Random weights, one random tensor per shape and
    role: the IR-SE50 body's convs at 0.5 / sqrt(fan in) (24 residual units stay near unit scale), the style
    blocks' convs at He's sqrt(2 / fan in) (LeakyReLU), EqualLinear weights N(0, 1) (it scales by 1/sqrt(512)
    itself), so the predicted deltas are O(0.1) and depend on the face; BatchNorm at identity statistics. The
    decoder tensors give only the shapes check_encoder_fits reads."""
    from pti.engine.encoders import Encoder

    num_ws = 2 * int(math.log2(stylegan_size)) - 2
    g = torch.Generator().manual_seed(seed)
    latent_avg = torch.randn(512, generator=g).repeat(num_ws, 1)  # e4e saves it repeated per layer
    net = Encoder(kind, stylegan_size, latent_avg).net
    shared: dict[tuple, torch.Tensor] = {}
    sd = {}
    for k, v in net.state_dict().items():
        if v.ndim >= 2:
            role = "linear" if k.endswith("linear.weight") else "style" if k.startswith("styles.") else "body"
            if (v.shape, role) not in shared:
                fan_in = math.prod(v.shape[1:])
                gain = {"linear": 1.0, "style": math.sqrt(2 / fan_in), "body": 0.5 / math.sqrt(fan_in)}[role]
                shared[v.shape, role] = torch.randn(v.shape, generator=g) * gain
            v = shared[v.shape, role]
        sd[f"encoder.{k}"] = v
    sd["decoder.conv1.conv.modulation.weight"] = torch.zeros(512, 512)  # rosinality: [in_channel, style_dim]
    for i in range(int(math.log2(stylegan_size)) - 2):
        sd[f"decoder.to_rgbs.{i}.conv.weight"] = torch.zeros(1, 3, 512, 1, 1)
    if kind == "e4e":
        opts = {"encoder_type": "Encoder4Editing", "stylegan_size": stylegan_size, "start_from_latent_avg": True}
    else:  # restyle-encoder's options name the decoder's size output_size
        opts = {"encoder_type": "ProgressiveBackboneEncoder", "output_size": stylegan_size, "input_nc": 6}
    torch.save({"state_dict": sd, "opts": opts, "latent_avg": latent_avg}, path)
    return path


@pytest.fixture(scope="module")
def e4e_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("e4e")
    return {
        "base": _base(d / "base16.safetensors", 16),
        "base32": _base(d / "base32.safetensors", 32),
        "ckpt": _e4e_checkpoint(d / "e4e_test_encode.pt", 16),
        "restyle": _e4e_checkpoint(d / "restyle_test_encode.pt", 16, kind="restyle"),
    }


def test_e4e_start_gives_the_encoders_codes(tmp_path, e4e_files) -> None:
    from pti.engine.checkpoint import load_generator
    from pti.engine.encoders import encode, load_encoder

    photo = _photo(tmp_path / "face.png", 16)
    out = tmp_path / "out"
    ckpt = e4e_files["ckpt"]
    p = run_pti("tune", photo, "--network", e4e_files["base"], "--init", "e4e", "--encoder", ckpt, *FAST, "-o", out)
    assert p.returncode == 0, p.stderr
    assert f"encoding with e4e ({ckpt.name}) ..." in p.stdout and "encoded with e4e" in p.stdout
    rep = _report(out, "face")
    init = rep["init"]
    assert init["init"] == "e4e" and init["sha256"] == sha256_file(ckpt) and init["refine_steps"] == 0
    assert init["encoder_load"]["id"] and rep["seconds"]["encode"] > 0
    assert rep["steps"]["invert"] == 0 and init["start_metrics"] == rep["before_tuning"]

    G = load_generator(str(e4e_files["base"]), "cpu")
    enc = load_encoder(ckpt, "e4e")
    img = torch.from_numpy(np.array(Image.open(out / "face" / "aligned.png").convert("RGB"))).permute(2, 0, 1)
    codes = encode(enc, img[None], G=G)[0]
    pivot = _pivot_of(out / "face.pti")
    assert (codes - enc.latent_avg).abs().max() > 0.05  # the encoder's deltas are not nothing
    # the same network on the same input in another process: equal up to float32 summation order, through the
    # IR-SE50 body (24 units of 2 convs), a style block (<= 5 convs) and its linear layer; fan-in 512 * 3 * 3
    tol = fp32_reorder_tolerance(float(codes.abs().max()), 512 * 9, 2 * 24 + 5 + 2)
    assert (pivot - codes).abs().max() <= tol
    info = run_pti("info", out / "face.pti")
    assert f"e4e ({ckpt.name}" in info.stdout and "+ 0 projector steps" in info.stdout


def test_restyle_start_runs_its_iterations_on_the_base(tmp_path, e4e_files) -> None:
    from pti.engine.checkpoint import load_generator
    from pti.engine.encoders import encode, load_encoder

    photo = _photo(tmp_path / "face.png", 16)
    out = tmp_path / "out"
    ckpt = e4e_files["restyle"]
    args = ("--network", e4e_files["base"], "--init", "restyle", "--encoder", ckpt, "--restyle-iters", "2")
    p = run_pti("tune", photo, *args, *FAST, "-o", out)
    assert p.returncode == 0, p.stderr
    init = _report(out, "face")["init"]
    assert init["init"] == "restyle" and init["restyle_iterations"] == 2 and init["sha256"] == sha256_file(ckpt)
    G = load_generator(str(e4e_files["base"]), "cpu")
    enc = load_encoder(ckpt, "restyle")
    img = torch.from_numpy(np.array(Image.open(out / "face" / "aligned.png").convert("RGB"))).permute(2, 0, 1)
    codes = encode(enc, img[None], G=G, iterations=2)[0]
    one = encode(enc, img[None], G=G, iterations=1)[0]
    pivot = _pivot_of(out / "face.pti")
    tol = 2 * fp32_reorder_tolerance(float(codes.abs().max()), 512 * 9, 2 * 24 + 4 + 2)  # two passes
    assert (pivot - codes).abs().max() <= tol < (codes - one).abs().max()  # the second iteration ran
    wrong = run_pti("tune", photo, "--network", e4e_files["base"], "--restyle-iters", "2", *FAST, "-o", out / "x")
    assert wrong.returncode == 2 and "--restyle-iters" in wrong.stderr


def test_a_misfit_encoder_is_refused_in_one_line(tmp_path, e4e_files) -> None:
    photo = _photo(tmp_path / "face.png", 32)
    args = ("--network", e4e_files["base32"], "--init", "e4e", "--encoder", e4e_files["ckpt"])
    p = run_pti("tune", photo, *args, *FAST, "-o", tmp_path / "out")
    assert p.returncode == 1 and no_traceback(p)
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and "trained for another generator" in lines[0] and "16 px" in lines[0], p.stderr
    assert not (tmp_path / "out").exists()


def test_the_default_encoder_offline_names_the_import_command(tmp_path, e4e_files) -> None:
    photo = _photo(tmp_path / "face.png", 16)
    p = run_pti("tune", photo, "--network", e4e_files["base"], "--init", "e4e", *FAST, "-o", tmp_path / "out")
    assert p.returncode == 1 and no_traceback(p)
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and "`pti weights import PATH/TO/e4e_ffhq_encode.pt --name e4e-ffhq`" in lines[0]


# ---------------------------------------------------------------------------- folder runs


@pytest.mark.slow
def test_the_fingerprint_holds_the_start(tmp_path, tiny_w) -> None:
    photo = _photo(tmp_path / "face.png", 64)
    out = tmp_path / "out"
    assert run_pti("tune", photo, "--invert-steps", "2", *FAST, "-o", out).returncode == 0
    first = json.loads((out / "manifest.jsonl").read_text().splitlines()[-1])
    assert "init" not in first["settings"]  # the projector's fingerprint is as before starts existed
    pivot_file = _write_pivot(tmp_path / "w.npz", tiny_w, "npz [1, num_ws, w_dim]")
    p = run_pti("tune", photo, "--init", pivot_file, *FAST, "-o", out)
    assert p.returncode == 1 and len(error_lines(p.stderr)) == 1 and "other settings (init was null" in p.stderr
    p = run_pti("tune", photo, "--init", pivot_file, *FAST, "-o", out, "--force")
    assert p.returncode == 0, p.stderr
    line = json.loads((out / "manifest.jsonl").read_text().splitlines()[-1])
    assert line["settings"]["init"] == {
        "init": "file",
        "sha256": sha256_file(pivot_file),
        "restyle_iterations": None,
        "refine_steps": 0,
    }
    again = run_pti("tune", photo, "--init", pivot_file, "--invert-steps", "1", *FAST, "-o", out)
    assert again.returncode == 1 and "refine_steps was 0, now 1" in again.stderr  # another refine: another setting
    same = run_pti("tune", photo, "--init", pivot_file, *FAST, "-o", out)
    assert same.returncode == 0 and "done before, skipped" in same.stdout


@pytest.mark.slow
def test_a_folder_run_with_two_workers_loads_the_encoder_once_per_worker(tmp_path, e4e_files) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        _photo(photos / f"p{i}.png", 16, seed=i)
    out = tmp_path / "out"
    args = ("--network", e4e_files["base"], "--init", "e4e", "--encoder", e4e_files["ckpt"])
    p = run_pti("tune", photos, *args, *FAST, "--workers", "2", "-o", out, timeout=600)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(x["status"] == "done" for x in lines)
    loads = {x["init"]["encoder_load"]["id"] for x in lines}
    pids = {x["init"]["encoder_load"]["pid"] for x in lines}
    assert len(loads) == len(pids) <= 2  # one load per worker process, however many photos it took
    assert all(x["settings"]["init"]["sha256"] == sha256_file(e4e_files["ckpt"]) for x in lines)
