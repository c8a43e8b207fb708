"""`pti render` / `pti.render`: edits rendered from the identity file equal the in-memory tuned generator
at the same edited ws; outputs, sweeps, GIFs and the report; errors through the console script.

Render tolerance for the fp16-delta encoding: 2e-3 on [-1, 1] images, a quarter of an 8-bit level
(the derivation is in test_identity.py's docstring); the exact encoding is compared bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import pti
from clirun import error_lines, files_under, no_traceback, run_pti
from helpers import tuned_tiny
from pti.engine import edits as E
from pti.engine.checkpoint import generator_hash
from pti.engine.identity import Identity
from pti.engine.images import to_uint8
from pti.errors import IdentityError

RENDER_TOL = 2e-3


@pytest.fixture(scope="module")
def person(tmp_path_factory):
    """Two identity files of one really tuned tiny generator (fp16 deltas and exact), and a GANSpace file."""
    base, G_tuned, pivot = tuned_tiny()
    tmp = tmp_path_factory.mktemp("person")
    digest = generator_hash(base)
    paths = {
        exact: Identity.from_tuning(base, G_tuned, pivot, digest, "builtin:tiny", exact=exact).save(
            tmp / f"p{int(exact)}.pti"
        )
        for exact in (False, True)
    }
    dirs = E.save_ganspace(E.ganspace(base, components=8, samples=4000, seed=0), tmp / "dirs.pt")
    return dict(base=base, G=G_tuned, pivot=pivot[0], paths=paths, dirs=dirs, tmp=tmp)


def _expected(G, ws: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return G.synthesis(ws, noise_mode="const", force_fp32=True)


def _pca(path):
    return {k: v.double() for k, v in torch.load(path, weights_only=True).items()}


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fp16-delta"])
def test_rendering_an_edit_equals_the_tuned_generator_at_the_edited_ws(person, tmp_path, exact):
    edit = f"{person['dirs']}:1=+2@0-5"
    res = pti.render(person["paths"][exact], [edit], tmp_path, device="cpu")
    assert res.labels == ["dirs.pt_1+2@0-5"]
    # the edited ws: the library's, checked against the formula (REFERENCE §2) written out here in float64
    spec = E.parse_edit(edit)
    (frame,) = E.frames(person["pivot"], [spec], [E.resolve(spec, 10, 64)])
    pca, w = _pca(person["dirs"]), person["pivot"].double()
    c, std = pca["comp"][1, 0], float(pca["std"][1])
    coord = float(torch.dot(w[0] - pca["mean"][0], c)) / std
    ws = w.clone()
    ws[0:6] += (2.0 - coord) * std * c
    torch.testing.assert_close(frame.ws.double(), ws, rtol=0, atol=8 * 2.0**-23 * float(ws.abs().max()))
    # rendered from the file = the in-memory tuned generator at the same ws, in the same batch (render puts
    # the reconstruction first, for the identity similarity; float results depend on the batch in the last bits)
    want = _expected(person["G"], torch.stack([person["pivot"], frame.ws]))[1:]
    got = torch.from_numpy(np.array(Image.open(tmp_path / f"{res.labels[0]}.png"))).float()
    want_u8 = torch.from_numpy(to_uint8(want[0])).float()
    if exact:
        assert torch.equal(got, want_u8)  # bit-exact weights, same ops: the same pixels
    else:
        assert (got - want_u8).abs().max() <= 1  # one 8-bit level at a rounding boundary (RENDER_TOL)
    # the edit changed the image, and the result differs from the base generator's render
    recon = _expected(person["G"], person["pivot"][None])
    assert (want - recon).abs().max() > 50 * RENDER_TOL


def test_render_images_match_in_memory_within_the_fp16_delta_bound(person, tmp_path):
    """Before 8-bit quantization: the backend's float images against the tuned generator."""
    from pti.rendering import TorchBackend, base_generator

    ident = Identity.load(person["paths"][False])
    G_file = ident.apply(base_generator(ident, None, torch.device("cpu")))
    specs = E.parse_edits([f"{person['dirs']}:0=-2:2:5"])
    frames = E.frames(ident.pivot, specs, [E.resolve(s, 10, 64) for s in specs])
    ws = torch.stack([f.ws for f in frames])
    got = TorchBackend(G_file, torch.device("cpu"), batch=2).render(ws)
    want = _expected(person["G"], ws)
    assert (got - want).abs().max() <= RENDER_TOL


def test_no_edit_renders_the_reconstruction(person, tmp_path):
    res = pti.render(person["paths"][True], [], tmp_path, device="cpu")
    assert files_under(tmp_path) == ["reconstruction.png", "render.json"]
    want = to_uint8(_expected(person["G"], person["pivot"][None])[0])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "reconstruction.png")), want)
    assert res.report["outputs"][0]["label"] == "reconstruction"


def test_an_identity_that_records_no_impl_renders_and_says_so(person, tmp_path):
    """Files from before pti recorded how they were tuned (these fixtures hold no `impl`) render as before;
    render.json says what it assumes of them and what ran now (auto's pick, fp32 with TF32 off: the pixels
    the exact encoding must reproduce bit for bit)."""
    from pti.engine.config import AUTO_IMPL

    res = pti.render(person["paths"][True], [], tmp_path, device="cpu")
    rec = json.loads((tmp_path / "render.json").read_text())
    assert rec["identity_tuned_with"] == {"impl": "ref", "precision": "fp32", "flags": None, "recorded": False}
    assert rec["impl"]["requested"] == "auto" and rec["impl"]["impl"] == AUTO_IMPL["cpu"] == "ref"
    assert rec["impl"]["precision"] == "fp32" and rec["impl"]["flags"] == {"tf32_matmul": False, "tf32_cudnn": False}
    assert rec == json.loads(json.dumps(res.report))  # what the API returns is what the file holds
    want = to_uint8(_expected(person["G"], person["pivot"][None])[0])
    assert np.array_equal(res.images[0], want)


def test_a_sweep_writes_frames_a_grid_and_a_gif(person, tmp_path):
    res = pti.render(
        person["paths"][True],
        [f"{person['dirs']}:0=-3:3:7", f"{person['dirs']}:2=+1"],
        tmp_path,
        device="cpu",
        batch=3,
        compare=True,
    )
    values = [-3, -2, -1, 0, 1, 2, 3]
    assert res.labels == [f"dirs.pt_0{v:+g}_dirs.pt_2+1" for v in values]
    assert files_under(tmp_path) == sorted(
        ["compare.png", "dirs.pt_0_sweep.gif", "dirs.pt_0_sweep.png", "render.json"]
        + [f"frames/{label}.png" for label in res.labels]
    )
    gif = Image.open(tmp_path / "dirs.pt_0_sweep.gif")
    assert gif.n_frames == 7 and gif.size == (64, 64) and gif.info.get("loop") == 0
    for i, img in enumerate(res.images):  # GIF frames in order (GIF quantizes colours: compare coarsely)
        gif.seek(i)
        frame = np.asarray(gif.convert("RGB")).astype(int)
        assert np.abs(frame - img.astype(int)).mean() < 12
        assert np.array_equal(np.asarray(Image.open(tmp_path / "frames" / f"{res.labels[i]}.png")), img)
    grid = np.asarray(Image.open(tmp_path / "dirs.pt_0_sweep.png"))
    assert grid.shape == (64, 7 * 64 + 6 * 2, 3) and np.array_equal(grid[:, :64], res.images[0])
    assert np.array_equal(grid[:, -64:], res.images[-1])
    report = json.loads((tmp_path / "render.json").read_text())
    assert report["frames"] == 7 and [o["values"][f"{person['dirs']}:0=-3:3:7"] for o in report["outputs"]] == values
    assert report["backend"] == "torch" and report["base_hash"] == generator_hash(person["base"])
    assert Image.open(tmp_path / "compare.png").size[0] > 8 * 128  # reconstruction + 7 frames (no photo recorded)
    assert any("no input photo" in w for w in res.warnings)


def test_identity_on_a_different_base_is_refused(person, tmp_path):
    from pti.engine.checkpoint import save_generator
    from pti.engine.generator import Generator, TINY_CONFIG

    torch.manual_seed(0)
    other = tmp_path / "other.safetensors"
    save_generator(Generator(**TINY_CONFIG), other)
    with pytest.raises(IdentityError, match="pass the same --network it was tuned with"):
        pti.render(person["paths"][False], [], tmp_path / "out", network=str(other), device="cpu")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ the console script


def test_cli_render_and_directions(person, tmp_path):
    dirs = tmp_path / "tiny_dirs.pt"
    res = run_pti("directions", "ganspace", "-k", "6", "--samples", "3000", "--out", dirs, "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and E.load_direction_file(dirs, 5).kind == "ganspace"
    out = tmp_path / "r"
    res = run_pti(
        "render",
        person["paths"][False],
        "--edit",
        f"{dirs}:0=+2",
        "--edit",
        f"{dirs}:1=-1@0-3",
        "-o",
        out,
        "--device",
        "cpu",
    )
    assert res.returncode == 0, res.stderr
    assert files_under(out) == ["render.json", "tiny_dirs.pt_0+2_tiny_dirs.pt_1-1@0-3.png"]
    assert "ID similarity" in res.stdout and f"wrote {out}/" in res.stdout
    # default output folder: beside the identity
    res = run_pti("render", person["paths"][True], "--device", "cpu")
    assert res.returncode == 0 and (person["tmp"] / "p1" / "edits" / "reconstruction.png").is_file()


@pytest.mark.parametrize(
    "edits,needle",
    [
        (["agee=+1"], "unknown direction 'agee'"),
        (["age=three"], "not a number"),
        (["age=+1@5-2"], "is empty"),
        (["age=-3:3:7", "smile=-1:1:3"], "only one sweep"),
        (["age=1:2"], "START:STOP:N"),
    ],
)
def test_cli_grammar_errors_exit_2_before_any_work(person, tmp_path, edits, needle):
    args = [a for e in edits for a in ("--edit", e)]
    res = run_pti("render", person["paths"][False], *args, "-o", tmp_path / "out")
    assert res.returncode == 2 and no_traceback(res), res.stderr
    assert needle in " ".join(res.stderr.split())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit,needle,code",
    [
        ("{dirs}:0=+1@3-12", "layers 3-12 are out of range; this generator has layers 0-9", 2),
        ("{dirs}:99=+1", "components 0..7", 2),
        ("age=+3", "1024 px FFHQ generator", 1),
        ("./nothing_here.npy=+1", "direction file not found", 1),
    ],
)
def test_cli_errors_that_need_the_identity_are_one_line(person, tmp_path, edit, needle, code):
    res = run_pti(
        "render",
        person["paths"][False],
        "--edit",
        edit.format(dirs=person["dirs"]),
        "-o",
        tmp_path / "out",
        "--device",
        "cpu",
    )
    assert res.returncode == code, res.stderr
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and needle in lines[0] and no_traceback(res)
    assert not (tmp_path / "out").exists()


def test_mp4_when_imageio_ffmpeg_is_installed_else_a_warning(person, tmp_path):
    import importlib.util

    res = pti.render(person["paths"][True], [f"{person['dirs']}:0=-1:1:3"], tmp_path, device="cpu", mp4=True)
    video = tmp_path / "dirs.pt_0_sweep.mp4"
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        assert not video.exists() and any("pip install 'pti[video]'" in w for w in res.warnings)
        assert (tmp_path / "dirs.pt_0_sweep.gif").is_file()  # the GIF is still written
    else:
        import imageio.v2 as imageio

        frames = imageio.mimread(video)
        assert len(frames) == 3 and frames[0].shape == (64, 64, 3)
