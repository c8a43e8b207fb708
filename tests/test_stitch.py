"""Stitching tuning (`pti.engine.stitch`): the band round the mask's edge is pulled onto the original while the
face keeps the edit, the person's generator is never changed, and the masks sit where the paste mask says.

The generator is the built-in tiny one; "original" is a render of another w (what the frame shows), "edited" the
render of the pivot (what the edit shows): the two differ everywhere, so the band has something to learn.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from pti.engine import paste as P
from pti.engine.align import detect_faces, face_quad
from pti.engine.generator import tiny_generator
from pti.engine.stitch import StitchConfig, crop_masks, stitch


@pytest.fixture(scope="module")
def scene():
    G = tiny_generator()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        ws = G.mapping(torch.randn(1, G.z_dim, generator=g), truncation_psi=0.7)
        other = G.mapping(torch.randn(1, G.z_dim, generator=g), truncation_psi=0.7)
        edited = G.synthesis(ws, noise_mode="const", force_fp32=True)
        original = G.synthesis(other, noise_mode="const", force_fp32=True)
    size = G.img_resolution
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(xx - size / 2 + 0.5, yy - size / 2 + 0.5)
    inner, band = r < size * 0.25, (r >= size * 0.3) & (r < size * 0.45)
    return G, ws, original, edited, inner, band


def _masked_mse(img, ref, mask) -> float:
    m = torch.as_tensor(mask)[None, None].float()
    return float(((img - ref) ** 2 * m).sum() / (m.sum() * 3))


def test_the_band_moves_onto_the_original_and_the_face_keeps_the_edit(scene):
    G, ws, original, edited, inner, band = scene
    before = {k: v.clone() for k, v in G.state_dict().items()}
    img, rec = stitch(G, ws, original, edited, inner, band, StitchConfig(steps=30, lr=3e-3, threshold=0.0))
    assert rec["steps"] == 30
    start = _masked_mse(edited, original, band)
    assert rec["band_mse_before"] == pytest.approx(start, rel=1e-5)
    assert rec["band_mse_after"] == pytest.approx(_masked_mse(img, original, band), rel=1e-5)
    assert rec["band_mse_after"] < 0.5 * start, rec  # the band learned the original
    assert rec["inner_mse_after"] < 0.25 * _masked_mse(original, edited, inner)  # the face stayed the edit
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in before.items())  # a copy was tuned, not G


def test_no_band_term_means_no_pull(scene):
    """Without the band term (an empty band) the loss only holds the face: the band does not move towards the
    original. Guards against a loss that compares the band with the wrong image."""
    G, ws, original, edited, inner, band = scene
    img, rec = stitch(G, ws, original, edited, inner, np.zeros_like(band), StitchConfig(steps=30, lr=3e-3))
    assert _masked_mse(img, original, band) > 0.8 * _masked_mse(edited, original, band)


def test_a_band_already_matching_stops_at_once(scene):
    G, ws, original, edited, inner, band = scene
    img, rec = stitch(G, ws, original, edited, inner, band, StitchConfig(threshold=1e9))
    assert rec["steps"] == 0 and torch.equal(img, edited)


def test_crop_masks_follow_the_paste_mask():
    photo = skimage_data.astronaut()
    face = detect_faces(Image.fromarray(photo))[0]
    quad, _ = face_quad(face.landmarks)
    size = 128
    inner, band = crop_masks(face.landmarks, quad, size, band=0.05)
    assert inner.any() and band.any() and not (inner & band).any()
    lm = P.photo_to_crop_coords(face.landmarks, quad, size)
    nose = np.rint(lm[27:36]).astype(int)
    assert inner[nose[:, 1], nose[:, 0]].all()  # the face's middle is inner
    # The band holds the paste mask's feather: every crop pixel whose alpha is strictly between 0 and 1.
    frame = np.array([[-0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5], [size - 0.5, -0.5]])
    alpha, box = P.face_mask(lm, frame, (size, size))
    full = np.zeros((size, size), np.float32)
    full[box[1] : box[3], box[0] : box[2]] = alpha
    feather = (full > 0) & (full < 1)
    assert band[feather].all()
    assert band.sum() > feather.sum()  # and a ring beyond it
    with pytest.raises(ValueError, match="StitchConfig.steps"):
        StitchConfig(steps=0)
