"""`pti render --paste`: a tuned person's outputs pasted back into the original photo, through the console script.

One astronaut photo is tuned once (a few steps on the built-in generator: the reconstruction is poor, which makes
the inside-the-mask bound below a real one). What is checked:
- the identity (format v3) records how the face was cut: the FFHQ quad and landmarks dlib gives for the photo;
- outside the paste mask the pasted photo is the original, byte for byte (a lossless format), and inside it the
  pasted reconstruction is within the tuned reconstruction's own error of the original, pointwise: bilinear
  warping is a convex combination, so |paste(recon) - paste(aligned)| <= alpha * warp(|recon - aligned|) + 1;
- a JPEG stays JPEG at the photo's size (with a warning saying it re-encodes), --paste-format png keeps the bytes;
- every refusal is one line: another photo, the photo gone, --no-align, an identity without the record.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

import pti
from clirun import one_line_error, run_pti, succeeded
from pti.engine import paste as P
from pti.engine.align import detect_faces, face_quad
from pti.engine.identity import VERSION, Identity

STEPS = ["--invert-steps", "3", "--tune-steps", "3"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("paste")
    photo = root / "astro.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    succeeded(run_pti("tune", photo, *STEPS, "-o", root / "out"))
    return root, photo, root / "out" / "astro.pti"


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_identity_records_the_cut(tuned):
    _, photo, identity = tuned
    ident = Identity.load(identity)
    rec = ident.alignment
    assert VERSION == 3 and rec is not None and rec["aligned"] is True
    face = detect_faces(Image.open(photo).convert("RGB"))[0]
    assert np.array_equal(np.asarray(rec["landmarks"]), face.landmarks)
    assert np.array_equal(np.asarray(rec["quad"]), face_quad(face.landmarks)[0])
    assert rec["photo_size"] == [512, 512] and rec["face"] == 0 and rec["output_size"] == 64
    assert rec["photo_sha256"] == ident.meta["photo_sha256"]
    info = run_pti("info", identity)
    assert "yes: face 0 cut from the 512x512 photo" in succeeded(info).stdout


def test_paste_keeps_the_photo_outside_the_mask_and_the_reconstruction_error_inside(tuned):
    root, photo, identity = tuned
    out = root / "plain"
    proc = succeeded(run_pti("render", identity, "--paste", "-o", out))
    assert "pasted into" in proc.stdout and "reconstruction_pasted.png" in proc.stdout
    pasted, original = _read(out / "reconstruction_pasted.png"), _read(photo)
    assert pasted.shape == original.shape
    rec = Identity.load(identity).alignment
    quad, landmarks = np.asarray(rec["quad"]), np.asarray(rec["landmarks"])
    alpha, box = P.face_mask(landmarks, quad, original.shape[:2])
    full = np.zeros(original.shape[:2], np.float32)
    full[box[1] : box[3], box[0] : box[2]] = alpha
    outside = full == 0
    assert outside.mean() > 0.8  # the face is a small part of the photo
    assert np.array_equal(pasted[outside], original[outside])
    assert not np.array_equal(pasted[~outside], original[~outside])  # the (poor) reconstruction went in
    # Inside: the pasted reconstruction vs the pasted aligned crop (what was tuned to), pointwise.
    folder = root / "out" / "astro"
    recon, aligned = _read(folder / "reconstruction.png"), _read(folder / "aligned.png")
    assert np.array_equal(recon, _read(out / "reconstruction.png"))
    pasted_target = P.paste(original, aligned, quad, landmarks).image
    diff = np.abs(recon.astype(np.float32) - aligned.astype(np.float32))
    warped_diff, _, _ = P.warp_to_photo(diff, quad, original.shape[:2], box)
    bound = full[box[1] : box[3], box[0] : box[2], None] * warped_diff + 1.0  # + 1: two roundings of half a level
    gap = np.abs(pasted.astype(np.float32) - pasted_target.astype(np.float32))[box[1] : box[3], box[0] : box[2]]
    assert (gap <= bound + 1e-3).all(), float((gap - bound).max())
    # The API gives the same pixels.
    result = pti.render(identity, [], root / "api", paste=True, device="cpu")
    assert np.array_equal(result.pasted[0], pasted)
    report = json.loads((out / "render.json").read_text())
    assert report["paste"]["photo_sha256"] == rec["photo_sha256"] and report["paste"]["exact_outside_mask"]


@pytest.mark.slow
def test_jpeg_stays_jpeg_and_png_is_exact(tmp_path):
    photo = tmp_path / "me.jpg"
    Image.fromarray(skimage_data.astronaut()).save(photo, quality=92)
    succeeded(run_pti("tune", photo, *STEPS, "-o", tmp_path / "out"))
    identity = tmp_path / "out" / "me.pti"
    proc = succeeded(run_pti("render", identity, "--paste", "--compare", "-o", tmp_path / "r"))
    assert "JPEG" in proc.stdout and "--paste-format png" in proc.stdout
    with Image.open(tmp_path / "r" / "reconstruction_pasted.jpg") as img:
        assert img.format == "JPEG" and img.size == (512, 512)
    assert (tmp_path / "r" / "compare_pasted.png").is_file()
    succeeded(run_pti("render", identity, "--paste", "--paste-format", "png", "-o", tmp_path / "p"))
    pasted, original = _read(tmp_path / "p" / "reconstruction_pasted.png"), _read(photo)
    rec = Identity.load(identity).alignment
    result = P.paste(original, _read(tmp_path / "p" / "reconstruction.png"), rec["quad"], rec["landmarks"])
    assert np.array_equal(pasted, result.image)
    outside = result.full_alpha() == 0
    assert np.array_equal(pasted[outside], original[outside])


def test_refusals_are_one_line(tuned, tmp_path):
    root, photo, identity = tuned
    other = tmp_path / "other.png"
    Image.fromarray(np.ascontiguousarray(skimage_data.astronaut()[:, ::-1])).save(other)
    line = one_line_error(run_pti("render", identity, "--paste", "--photo", other, "-o", tmp_path / "a"))
    assert "is not the photo astro.pti was tuned from" in line
    assert not (tmp_path / "a").exists()  # refused before anything was written
    assert "add --paste" in run_pti("render", identity, "--photo", photo, "-o", tmp_path / "b").stderr
    # The photo moved away: the recorded path is gone; --photo names it.
    moved = tmp_path / "moved" / "astro.png"
    moved.parent.mkdir()
    copy = tmp_path / "copy"
    shutil.copytree(root / "out", copy)
    shutil.copy(photo, moved)
    ident = Identity.load(copy / "astro.pti")
    ident.meta["photo_path"] = ident.meta["photo"] = str(tmp_path / "gone.png")
    ident.save(copy / "astro.pti")
    line = one_line_error(run_pti("render", copy / "astro.pti", "--paste", "-o", tmp_path / "c"))
    assert "is not there; pass it with --photo" in line
    succeeded(run_pti("render", copy / "astro.pti", "--paste", "--photo", moved, "-o", tmp_path / "d"))
    # No record of the cut (an identity from before format v3, or imported).
    del ident.meta["alignment"]
    ident.save(copy / "old.pti")
    line = one_line_error(run_pti("render", copy / "old.pti", "--paste", "-o", tmp_path / "e"))
    assert "how the face was cut from the photo is not known" in line


def test_no_align_identity_cannot_be_pasted(tmp_path):
    crop = tmp_path / "crop.png"
    Image.fromarray(skimage_data.astronaut()[0:256, 100:356]).save(crop)
    succeeded(run_pti("tune", crop, "--no-align", *STEPS, "-o", tmp_path / "out"))
    assert Identity.load(tmp_path / "out" / "crop.pti").alignment == {"aligned": False}
    line = one_line_error(run_pti("render", tmp_path / "out" / "crop.pti", "--paste", "-o", tmp_path / "r"))
    assert "--no-align" in line


def test_stitch_tunes_the_border_and_keeps_the_photo_outside(tuned):
    root, photo, identity = tuned
    out = root / "stitched"
    proc = succeeded(run_pti("render", identity, "--paste", "--stitch", "--stitch-steps", "4", "-o", out))
    assert "reconstruction_stitched.png" in proc.stdout
    report = json.loads((out / "render.json").read_text())
    (rec,) = report["paste"]["stitch"]["outputs"]
    assert rec["steps"] >= 1 and rec["band_mse_after"] < rec["band_mse_before"], rec
    pasted, original = _read(out / "reconstruction_pasted.png"), _read(photo)
    plain = _read(root / "plain" / "reconstruction_pasted.png") if (root / "plain").is_dir() else None
    ident = Identity.load(identity).alignment
    result = P.paste(original, _read(out / "reconstruction_stitched.png"), ident["quad"], ident["landmarks"])
    assert np.array_equal(pasted, result.image)
    outside = result.full_alpha() == 0
    assert np.array_equal(pasted[outside], original[outside])
    if plain is not None:
        assert not np.array_equal(pasted, plain)
    usage = run_pti("render", identity, "--stitch", "-o", root / "x")
    assert usage.returncode == 2 and "add --paste" in usage.stderr


def test_an_identity_from_format_v2_renders_but_cannot_be_pasted(tuned, tmp_path):
    """A real v2 file (no alignment record, version "2", its own checksum) still renders; --paste says why not."""
    import safetensors.torch
    from safetensors import safe_open

    from pti.engine.identity import CHECKSUM, checksum

    _, _, identity = tuned
    with safe_open(str(identity), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["meta"])
    del meta["alignment"]
    header.update(version="2", meta=json.dumps(meta))
    header[CHECKSUM] = checksum(tensors, header)
    old = tmp_path / "old.pti"
    safetensors.torch.save_file(tensors, str(old), metadata=header)
    assert "pti-identity v2" in succeeded(run_pti("info", old)).stdout
    succeeded(run_pti("render", old, "-o", tmp_path / "plain"))
    line = one_line_error(run_pti("render", old, "--paste", "-o", tmp_path / "pasted"))
    assert "older pti" in line and "re-run pti tune" in line


@pytest.mark.slow
def test_a_photo_with_alpha_and_a_colour_profile(tmp_path):
    """An RGBA PNG with an ICC profile: the pasted photo keeps the profile and says it is RGB now."""
    rgba = np.dstack([skimage_data.astronaut(), np.full((512, 512), 255, np.uint8)])
    photo = tmp_path / "alpha.png"
    profile = b"not a real profile, but kept as it is" * 4
    Image.fromarray(rgba, "RGBA").save(photo, icc_profile=profile)
    succeeded(run_pti("tune", photo, *STEPS, "-o", tmp_path / "out"))
    proc = succeeded(run_pti("render", tmp_path / "out" / "alpha.pti", "--paste", "-o", tmp_path / "r"))
    assert "is RGBA, not 8-bit RGB" in proc.stdout
    with Image.open(tmp_path / "r" / "reconstruction_pasted.png") as img:
        assert img.mode == "RGB" and img.info.get("icc_profile") == profile
