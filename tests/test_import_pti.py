"""`pti import`: the authors' PTI outputs (danielroich/PTI) in, as a `.pti` identity, through the console script.

The checkpoints are made the way the authors' code saves one: a small generator in NVIDIA's persistence layout
(`helpers.as_persistent` under `fake_nvidia_modules`, the records `torch_utils.persistence` pickles), its
synthesis weights moved as tuning moves them (the mapping and the buffers untouched, as PTI leaves them), then
`torch.save(G)` (torch's own zip writer, pickle protocol 2). The base is `write_nvidia_pickle` of the untouched
generator. The live test at the end does the same with NVIDIA's own classes from a checkout.

Tolerances:
- `--exact` stores the tuned weights as fp32: the render equals the checkpoint's generator bit for bit.
- fp16 deltas: each stored delta d = tuned - base rounds to fp16, an error of at most 2^-11 |d| (2^-25 absolute
  in fp16's subnormal range), and adding it back to the fp32 base rounds once more (2^-24 of the weight): b_i, the
  bound of weight i, which the test checks weight by weight. A pixel p of the render then moves by at most
  sum_i |d img_p / d w_i| b_i to first order (the weight errors are ~1e-5: their second-order effect is far below
  float32 rounding). That worst case needs every rounding to line up with the Jacobian's sign; the roundings of
  different weights are independent, each uniform within its half ulp (variance at most b_i^2 / 3), so the error
  of a pixel is a sum of thousands of independent terms with sd sigma_p = sqrt(sum_i (d img_p / d w_i)^2 b_i^2 / 3),
  and 6 sigma_p bounds it (a normal tail of 2e-9 per pixel). Both bounds add the float32 rounding of two
  evaluations with different weights (`fp32_reorder_tolerance` at the image's scale), and both are computed per
  pixel from the generator's Jacobian. Measured here: the error is 0.03 of the worst case and 0.17 of 6 sigma;
  deltas rounded to bf16 instead (2^-8) reach 1.4 times 6 sigma. The tuning moves the render by far more than
  either bound, so the test also sees that the person is in the file.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pti
from clirun import error_lines, no_traceback, run_pti
from helpers import (
    SMALL,
    as_persistent,
    easy,
    fake_nvidia_modules,
    fan_in_and_depth,
    fp32_reorder_tolerance,
    small_generator,
    write_nvidia_pickle,
)
from pti.engine.authors_pti import STORAGE_DTYPES, load_tuned_generator, read_checkpoint
from pti.engine.checkpoint import generator_hash, load_generator
from pti.engine.identity import Identity
from pti.engine.images import to_uint8
from pti.engine.pivots import PivotError, read_pivot
from pti.errors import CheckpointError
from pti.fsutil import sha256_file

TUNING_STEP = 0.03  # how far the stand-in tuning moves each synthesis weight (sd): real PTI moves them 0.01-0.1


def tuned_copy(G, seed: int = 1, scale: float = TUNING_STEP):
    """`G` with only its synthesis parameters moved, as PTI's tuning leaves a generator."""
    T = G.clone()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in T.synthesis.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return T


def save_authors_checkpoint(path: Path, G, requires_grad: bool = True) -> Path:
    """`torch.save(G)` of `G` as NVIDIA's persistent classes (the authors' `model_<run>_<image>.pt`): their G has
    requires_grad=True on every parameter, and the whole module is pickled, init kwargs as EasyDicts."""
    G = G.clone().requires_grad_(requires_grad)
    with fake_nvidia_modules() as fake:
        torch.save(as_persistent(G, fake, easy(fake, G.init_kwargs)), path)
    return path


def render(G, ws: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return G.synthesis(ws, noise_mode="const", force_fp32=True)


def zip_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def data_pkl(members: dict[str, bytes]) -> str:
    (name,) = [n for n in members if n.endswith("/data.pkl")]
    return name


def one_error(proc) -> str:
    """The one line a refused command prints (exit 1, no traceback)."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert no_traceback(proc), proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A base .pkl, the authors' checkpoint of its tuned copy and the pivot (0.pt, [1, num_ws, w_dim], saved with
    requires_grad as their projector leaves it)."""
    tmp = tmp_path_factory.mktemp("authors")
    base = small_generator()
    tuned = tuned_copy(base)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        pivot = base.mapping(torch.randn(1, base.z_dim, generator=g), truncation_psi=0.7)
    torch.save(pivot.clone().requires_grad_(True), tmp / "0.pt")
    return dict(
        tmp=tmp,
        base=base,
        tuned=tuned,
        pivot=pivot,
        pkl=write_nvidia_pickle(tmp / "ffhq.pkl", base),
        ckpt=save_authors_checkpoint(tmp / "model_run_img.pt", tuned),
        pt=tmp / "0.pt",
    )


def import_args(case, *extra) -> list:
    return ["import", case["ckpt"], "--pivot", case["pt"], "--base", case["pkl"], *extra]


@pytest.fixture(scope="module")
def default_import(case):
    """`pti import CKPT --pivot 0.pt --base ffhq.pkl`, no options: fp16 deltas into <CKPT stem>.pti beside CKPT."""
    proc = run_pti(*import_args(case))
    assert proc.returncode == 0, proc.stderr
    return proc, case["ckpt"].with_suffix(".pti")


# ------------------------------------------------------------------------------------------ the round trip


def test_exact_import_renders_the_checkpoint_generator_bit_for_bit(case, tmp_path):
    out = tmp_path / "person.pti"
    proc = run_pti(*import_args(case, "-o", out, "--exact"))
    assert proc.returncode == 0, proc.stderr
    ident = Identity.load(out)
    assert ident.exact and ident.base_hash == generator_hash(case["base"]) and ident.base_hint == str(case["pkl"])
    assert torch.equal(ident.pivot, case["pivot"][0])
    G = ident.apply(load_generator(case["pkl"]))
    for k, v in case["tuned"].state_dict().items():
        assert torch.equal(G.state_dict()[k], v), k
    assert torch.equal(render(G, ident.pivot[None]), render(case["tuned"], case["pivot"]))
    moved = (render(case["tuned"], case["pivot"]) - render(case["base"], case["pivot"])).abs().max()
    assert f"wrote {out}" in proc.stdout and "exact fp32" in proc.stdout and "[1, 6, 32] -> [6, 32]" in proc.stdout
    assert moved > 0.1  # the tuning is visible: this compares two different images, not the base twice
    # rendered (pti.render, `pti render`'s library call) with the base the identity records: the checkpoint's pixels
    pti.render(out, [], tmp_path / "render", device="cpu")
    png = np.asarray(Image.open(tmp_path / "render" / "reconstruction.png"))
    assert np.array_equal(png, to_uint8(render(case["tuned"], case["pivot"])[0]))


def test_an_imported_person_exports_back_to_an_nvidia_pickle(case, tmp_path):
    """The authors' checkpoint -> pti import --exact -> pti export --format nvidia-pkl: the tuned generator again,
    bit for bit, in a pickle that carries the base's own records."""
    person = tmp_path / "person.pti"
    assert run_pti(*import_args(case, "-o", person, "--exact")).returncode == 0
    proc = run_pti("export", person, "--format", "nvidia-pkl")
    assert proc.returncode == 0, proc.stderr
    G = load_generator(tmp_path / "person.pkl")
    want = case["tuned"].state_dict()
    assert set(G.state_dict()) == set(want)
    for k, v in G.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_default_import_is_fp16_deltas_within_the_bound_their_rounding_implies(case, default_import):
    proc, out = default_import
    assert out.is_file() and f"wrote {out}" in proc.stdout and "fp16 deltas" in proc.stdout
    ident = Identity.load(out)
    assert not ident.exact and all(t.dtype == torch.float16 for t in ident.tensors.values())
    base, tuned = load_generator(case["pkl"]), case["tuned"]
    G = ident.apply(base)
    bounds = weight_bounds(G, base, tuned)
    got, want = render(G, ident.pivot[None]), render(tuned, case["pivot"])
    worst, six_sigma = _pixel_bounds(tuned, case["pivot"], bounds)
    error = (got - want).abs()
    assert (error <= worst).all(), float((error / worst).max())  # guaranteed (to first order)
    assert (error <= six_sigma).all(), float((error / six_sigma).max())  # what independent roundings give
    assert (want - render(base, case["pivot"])).abs().max() > 50 * worst.max()  # the person is in the file
    for k, v in base.state_dict().items():  # the mapping and the buffers are the base's (PTI's too)
        if not (k.startswith("synthesis.") and k.removeprefix("synthesis.") in bounds):
            assert torch.equal(G.state_dict()[k], v), k


def weight_bounds(G, base, tuned) -> dict[str, torch.Tensor]:
    """The fp16-delta bound of every synthesis weight (module docstring), checked on `G` (the file applied)."""
    bounds = {}
    for (name, p), b, want in zip(
        G.synthesis.named_parameters(), base.synthesis.parameters(), tuned.synthesis.parameters()
    ):
        p, b, want = p.detach(), b.detach(), want.detach()
        bound = (want - b).abs() * 2.0**-11 + 2.0**-25 + want.abs() * 2.0**-24
        assert ((p - want).abs() <= bound).all(), name
        bounds[name] = bound
    return bounds


def _pixel_bounds(G, ws: torch.Tensor, bounds: dict[str, torch.Tensor], pixels=None):
    """(worst case, 6 sigma) per pixel of the render's error from weight errors within `bounds`, each plus the
    float32 rounding of two evaluations (module docstring); every pixel in the image's shape, or the flat
    indices `pixels` only (one backward pass per pixel)."""
    G = G.clone().requires_grad_(False)
    params = dict(G.synthesis.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    img = G.synthesis(ws, noise_mode="const", force_fp32=True)
    out_shape, img = img.shape, img.reshape(-1)
    rows = torch.eye(img.numel()) if pixels is None else torch.eye(img.numel())[pixels]
    grads = dict(zip(params, torch.autograd.grad(img, list(params.values()), rows, is_grads_batched=True)))
    worst = sum((g.abs() * bounds[n]).reshape(len(rows), -1).sum(1) for n, g in grads.items())
    variance = sum((g.square() * bounds[n].square() / 3).reshape(len(rows), -1).sum(1) for n, g in grads.items())
    fan_in, depth = fan_in_and_depth(G)
    fp32 = fp32_reorder_tolerance(float(img.detach().abs().max()), fan_in, depth)
    out = worst + fp32, 6 * variance.sqrt() + fp32
    return tuple(b.reshape(out_shape) for b in out) if pixels is None else out


def test_info_says_where_an_imported_identity_came_from(case, default_import):
    shown = run_pti("info", default_import[1])
    assert shown.returncode == 0, shown.stderr
    assert f"imported from {case['ckpt']} (danielroich/PTI)" in shown.stdout
    assert f"{case['pt']} [1, 6, 32]" in shown.stdout
    assert "tuned with      danielroich/PTI, fp32" in shown.stdout


def test_info_json_records_both_files_and_their_hashes(case, default_import):
    shown = run_pti("info", default_import[1], "--json")
    assert shown.returncode == 0, shown.stderr
    rec = json.loads(shown.stdout)
    assert rec["imported"] == {
        "format": "danielroich/PTI checkpoint",
        "checkpoint": str(case["ckpt"]),
        "checkpoint_path": str(case["ckpt"].resolve()),
        "checkpoint_sha256": sha256_file(case["ckpt"]),
        "pivot": str(case["pt"]),
        "pivot_path": str(case["pt"].resolve()),
        "pivot_sha256": sha256_file(case["pt"]),
        "pivot_shape": [1, 6, 32],
    }
    assert rec["steps"] is None and rec["tuned_with"]["impl"] == "danielroich/PTI"


def test_a_checkpoint_saved_on_the_gpu_reads_the_same(case, tmp_path):
    """Their G was on CUDA: the storages' location is 'cuda:0' (edited in here: this machine may have no GPU)."""
    members = zip_members(case["ckpt"])
    name = data_pkl(members)
    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # BINUNICODE, memoized: written once
    assert members[name].count(cpu) == 1
    members[name] = members[name].replace(cpu, cuda)
    ckpt = write_zip(tmp_path / "model_gpu.pt", members)
    out = tmp_path / "gpu.pti"
    proc = run_pti("import", ckpt, "--pivot", case["pt"], "-n", case["pkl"], "-o", out, "--exact")  # -n = --base
    assert proc.returncode == 0, proc.stderr
    G = Identity.load(out).apply(load_generator(case["pkl"]))
    assert all(torch.equal(G.state_dict()[k], v) for k, v in case["tuned"].state_dict().items())


def test_an_existing_output_is_kept_without_force(case, default_import):
    out = default_import[1]
    before = out.read_bytes()
    line = one_error(run_pti(*import_args(case)))  # the default output again
    assert line == f"error: {out} already exists; pass --force to overwrite it"
    assert out.read_bytes() == before


def test_force_replaces_an_existing_output(case, tmp_path):
    out = tmp_path / "person.pti"
    out.write_bytes(b"someone's file")
    assert run_pti(*import_args(case, "-o", out, "--force")).returncode == 0
    assert Identity.load(out).base_hash == generator_hash(case["base"])


def test_usage_errors_exit_2(case, tmp_path):
    assert run_pti("import", case["ckpt"], "--base", case["pkl"]).returncode == 2  # no --pivot
    assert run_pti("import", case["ckpt"], "--pivot", case["pt"]).returncode == 2  # no --base
    wrong = run_pti(*import_args(case, "-o", tmp_path / "person.pkl"))
    assert wrong.returncode == 2 and ".pti" in wrong.stderr and not (tmp_path / "person.pkl").exists()


# ------------------------------------------------------------------------------------------ pivots

W_SHAPES = {"[1, w_dim]": (1, 32), "[num_ws, w_dim]": (6, 32), "[1, num_ws, w_dim]": (1, 6, 32)}


@pytest.mark.parametrize("shape", list(W_SHAPES.values()), ids=list(W_SHAPES))
def test_pivot_tensors_of_each_shape(tmp_path, shape):
    w = torch.randn(shape)
    torch.save(w.requires_grad_(True), tmp_path / "0.pt")
    got = read_pivot(tmp_path / "0.pt", 6, 32)
    assert got.dtype == torch.float32 and got.shape == (6, 32)
    assert torch.equal(got, w.detach().reshape(-1, 32).expand(6, 32))


def test_pivot_npy_npz_and_float64(tmp_path):
    w = np.random.RandomState(0).randn(1, 6, 32)
    np.save(tmp_path / "w.npy", w.astype(np.float32))
    np.savez(tmp_path / "projected_w.npz", w=w.astype(np.float32))  # NVIDIA's projector.py
    np.save(tmp_path / "w64.npy", w)
    for name in ("w.npy", "projected_w.npz"):
        assert torch.equal(read_pivot(tmp_path / name, 6, 32), torch.from_numpy(w[0].astype(np.float32))), name
    assert torch.equal(read_pivot(tmp_path / "w64.npy", 6, 32), torch.from_numpy(w[0]).float())  # rounds once


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _bad_pivots(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the one-line refusal says)."""
    torch.save(torch.randn(2, 6, 32), tmp / "batch.pt")
    torch.save(torch.randn(1, 6, 64), tmp / "wdim.pt")
    torch.save(torch.randn(6, 32).to(torch.int64), tmp / "ints.pt")
    nan = torch.randn(1, 6, 32)
    nan[0, 2, 3] = float("nan")
    torch.save(nan, tmp / "nan.pt")
    torch.save({"w": torch.randn(1, 6, 32)}, tmp / "dict.pt")
    torch.save(_RunsCode(tmp / "ran"), tmp / "code.pt")
    np.save(tmp / "inf.npy", np.full((1, 32), np.inf, np.float32))
    np.save(tmp / "objects.npy", np.array([{"w": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp / "other.npz", latent=np.zeros((1, 6, 32), np.float32))
    (tmp / "notes.txt").write_text("w = 0.5\n")
    (tmp / "cut.pt").write_bytes((tmp / "batch.pt").read_bytes()[:100])
    return {
        "batch": (tmp / "batch.pt", "shape [2, 6, 32]"),
        "w_dim": (tmp / "wdim.pt", "shape [1, 6, 64]"),
        "ints": (tmp / "ints.pt", "int64 tensor"),
        "nan": (tmp / "nan.pt", "1 NaN or infinite"),
        "inf": (tmp / "inf.npy", "32 NaN or infinite"),
        "dict": (tmp / "dict.pt", "dict (keys: w)"),
        "code": (tmp / "code.pt", "pickled code"),
        "objects": (tmp / "objects.npy", "pickled Python objects"),
        "npz_key": (tmp / "other.npz", "without 'w'"),
        "text": (tmp / "notes.txt", "not a pivot file"),
        "truncated": (tmp / "cut.pt", "truncated"),
        "missing": (tmp / "absent.pt", "no such pivot file"),
    }


BAD_PIVOTS = [
    "batch",
    "w_dim",
    "ints",
    "nan",
    "inf",
    "dict",
    "code",
    "objects",
    "npz_key",
    "text",
    "truncated",
    "missing",
]


@pytest.mark.parametrize("name", BAD_PIVOTS)
def test_bad_pivots_are_refused_with_one_line(tmp_path, name):
    cases = _bad_pivots(tmp_path)
    assert sorted(cases) == sorted(BAD_PIVOTS)
    path, says = cases[name]
    with pytest.raises(PivotError) as e:
        read_pivot(path, 6, 32)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and says in message, message
    assert not (tmp_path / "ran").exists()


def test_a_bad_pivot_through_the_cli(case, tmp_path):
    np.save(tmp_path / "short.npy", np.zeros((3, 32), np.float32))
    out = tmp_path / "short.pti"
    line = one_error(
        run_pti("import", case["ckpt"], "--pivot", tmp_path / "short.npy", "--base", case["pkl"], "-o", out)
    )
    assert "shape [3, 32]" in line and "[1, 6, 32]" in line and not out.exists()


def test_nvidia_projected_w_npz_as_the_pivot(case, tmp_path):
    np.savez(tmp_path / "projected_w.npz", w=case["pivot"].numpy())
    out = tmp_path / "npz.pti"
    proc = run_pti("import", case["ckpt"], "--pivot", tmp_path / "projected_w.npz", "--base", case["pkl"], "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(Identity.load(out).pivot, case["pivot"][0])


# ------------------------------------------------------------------------------------------ hostile files


def refused(case, ckpt: Path, tmp: Path) -> str:
    """`pti import ckpt` with the good pivot and base: the one error line; no identity was written."""
    out = tmp / "x.pti"
    line = one_error(run_pti("import", ckpt, "--pivot", case["pt"], "--base", case["pkl"], "-o", out))
    assert not out.exists()
    return line


@pytest.mark.parametrize("where", ["in the generator's state", "at the top"])
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(case, tmp_path, where):
    """A data.pkl carrying an os.system call (torch.load(weights_only=False), as the authors load it, runs it)."""
    marker = tmp_path / "ran"
    ckpt = tmp_path / "model_evil.pt"
    if where == "at the top":
        write_zip(ckpt, {"archive/data.pkl": pickle.dumps(_RunsCode(marker), protocol=2)})
    else:
        G = tuned_copy(case["base"])
        with fake_nvidia_modules() as fake:
            p = as_persistent(G, fake, easy(fake, G.init_kwargs))
            p.meta["state"]["payload"] = _RunsCode(marker)
            torch.save(p, ckpt)
    line = refused(case, ckpt, tmp_path)
    assert (
        "system, which a generator checkpoint has no reason to contain" in line
        and "nothing from the file was run" in line
    ), line
    assert not marker.exists()


ARCHITECTURES = {
    "channels": (dict(synthesis_kwargs={**SMALL["synthesis_kwargs"], "channel_base": 512}), "channel_base 512"),
    "resolution": (dict(img_resolution=32), "img_resolution 32 in the checkpoint, 16 in the base"),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_a_checkpoint_of_another_architecture_is_refused(case, tmp_path, name):
    change, says = ARCHITECTURES[name]
    G = tuned_copy(small_generator(config={**SMALL, **change}))
    line = refused(case, save_authors_checkpoint(tmp_path / "model_other.pt", G), tmp_path)
    assert f"is not a PTI tuning of this base ({case['pkl']}): its config differs" in line and says in line, line


@pytest.mark.parametrize("where", ["mapping.fc0.weight", "mapping.w_avg", "synthesis.b8.conv0.noise_const"])
def test_a_checkpoint_whose_mapping_or_buffers_differ_from_the_base_is_refused(case, tmp_path, where):
    T = tuned_copy(case["base"])
    with torch.no_grad():
        T.state_dict()[where].view(-1)[0] += 1e-3  # a parameter PTI never trains, or a buffer
    line = refused(case, save_authors_checkpoint(tmp_path / "model_other.pt", T), tmp_path)
    assert f"not a PTI tuning of this base ({case['pkl']}): {where} differs from the base's" in line, line


@pytest.mark.parametrize("what", ["missing storage", "text file", "network pickle"])
def test_a_missing_storage_or_a_file_of_another_kind_is_refused(case, tmp_path, what):
    members = zip_members(case["ckpt"])
    gone = next(n for n in members if "/data/" in n and n.rsplit("/", 1)[1].isdigit())
    if what == "missing storage":
        ckpt, says = (
            write_zip(tmp_path / "model_missing.pt", {n: b for n, b in members.items() if n != gone}),
            (f"tensor storage {gone.rsplit('/', 1)[1]} is missing"),
        )
    elif what == "text file":
        ckpt, says = tmp_path / "notes.pt", "is a text file, not a generator checkpoint"
        ckpt.write_text("not a checkpoint\n")
    else:
        ckpt, says = case["pkl"], "is a network pickle (.pkl), not a torch.save checkpoint"
    assert says in refused(case, ckpt, tmp_path)


def _checkpoint_variants(case, tmp: Path) -> dict[str, tuple[Path, str]]:
    members = zip_members(case["ckpt"])
    name, prefix = data_pkl(members), data_pkl(members).split("/")[0]
    storage = next(n for n in members if n.startswith(f"{prefix}/data/") and len(members[n]) > 8)
    legacy = tmp / "legacy.pt"
    with fake_nvidia_modules() as fake:
        G = case["tuned"]
        torch.save(as_persistent(G, fake, easy(fake, G.init_kwargs)), legacy, _use_new_zipfile_serialization=False)
    torch.save(case["tuned"].state_dict(), tmp / "state.pt")

    class Sentinel:
        pass

    class ForgedIds(pickle.Pickler):  # a storage id pointing outside the archive
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "../../etc/passwd", "cpu", 4) if isinstance(obj, Sentinel) else None

    buf = io.BytesIO()
    ForgedIds(buf, protocol=2).dump([Sentinel()])
    return {
        "escaping member": (
            write_zip(tmp / "escape.pt", {**members, f"{prefix}/../../outside": b"x"}),
            "points outside the archive",
        ),
        "short storage": (
            write_zip(tmp / "short.pt", {**members, storage: members[storage][:-4]}),
            f"holds {len(members[storage]) - 4} bytes, its tensors need {len(members[storage])}",
        ),
        "big-endian": (write_zip(tmp / "big.pt", {**members, f"{prefix}/byteorder": b"big"}), "'big'-endian"),
        "no data.pkl": (write_zip(tmp / "nopkl.pt", {k: v for k, v in members.items() if k != name}), "no <name>"),
        "forged storage key": (write_zip(tmp / "forged.pt", {"archive/data.pkl": buf.getvalue()}), "malformed key"),
        "legacy torch.save": (legacy, "legacy (pre-1.6) torch.save file"),
        "a state dict": (tmp / "state.pt", "holds a state dict"),
    }


VARIANTS = [
    "escaping member",
    "short storage",
    "big-endian",
    "no data.pkl",
    "forged storage key",
    "legacy torch.save",
    "a state dict",
]


@pytest.mark.parametrize("what", VARIANTS)
def test_malformed_containers_are_refused_with_one_line(case, tmp_path, what):
    variants = _checkpoint_variants(case, tmp_path)
    assert sorted(variants) == sorted(VARIANTS)
    path, says = variants[what]
    with pytest.raises(CheckpointError) as e:
        load_tuned_generator(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and says in message, message


def test_the_storage_table_names_only_torch_storage_classes(case):
    """Every name the unpickler maps is one of torch's typed storages, with that storage's dtype; and a
    checkpoint's tensors come back with the dtype, shape and values torch.save was given."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's TypedStorage deprecation notice
        for name, dtype in STORAGE_DTYPES.items():
            assert getattr(torch, name).dtype == dtype, name
    top = read_checkpoint(case["ckpt"])
    state = top.flat_state()
    for k, v in case["tuned"].state_dict().items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


# ------------------------------------------------------------------------------------------ live, NVIDIA's classes


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("PTI_SG2ADA_PATH"), reason="set PTI_SG2ADA_PATH to a stylegan2-ada-pytorch checkout"
)
def test_live_nvidia_generator_saved_as_the_authors_code_saves_it(tmp_path):
    """NVIDIA's own Generator pickled as their training loop does, loaded back as the authors' `load_old_G` does
    (their loader: the pickle's code runs, which is fine for a checkout we fetched), its synthesis moved,
    `torch.save(G)` as the authors' coach does; then `pti import` and the images compared."""
    import copy
    import importlib.util

    spec = importlib.util.spec_from_file_location("parity_sg2ada", Path(__file__).parents[1] / "tools/parity_sg2ada.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    nv_net = parity.import_nvidia(os.environ["PTI_SG2ADA_PATH"])
    kwargs = parity.GOLDEN_CONFIGS["fp16_64px_clamp"]
    torch.manual_seed(0)
    G = nv_net.Generator(**kwargs).eval()
    D = nv_net.Discriminator(c_dim=0, img_resolution=kwargs["img_resolution"], img_channels=3).eval()
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        G.mapping.w_avg.normal_()
    snapshot = dict(training_set_kwargs=dict(path="ffhq.zip"), augment_pipe=None)
    for name, module in (("G", G), ("D", D), ("G_ema", G)):
        snapshot[name] = copy.deepcopy(module).eval().requires_grad_(False).cpu()
    with open(tmp_path / "base.pkl", "wb") as f:
        pickle.dump(snapshot, f)
    with open(tmp_path / "base.pkl", "rb") as f:  # the authors' load_old_G
        G_pti = pickle.load(f)["G_ema"].eval().float()
    for p in G_pti.parameters():
        p.requires_grad = True
    with torch.no_grad():
        for p in G_pti.synthesis.parameters():
            p.add_(torch.randn_like(p) * TUNING_STEP)
        ws = G_pti.mapping(torch.randn(1, G_pti.z_dim), None, truncation_psi=0.7)
    torch.save(G_pti, tmp_path / "model_run_img.pt")
    torch.save(ws.clone().requires_grad_(True), tmp_path / "0.pt")
    with torch.no_grad():
        want = G_pti.synthesis(ws, noise_mode="const", force_fp32=True)
    base = load_generator(tmp_path / "base.pkl")
    for exact in (True, False):  # exact first: its generator is the checkpoint's, as ours
        out = tmp_path / f"p{int(exact)}.pti"
        args = ["--pivot", tmp_path / "0.pt", "--base", tmp_path / "base.pkl", "-o", out]
        proc = run_pti("import", tmp_path / "model_run_img.pt", *args, *(["--exact"] if exact else []))
        assert proc.returncode == 0, proc.stderr
        G_ours = Identity.load(out).apply(base)
        got = render(G_ours, ws)
        diff = (got - want).abs()
        if exact:
            tuned = G_ours
            for k, v in G_pti.state_dict().items():  # NVIDIA's tensors, read without NVIDIA's code
                assert torch.equal(tuned.state_dict()[k], v.detach()), k
            fan_in, depth = fan_in_and_depth(G_ours)
            tol = fp32_reorder_tolerance(float(want.abs().max()), fan_in, depth)
            print(f"live, --exact: max |pti - NVIDIA| = {float(diff.max()):.3g} (fp32 tolerance {tol:.3g})")
            assert float(diff.max()) <= tol
        else:
            pixels = diff.reshape(-1).topk(32).indices  # the pixels most likely to break the bounds
            worst, six_sigma = _pixel_bounds(tuned, ws, weight_bounds(G_ours, base, tuned), pixels)
            ratios = [float((diff.reshape(-1)[pixels] / b).max()) for b in (worst, six_sigma)]
            print(
                f"live, fp16 deltas: max |pti - NVIDIA| = {float(diff.max()):.3g}, at most "
                f"{ratios[0]:.2g} of the worst-case bound and {ratios[1]:.2g} of the 6-sigma bound"
            )
            assert max(ratios) <= 1
