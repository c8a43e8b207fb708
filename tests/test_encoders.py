"""e4e and ReStyle-e4e (`pti.engine.encoders`) against the authors' code, through the golden file.

`tests/data/encoders_golden.npz` (written by `tools/parity_e4e.py --write-golden`, from checkouts of
omertov/encoder4editing and yuval-alaluf/restyle-encoder) holds two faces and the W+ codes the authors' code
computes for them in float64 (its modules upcast), with the weights regenerated here from numpy's legacy
RandomState and checked by sha256. Each test writes the checkpoint in the authors' layout (a plain dict
saved with torch.save: that is their format), loads it through `load_encoder` and compares pti's float32
codes with that truth, within the float32 reordering bound over the network's depth. Deliberately wrong
encoders (no latent_avg, the fine styles on the middle features, other resizes, align_corners=False in the
FPN, no squeeze-excitation, BatchNorm on batch statistics, ReStyle without its average-image start) must
each break that bound.

Set PTI_E4E_PATH, PTI_RESTYLE_PATH and PTI_ROSINALITY_PATH (rosinality's CPU op package stands in for their
CUDA one) and optionally PTI_TORCHVISION_PATH to also run the authors' code side by side (slow).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import fp32_reorder_tolerance
from pti.engine import encoders as E
from pti.engine.generator import Generator
from pti.engine.rosinality import convert_state_dict, rosinality_config
from pti.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_PATH = ROOT / "tests/data/encoders_golden.npz"
_spec = importlib.util.spec_from_file_location("parity_e4e", ROOT / "tools/parity_e4e.py")
P = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(P)

FAN_IN = 512 * 3 * 3  # the widest sums: 3x3 convs over 512 channels
# Layers on the longest path: the input conv, 2 convs in each of the 24 units, the fine style block's 6 convs
# and its EqualLinear (e4e: 56). ReStyle runs its encoder (1 + 48 + 4 + 1) and, between iterations, the
# generator (7 convs and the toRGB at 32 px) once per iteration.
E4E_DEPTH = 1 + 2 * 24 + 6 + 1
RESTYLE_DEPTH_PER_ITER = 1 + 2 * 24 + 4 + 1 + 8


@pytest.fixture(scope="module")
def golden() -> dict:
    with np.load(GOLDEN_PATH) as z:
        out = {k: z[k] for k in z.files}
    out["meta"] = json.loads(out["meta"].tobytes())
    return out


@pytest.fixture(scope="module")
def decoder(golden) -> Generator:
    G = P.decoder_generator()
    assert {k: P.checksum(v) for k, v in G.state_dict().items()} == golden["meta"]["decoder_sha"]
    return G


@pytest.fixture(scope="module")
def states(golden) -> dict:
    """The regenerated encoder weights, checked against the writer's sha256 per tensor."""
    out = {}
    for kind in E.ENCODER_KINDS:
        out[kind] = P.encoder_state(kind)
        assert {k: P.checksum(v) for k, v in out[kind].items()} == golden["meta"][f"{kind}_sha"], kind
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, states, decoder) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("encoders")
    out = {}
    for kind in E.ENCODER_KINDS:
        out[kind] = folder / f"{kind}.pt"
        torch.save(P.checkpoint(kind, states[kind], decoder), out[kind])
    yield out
    for path in out.values():  # about 0.4 GB each: pytest keeps three runs' temp folders
        path.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _remove_checkpoints(tmp_path):
    """The real-size checkpoints a test writes (up to 0.4 GB each) go when it ends."""
    yield
    for path in tmp_path.glob("*.pt"):
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def loaded(files) -> dict[str, E.Encoder]:
    return {kind: E.load_encoder(path) for kind, path in files.items()}


def face(golden, name: str) -> torch.Tensor:
    return torch.from_numpy(golden[f"faces/{name}"])[None]


def generator_from_checkpoint(path: Path) -> Generator:
    """pti's Generator from the checkpoint's own decoder.* tensors (rosinality's layout) through pti's converter."""
    sd = {k[len("decoder.") :]: v for k, v in torch.load(path)["state_dict"].items() if k.startswith("decoder.")}
    kwargs = rosinality_config(sd, str(path))
    G = Generator(**kwargs).eval().requires_grad_(False)
    state = {
        **{k: v for k, v in G.state_dict().items() if k.endswith("resample_filter")},
        **convert_state_dict(sd, kwargs, ""),
    }
    state["mapping.w_avg"] = G.mapping.w_avg
    G.load_state_dict(state, strict=True)
    return G


def violation(ours: torch.Tensor, truth: np.ndarray, depth: int) -> str | None:
    """None when pti's float32 codes are within the reordering bound of the float64 truth."""
    truth_t = torch.from_numpy(truth)
    scale = float(truth_t.abs().max())
    tol = fp32_reorder_tolerance(scale, FAN_IN, depth)
    err = float((ours.double() - truth_t).abs().max())
    return None if err <= tol else f"max |ours - truth| {err:.3e} > {tol:.3e} (scale {scale:.2f}, depth {depth})"


def e4e_violation(enc, golden, name: str = "astronaut") -> str | None:
    return violation(E.encode(enc, face(golden, name)), golden[f"e4e/{name}"], E4E_DEPTH)


def restyle_violation(enc, G, golden, name: str = "astronaut", iterations: int | None = None) -> str | None:
    n = iterations or golden["meta"]["restyle_iters"]
    ours = E.encode(enc, face(golden, name), G=G, iterations=n)
    return violation(ours, golden[f"restyle/{name}"][n - 1], RESTYLE_DEPTH_PER_ITER * n)


# ---------------------------------------------------------------------------- the golden file itself


def test_golden_file_is_small_and_complete(golden):
    assert GOLDEN_PATH.stat().st_size < 1_000_000
    meta = golden["meta"]
    assert meta["size"] == P.SIZE and meta["restyle_iters"] == P.RESTYLE_ITERS
    for name in ("astronaut", "synthetic"):
        assert golden[f"faces/{name}"].dtype == np.uint8
        assert golden[f"e4e/{name}"].shape == (1, 8, 512)
        assert golden[f"restyle/{name}"].shape == (P.RESTYLE_ITERS, 1, 8, 512)
    assert golden["faces/astronaut"].shape[1] > 256 > golden["faces/synthetic"].shape[1]  # shrinks and grows
    np.testing.assert_array_equal(golden["faces/astronaut"], P.faces()["astronaut"])


def test_encoder_input_is_the_authors_transform_bit_for_bit(golden):
    """sha256 of pti's [1,3,256,256] input == that of torchvision's Resize/ToTensor/Normalize on the same face."""
    for name in ("astronaut", "synthetic"):
        x = E.encoder_input(face(golden, name))
        assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
        assert P.checksum(x[0]) == golden["meta"]["input_sha"][name], name


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["astronaut", "synthetic"])
def test_e4e_codes_match_the_authors(golden, loaded, name):
    enc = loaded["e4e"]
    assert (enc.kind, enc.num_ws, enc.w_dim, enc.stylegan_size, enc.decoder) == ("e4e", 8, 512, 32, (32, 512))
    assert e4e_violation(enc, golden, name) is None


def test_e4e_batch_gives_each_face_its_codes(golden, loaded):
    faces = torch.cat([face(golden, "astronaut")] * 2)
    codes = E.encode(loaded["e4e"], faces)
    assert codes.shape == (2, 8, 512)
    assert violation(codes[1:], golden["e4e/astronaut"], E4E_DEPTH) is None


def test_e4e_without_start_from_latent_avg_uses_codes_as_predicted(tmp_path, golden, states, decoder):
    path = tmp_path / "raw.pt"
    torch.save(P.checkpoint("e4e", states["e4e"], decoder, {"start_from_latent_avg": False}, latent_avg=False), path)
    enc = E.load_encoder(path)
    assert not enc.start_from_latent_avg
    avg = P.checkpoint("e4e", {}, decoder)["latent_avg"].double().numpy()
    ours = E.encode(enc, face(golden, "astronaut"))
    assert violation(ours, golden["e4e/astronaut"] - avg, E4E_DEPTH) is None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["astronaut", "synthetic"])
def test_restyle_codes_match_the_authors(golden, loaded, files, name):
    G = generator_from_checkpoint(files["restyle"])
    assert restyle_violation(loaded["restyle"], G, golden, name) is None


def test_restyle_first_iterations_match_the_authors(golden, loaded, files):
    enc = loaded["restyle"]
    assert (enc.kind, enc.num_ws, enc.stylegan_size) == ("restyle", 8, 32)
    G = generator_from_checkpoint(files["restyle"])
    assert restyle_violation(enc, G, golden, "astronaut", iterations=1) is None
    assert restyle_violation(enc, G, golden, "astronaut", iterations=2) is None


# ---------------------------------------------------------------------------- wrong encoders fail it


def _nearest_resize(images):
    from PIL import Image

    out = [np.array(Image.fromarray(i.permute(1, 2, 0).numpy()).resize((256, 256), Image.NEAREST)) for i in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)


def _bilinear_no_antialias(images):
    x = F.interpolate(images.float(), size=(256, 256), mode="bilinear", align_corners=False, antialias=False)
    return x.round().clamp(0, 255).div(255).sub(0.5).div(0.5)


E4E_MUTANTS = {
    "latent_avg not added": lambda m, enc: m.setattr(enc, "start_from_latent_avg", False),
    "fine styles read p2": lambda m, enc: m.setattr(E, "MIDDLE", 8),
    "middle styles read c3": lambda m, enc: m.setattr(E, "COARSE", 4),
    "nearest resize": lambda m, enc: m.setattr(E, "encoder_input", _nearest_resize),
    "bilinear resize without antialias": lambda m, enc: m.setattr(E, "encoder_input", _bilinear_no_antialias),
    "upsample_add align_corners=False": lambda m, enc: m.setattr(
        E, "upsample_add", lambda x, y: F.interpolate(x, size=y.shape[-2:], mode="bilinear") + y
    ),
    "no squeeze-excitation": lambda m, enc: m.setattr(E.SEModule, "forward", lambda self, x: x),
    "BatchNorm on batch statistics": lambda m, enc: torch.nn.Module.train(enc.net, True),
    "LeakyReLU slope 0.2 in the style blocks": lambda m, enc: m.setattr(
        torch.nn.LeakyReLU, "forward", lambda self, x: F.leaky_relu(x, 0.2)
    ),
}


@pytest.mark.parametrize("mutant", list(E4E_MUTANTS))
def test_wrong_e4e_fails_golden(golden, files, mutant, monkeypatch):
    enc = E.load_encoder(files["e4e"])
    E4E_MUTANTS[mutant](monkeypatch, enc)
    assert e4e_violation(enc, golden) is not None, f"the golden test did not notice: {mutant}"


def _black_first_image(render):
    calls = []

    def wrong(G, codes):
        calls.append(1)
        img = render(G, codes)
        return torch.zeros_like(img) if len(calls) == 1 else img

    return wrong


RESTYLE_MUTANTS = {
    "no average-image start (black)": lambda m, enc: m.setattr(E, "_render_256", _black_first_image(E._render_256)),
    # (pooling 32 px up to 256 replicates pixels, which is what nearest does, so that is no mutant here)
    "reconstruction resized bilinearly": lambda m, enc: m.setattr(
        E,
        "_render_256",
        lambda G, c: F.interpolate(G.synthesis(c, noise_mode="const", force_fp32=True), (256, 256), mode="bilinear"),
    ),
    "random noise in the renders": lambda m, enc: m.setattr(
        E, "_render_256", lambda G, c: F.adaptive_avg_pool2d(G.synthesis(c, noise_mode="random"), (256, 256))
    ),
    "no squeeze-excitation": lambda m, enc: m.setattr(E.SEModule, "forward", lambda self, x: x),
}


@pytest.mark.parametrize("mutant", list(RESTYLE_MUTANTS))
def test_wrong_restyle_fails_golden(golden, files, mutant, monkeypatch):
    enc = E.load_encoder(files["restyle"])
    G = generator_from_checkpoint(files["restyle"])
    RESTYLE_MUTANTS[mutant](monkeypatch, enc)
    assert restyle_violation(enc, G, golden, iterations=2) is not None, f"the golden test did not notice: {mutant}"


# ---------------------------------------------------------------------------- refusals


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and text
    return text


def few(states, kind: str) -> dict:
    """The input layer alone: enough for the refusals that come before the weights are checked."""
    return {k: v for k, v in states[kind].items() if k.startswith("input_layer.")}


def test_missing_latent_avg_is_refused(tmp_path, states, decoder):
    for kind in E.ENCODER_KINDS:
        path = tmp_path / f"{kind}.pt"
        torch.save(P.checkpoint(kind, few(states, kind), decoder, latent_avg=False), path)
        with pytest.raises(CheckpointError) as e:
            E.load_encoder(path)
        assert "has no latent_avg" in one_line(e)


class Hostile:
    """Unpickling this would create a file; a weights-only load must refuse it before that."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_with_pickled_classes_is_refused(tmp_path, states, decoder):
    marker = tmp_path / "ran"
    ckpt = P.checkpoint("e4e", {}, decoder)
    ckpt["opts"]["hook"] = Hostile(str(marker))
    torch.save(ckpt, tmp_path / "hostile.pt")
    with pytest.raises(CheckpointError) as e:
        E.load_encoder(tmp_path / "hostile.pt")
    assert "pickled code or classes" in one_line(e) and "hostile.pt" in str(e.value)
    assert not marker.exists()


def test_not_a_checkpoint_is_refused(tmp_path):
    torch.save({"g_ema": {}}, tmp_path / "gen.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    for name, words in (("gen.pt", "state_dict"), ("junk.pt", "not a readable"), ("absent.pt", "does not exist")):
        with pytest.raises(CheckpointError) as e:
            E.load_encoder(tmp_path / name)
        assert words in one_line(e)


def test_other_encoder_types_and_wrong_kind_are_refused(tmp_path, files, states, decoder):
    torch.save(
        P.checkpoint("e4e", few(states, "e4e"), decoder, {"encoder_type": "GradualStyleEncoder"}), tmp_path / "p.pt"
    )
    with pytest.raises(CheckpointError) as e:
        E.load_encoder(tmp_path / "p.pt")
    assert "GradualStyleEncoder" in one_line(e)
    with pytest.raises(CheckpointError) as e:
        E.load_encoder(files["e4e"], kind="restyle")
    assert "not ReStyle" in one_line(e)


def test_kind_is_told_by_the_input_layer_without_encoder_type(tmp_path, states, decoder):
    for kind in E.ENCODER_KINDS:
        ckpt = P.checkpoint(kind, few(states, kind), decoder)
        del ckpt["opts"]["encoder_type"]
        torch.save(ckpt, tmp_path / f"{kind}.pt")
        with pytest.raises(CheckpointError) as e:  # the kind is told, then the (few) weights do not fit it
            E.load_encoder(tmp_path / f"{kind}.pt")
        assert ("ReStyle-e4e encoder" if kind == "restyle" else "e4e encoder") in one_line(e)


def test_weights_of_another_shape_are_refused(tmp_path, states, decoder):
    bad = dict(states["e4e"])
    bad["styles.0.linear.weight"] = bad["styles.0.linear.weight"][:, :256]
    del bad["latlayer2.bias"]
    torch.save(P.checkpoint("e4e", bad, decoder), tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        E.load_encoder(tmp_path / "bad.pt")
    assert "missing" in one_line(e) and "wrong shape" in str(e.value)


def test_flat_latent_avg_is_repeated_per_layer(tmp_path, states, decoder, golden):
    ckpt = P.checkpoint("e4e", states["e4e"], decoder)
    ckpt["latent_avg"] = ckpt["latent_avg"][0].clone()  # [512], as a generator's mean w
    torch.save(ckpt, tmp_path / "flat.pt")
    enc = E.load_encoder(tmp_path / "flat.pt")
    assert enc.latent_avg.shape == (8, 512)
    assert e4e_violation(enc, golden) is None


def big_decoder(size: int = 64) -> Generator:
    return Generator(**dict(P.DECODER_CONFIG, img_resolution=size)).eval()


def test_encoder_for_another_generator_is_refused(loaded):
    for G in (big_decoder(64), Generator(**dict(P.DECODER_CONFIG, w_dim=256, z_dim=256))):
        with pytest.raises(CheckpointError) as e:
            E.check_encoder_fits(loaded["e4e"], G)
        assert "another generator" in one_line(e)
    E.check_encoder_fits(loaded["e4e"], big_decoder(32))  # the same shape of generator fits


def test_decoder_of_another_size_is_refused(tmp_path, states):
    torch.save(P.checkpoint("e4e", few(states, "e4e"), big_decoder(64)), tmp_path / "d64.pt")
    with pytest.raises(CheckpointError) as e:
        E.load_encoder(tmp_path / "d64.pt")  # opts say 32 px, the decoder is 64
    assert "64 px" in one_line(e)


def test_restyle_needs_a_fitting_generator(golden, loaded):
    with pytest.raises(CheckpointError):
        E.encode(loaded["restyle"], face(golden, "synthetic"), G=big_decoder(64), iterations=1)
    with pytest.raises(ValueError):
        E.encode(loaded["restyle"], face(golden, "synthetic"), G=None)


def test_encoder_stays_in_eval_mode(loaded):
    enc = loaded["e4e"]
    enc.train()
    assert not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())


# ---------------------------------------------------------------------------- the authors' code, live

LIVE = [os.environ.get(v) for v in ("PTI_E4E_PATH", "PTI_RESTYLE_PATH", "PTI_ROSINALITY_PATH")]


@pytest.mark.slow
@pytest.mark.skipif(not all(LIVE), reason="set PTI_E4E_PATH, PTI_RESTYLE_PATH and PTI_ROSINALITY_PATH to checkouts")
def test_side_by_side_with_the_authors_code(golden, files, loaded):
    e4e_path, restyle_path, rosinality_path = LIVE
    tv = os.environ.get("PTI_TORCHVISION_PATH")
    faces = {"astronaut": golden["faces/astronaut"]}
    theirs = P.run_e4e(e4e_path, rosinality_path, tv, files["e4e"], faces)["astronaut"]
    ours = E.encode(loaded["e4e"], face(golden, "astronaut"))
    assert violation(ours, theirs.double().numpy(), E4E_DEPTH) is None
    theirs = P.run_restyle(restyle_path, rosinality_path, tv, files["restyle"], faces)["astronaut"]
    G = generator_from_checkpoint(files["restyle"])
    ours = E.encode(loaded["restyle"], face(golden, "astronaut"), G=G, iterations=P.RESTYLE_ITERS)
    assert violation(ours, theirs[-1].double().numpy(), RESTYLE_DEPTH_PER_ITER * P.RESTYLE_ITERS) is None
