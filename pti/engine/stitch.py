"""Stitching tuning (the idea of STIT, Tzaban et al. 2022): per frame, briefly tune a copy of the person's generator
so that the band around the paste mask's edge matches the original frame, while the face keeps the edit.

An edit changes more than the face: skin tone, lighting and the hair line move a little, and at the mask's
feathered edge the pasted crop meets the original frame. Tuning the synthesis weights for a few steps on

    loss = MSE(render, original)  over the band  +  MSE(render, edited)  over the inner face

pulls the border of the edited render back onto the frame, so the blend has nothing to hide; the inner term
keeps the edit. The masks come from the frame's landmarks in the crop's own pixels (`crop_masks`): the inner
face is where the paste mask is 1, the band where it is below 1 (its feather) out to a ring `band` (a fraction of
the crop) beyond its edge. Adam at `lr` (STIT's stitching rate, 3e-4), at most `steps` steps, stopping once the
band's MSE is under `threshold`; the person's generator itself is never changed (a copy per frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pti.engine.config import check_fields, real, whole
from pti.engine.paste import PasteParams, face_mask, photo_to_crop_coords


@dataclass(frozen=True)
class StitchConfig:
    steps: int = 50  # at most this many Adam steps per frame
    lr: float = 3e-4  # STIT's stitching-tuning learning rate
    threshold: float = 0.002  # stop once the band's MSE (images in [-1, 1]) is below this
    band: float = 0.03  # the ring beyond the mask's edge, as a fraction of the crop's side

    def __post_init__(self):
        check_fields(
            self,
            {
                "steps": whole(1, 10_000),
                "lr": real(0, 1, above=True),
                "threshold": real(0),
                "band": real(0, 0.5),
            },
        )


def crop_masks(
    landmarks: np.ndarray, quad: np.ndarray, size: int, params: PasteParams = PasteParams(), band: float = 0.03
) -> tuple[np.ndarray, np.ndarray]:
    """(inner, band) bool [size, size] in the crop of `quad`: where the paste mask is 1, and where it is below 1
    out to `band` x size beyond its edge (its feather and a ring outside)."""
    lm = photo_to_crop_coords(landmarks, quad, size)
    frame = np.array([[-0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5], [size - 0.5, -0.5]])
    alpha = _full(*face_mask(lm, frame, (size, size), **_mask_args(params)), size)
    grown = PasteParams(min(1.0, params.dilate + band), params.feather, params.forehead)
    outer = _full(*face_mask(lm, frame, (size, size), **_mask_args(grown)), size) > 0
    return alpha >= 1.0, outer & (alpha < 1.0)


def _mask_args(params: PasteParams) -> dict:
    return {"dilate": params.dilate, "feather": params.feather, "forehead": params.forehead}


def _full(alpha: np.ndarray, box, size: int) -> np.ndarray:
    out = np.zeros((size, size), np.float32)
    x0, y0, x1, y1 = box
    out[y0:y1, x0:x1] = alpha
    return out


def stitch(
    G, ws: torch.Tensor, original: torch.Tensor, edited: torch.Tensor, inner, band, cfg: StitchConfig = StitchConfig()
) -> tuple[torch.Tensor, dict]:
    """The edited frame [1, 3, R, R] rendered by a copy of `G` tuned on the loss of the module's docstring (ws
    [1, L, C]; original, edited [1, 3, R, R] in [-1, 1]; inner, band bool [R, R]), and a record: steps, the band's
    MSE before and after, the inner face's MSE to the edit after."""
    device = next(G.parameters()).device
    G = G.clone().eval().requires_grad_(False)
    G.synthesis.requires_grad_(True)
    inner_t = torch.as_tensor(np.asarray(inner), device=device)[None, None].float()
    band_t = torch.as_tensor(np.asarray(band), device=device)[None, None].float()
    n_inner, n_band = max(1.0, float(inner_t.sum()) * 3), max(1.0, float(band_t.sum()) * 3)
    original, edited, ws = original.to(device), edited.to(device), ws.to(device)
    optimizer = torch.optim.Adam(G.synthesis.parameters(), lr=cfg.lr)
    record = {"steps": 0, "band_mse_before": None}
    for step in range(cfg.steps + 1):
        img = G.synthesis(ws, noise_mode="const", force_fp32=True)
        band_mse = ((img - original) ** 2 * band_t).sum() / n_band
        inner_mse = ((img - edited) ** 2 * inner_t).sum() / n_inner
        if record["band_mse_before"] is None:
            record["band_mse_before"] = float(band_mse.detach())
        if step == cfg.steps or float(band_mse.detach()) < cfg.threshold:
            break
        optimizer.zero_grad(set_to_none=True)
        (band_mse + inner_mse).backward()
        optimizer.step()
        record["steps"] = step + 1
    record.update(band_mse_after=float(band_mse.detach()), inner_mse_after=float(inner_mse.detach()))
    return img.detach(), record
