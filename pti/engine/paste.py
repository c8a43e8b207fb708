"""Paste an aligned face crop back into the photo it came from.

`align_face` maps the photo's quad (TL, BL, BR, TR) onto an R x R crop; pasting runs that map backwards:

- The geometry (`crop_to_photo_coords`, `photo_to_crop_coords`). With pixel centres at integers in both
  images, photo point p and crop point k are related by
      p = TL + ((k_x + 0.5) / R) * (TR - TL) + ((k_y + 0.5) / R) * (BL - TL),
  so the crop's outer edge (k = -0.5 and R - 0.5) is exactly the quad in photo coordinates, whatever R is.
- The warp (`warp_to_photo`): every photo pixel of a box looks up its point in the crop, bilinearly. A crop
  denser than the photo (quad side < R photo pixels) is first Lanczos-downsampled to about the quad side, so
  the bilinear lookup does not alias (it would otherwise skip crop pixels).
- The mask (`face_mask`): the convex hull of the jaw line and the eyebrows, with the eyebrows also raised over
  the forehead, grown by `dilate` and feathered inwards by `feather`. Its ramp is a smoothstep of the exact
  Euclidean distance to the hull, so alpha is exactly 0 beyond the grown hull (compact support: a Gaussian blur's
  tails never reach 0, and would touch every pixel of the photo) and exactly 1 deep inside. A second ramp takes
  it to 0 at the crop's edge, so nothing from outside the crop (align_face's padding) is ever pasted.
- The blend (`paste`): the result is a copy of the photo, written only where alpha > 0, so every other pixel
  keeps the photo's bytes bit for bit; all the work happens in the mask's box, so a large photo costs only the
  face's area.

Landmarks and quads may be floats (smoothed over the frames of a video): nothing here rounds them.
The work is numpy, scipy and Pillow; torch comes in only with `pti.engine.config`'s field rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage
from PIL import Image

from pti.engine.config import check_fields, real

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in photo pixels, x1 and y1 exclusive

MIN_DOWNSAMPLED = 8  # the smallest crop side the warp downsamples to


@dataclass(frozen=True)
class PasteParams:
    """The paste mask's shape; lengths are fractions of the quad side `qsize` (about 4x the eye distance), so
    one setting fits every face size.

    Defaults: the hull of jaw and brows already covers the face; 2% of qsize (about a tenth of the eye distance)
    grows it past the jaw line's landmark jitter, and a 6% feather (a quarter of the eye distance) hides the seam
    in the cheeks without reaching the eyes, nose or mouth (they sit well over 6% of qsize inside the hull).
    Raising the brows by 0.6 of the eye-to-mouth distance covers the forehead up to about the hairline.
    """

    dilate: float = 0.02  # grow the hull outwards by this much of qsize (alpha > 0 up to there)
    feather: float = 0.06  # the ramp from 0 to 1 runs this much of qsize inwards from the grown hull
    forehead: float = 0.6  # raise the eyebrows by this much of the eye-to-mouth distance, along the face's up

    def __post_init__(self):
        check_fields(
            self,
            {
                "dilate": real(0.0, 1.0),
                "feather": real(0.0, 1.0, above=True),
                "forehead": real(0.0, 3.0),
            },
        )


@dataclass(frozen=True)
class PasteResult:
    """`image`: the photo with the face pasted, uint8 [H, W, 3]. `alpha`: the mask over `box` only, float32
    [y1 - y0, x1 - x0] (0 everywhere outside the box); `full_alpha()` spreads it over the photo."""

    image: np.ndarray
    alpha: np.ndarray
    box: Box

    def full_alpha(self) -> np.ndarray:
        """The mask over the whole photo, float32 [H, W]."""
        out = np.zeros(self.image.shape[:2], np.float32)
        x0, y0, x1, y1 = self.box
        out[y0:y1, x0:x1] = self.alpha
        return out


# ---------------------------------------------------------------------------- geometry


def _axes(quad: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The quad's TL corner and its two edges, TR - TL (the crop's x) and BL - TL (the crop's y)."""
    q = np.asarray(quad, dtype=np.float64).reshape(4, 2)
    return q[0], q[3] - q[0], q[1] - q[0]


def quad_side(quad: np.ndarray) -> float:
    """The quad's side length in photo pixels (the mean of its two edges: a square from `face_quad`)."""
    _, ex, ey = _axes(quad)
    return float((np.hypot(*ex) + np.hypot(*ey)) / 2)


def crop_to_photo_coords(points_k: np.ndarray, quad: np.ndarray, R: int) -> np.ndarray:
    """Photo points [N, 2] (x, y) of crop points [N, 2] in an R x R crop of `quad`."""
    origin, ex, ey = _axes(quad)
    uv = (np.asarray(points_k, dtype=np.float64).reshape(-1, 2) + 0.5) / R
    return origin + uv[:, :1] * ex + uv[:, 1:] * ey


def photo_to_crop_coords(points_p: np.ndarray, quad: np.ndarray, R: int) -> np.ndarray:
    """Crop points [N, 2] (x, y) in an R x R crop of `quad` of photo points [N, 2]; the inverse map."""
    origin, ex, ey = _axes(quad)
    inv = np.linalg.inv(np.stack([ex, ey], axis=1))  # [ex ey] @ (u, v) = p - TL
    uv = (np.asarray(points_p, dtype=np.float64).reshape(-1, 2) - origin) @ inv.T
    return uv * R - 0.5


def _grid_to_crop(xs: np.ndarray, ys: np.ndarray, quad: np.ndarray, R: int) -> tuple[np.ndarray, np.ndarray]:
    """`photo_to_crop_coords` of the grids xs, ys [h, w]: the crop's (k_x, k_y) grids, without stacking points."""
    origin, ex, ey = _axes(quad)
    inv = np.linalg.inv(np.stack([ex, ey], axis=1)) * R
    dx, dy = xs - origin[0], ys - origin[1]
    return inv[0, 0] * dx + inv[0, 1] * dy - 0.5, inv[1, 0] * dx + inv[1, 1] * dy - 0.5


def _quad_box(quad: np.ndarray, photo_shape: tuple[int, int]) -> Box:
    """The pixels the quad covers: its bounding box (pixel centres inside it), clipped to the photo."""
    q = np.asarray(quad, dtype=np.float64).reshape(4, 2)
    h, w = photo_shape[:2]
    lo, hi = np.ceil(q.min(axis=0)).astype(int), np.floor(q.max(axis=0)).astype(int) + 1
    return _clip_box((lo[0], lo[1], hi[0], hi[1]), (h, w))


def _clip_box(box: Box, photo_shape: tuple[int, int]) -> Box:
    h, w = photo_shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0 = min(max(x0, 0), w), min(max(y0, 0), h)
    return x0, y0, max(min(x1, w), x0), max(min(y1, h), y0)


def _box_points(box: Box) -> tuple[np.ndarray, np.ndarray]:
    """The photo pixel centres of `box` as two [h, w] float64 grids (x, y)."""
    x0, y0, x1, y1 = box
    return np.meshgrid(np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64))


# ---------------------------------------------------------------------------- the warp


def _downsample(crop: np.ndarray, size: int) -> np.ndarray:
    """`crop` [R, R, C] Lanczos-resized to size x size (float32); uint8 crops resize as RGB, others per channel."""
    if crop.dtype == np.uint8 and crop.shape[2] == 3:
        return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.LANCZOS), np.float32)
    chans = [
        np.asarray(
            Image.fromarray(crop[..., c].astype(np.float32), mode="F").resize((size, size), Image.Resampling.LANCZOS)
        )
        for c in range(crop.shape[2])
    ]
    return np.stack(chans, axis=-1).astype(np.float32)


def warp_to_photo(
    crop: np.ndarray, quad: np.ndarray, photo_shape: tuple[int, int], box: Box | None = None
) -> tuple[np.ndarray, np.ndarray, Box]:
    """The crop [R, R, C] (uint8 or float) resampled into photo pixels over `box` (default: the quad's bounding
    box, clipped to the photo): (float32 [h, w, C], valid [h, w] bool, box). Bilinear; edge pixels extend to the
    crop's outer edge. `valid` marks photo pixels whose point lies inside the crop (the quad)."""
    crop = np.asarray(crop)
    if crop.ndim != 3 or crop.shape[0] != crop.shape[1]:
        raise ValueError(f"crop must be a square [R, R, C] array, got shape {crop.shape}")
    R = crop.shape[0]
    box = _quad_box(quad, photo_shape) if box is None else _clip_box(box, photo_shape)
    side = quad_side(quad)
    src = crop.astype(np.float32)
    if side < R:  # denser than the photo: a lookup at one point per photo pixel would skip crop pixels
        R = min(R, max(MIN_DOWNSAMPLED, int(round(side))))
        src = _downsample(crop, R)
    xs, ys = _box_points(box)
    kx, ky = _grid_to_crop(xs, ys, quad, R)
    valid = (kx >= -0.5) & (kx <= R - 0.5) & (ky >= -0.5) & (ky <= R - 0.5)
    coords = [ky, kx]  # map_coordinates indexes (row, column)
    out = np.stack(
        [scipy.ndimage.map_coordinates(src[..., c], coords, order=1, mode="nearest") for c in range(src.shape[2])],
        axis=-1,
    )
    return out.astype(np.float32), valid, box


# ---------------------------------------------------------------------------- the mask


def mask_polygon(landmarks: np.ndarray, quad: np.ndarray, forehead: float = PasteParams.forehead) -> np.ndarray:
    """The convex polygon [N, 2] the mask grows from (counter-clockwise on screen): the hull of the jaw line (dlib
    points 0-16), the eyebrows (17-26) and the eyebrows raised by `forehead` x the eye-to-mouth distance along
    the face's up (the quad's BL -> TL direction, which follows the face's roll)."""
    lm = np.asarray(landmarks, dtype=np.float64).reshape(68, 2)
    _, _, ey = _axes(quad)
    up = -ey / np.hypot(*ey)
    eye_mouth = np.hypot(*((lm[48] + lm[54]) / 2 - (lm[36:42].mean(0) + lm[42:48].mean(0)) / 2))
    brows = lm[17:27]
    return _convex_hull(np.concatenate([lm[0:17], brows, brows + up * (forehead * eye_mouth)]))


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain; the hull's vertices in order, collinear points dropped."""
    pts = sorted(map(tuple, np.asarray(points, dtype=np.float64)))

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def chain(seq):
        out: list[tuple[float, float]] = []
        for p in seq:
            while len(out) >= 2 and cross(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    return np.array(chain(pts) + chain(reversed(pts)))


def _signed_distance(xs: np.ndarray, ys: np.ndarray, poly: np.ndarray, upto: float) -> np.ndarray:
    """Euclidean distance of the points to the boundary of the convex polygon, negative inside: exact wherever it
    is below `upto`, and some value >= `upto` elsewhere.

    The largest signed distance to the edges' lines is exact inside a convex polygon and a lower bound outside;
    only where it falls in (0, upto) is the exact outside distance, the nearest of the point-to-segment
    distances, worked out (a thin band around the hull, so a large face costs little more than a small one)."""
    orient = np.sign(_area2(poly))
    ends = np.roll(poly, -1, axis=0)
    lines = np.full(xs.shape, -np.inf)
    for a, b in zip(poly, ends):
        e = (b - a) / np.hypot(*(b - a))
        lines = np.maximum(lines, orient * ((xs - a[0]) * e[1] - (ys - a[1]) * e[0]))  # outward normal
    band = (lines > 0) & (lines < upto)
    px0, py0 = xs[band], ys[band]
    exact = np.full(px0.shape, np.inf)
    for a, b in zip(poly, ends):
        e = b - a
        px, py = px0 - a[0], py0 - a[1]
        t = np.clip((px * e[0] + py * e[1]) / (e @ e), 0.0, 1.0)
        exact = np.minimum(exact, np.hypot(px - t * e[0], py - t * e[1]))
    lines[band] = exact
    return lines


def _area2(poly: np.ndarray) -> float:
    """Twice the polygon's signed area (the shoelace formula)."""
    x, y = poly[:, 0], poly[:, 1]
    return float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def smoothstep(t: np.ndarray) -> np.ndarray:
    """3t^2 - 2t^3 of t clipped to [0, 1]: exactly 0 below 0, exactly 1 above 1, monotone and smooth between."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def face_mask(
    landmarks: np.ndarray,
    quad: np.ndarray,
    photo_shape: tuple[int, int],
    *,
    dilate: float = PasteParams.dilate,
    feather: float = PasteParams.feather,
    forehead: float = PasteParams.forehead,
) -> tuple[np.ndarray, Box]:
    """The soft paste mask in photo pixels: (alpha float32 [h, w] in [0, 1], box).

    alpha is a smoothstep of the distance inwards from the hull grown by `dilate` (`mask_polygon`), over
    `feather` (both fractions of the quad side): exactly 0 beyond the grown hull, exactly 1 a feather inside it,
    monotone between; times a smoothstep that reaches 0 at the crop's edge (the quad) over the same feather.
    `box` = (x0, y0, x1, y1) is the grown hull's bounding box within the quad's, plus a pixel, clipped to the
    photo: alpha is 0 everywhere outside it."""
    PasteParams(dilate, feather, forehead)  # the same rules as the CLI's settings
    qsize = quad_side(quad)
    grow, ramp = dilate * qsize, feather * qsize
    poly = mask_polygon(landmarks, quad, forehead)
    lo, hi = poly.min(axis=0) - grow, poly.max(axis=0) + grow
    hull_box = (int(np.floor(lo[0])) - 1, int(np.floor(lo[1])) - 1, int(np.ceil(hi[0])) + 2, int(np.ceil(hi[1])) + 2)
    qb = _quad_box(quad, photo_shape)
    box = _clip_box(
        (max(hull_box[0], qb[0]), max(hull_box[1], qb[1]), min(hull_box[2], qb[2]), min(hull_box[3], qb[3])),
        photo_shape,
    )
    xs, ys = _box_points(box)
    alpha = smoothstep((grow - _signed_distance(xs, ys, poly, grow)) / ramp)
    alpha *= smoothstep(_inside_quad_distance(xs, ys, quad) / ramp)
    return alpha.astype(np.float32), box


def _inside_quad_distance(xs: np.ndarray, ys: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """Distance of the points inwards from the quad's nearest edge line, in photo pixels (negative outside)."""
    origin, ex, ey = _axes(quad)
    u, v = (k + 0.5 for k in _grid_to_crop(xs, ys, quad, 1))  # (u, v) in [0, 1] inside
    return np.minimum(np.minimum(u, 1 - u) * np.hypot(*ex), np.minimum(v, 1 - v) * np.hypot(*ey))


# ---------------------------------------------------------------------------- the blend


def paste(
    photo: np.ndarray,
    crop: np.ndarray,
    quad: np.ndarray,
    landmarks: np.ndarray,
    *,
    params: PasteParams = PasteParams(),
) -> PasteResult:
    """The crop uint8 [R, R, 3] pasted into the photo uint8 [H, W, 3] it was aligned from (`quad`, `landmarks`
    in photo pixels). Inside the mask, round(photo * (1 - a) + warped * a); wherever a == 0 the photo's own bytes.
    The photo array is not modified."""
    photo = np.asarray(photo)
    crop = np.asarray(crop)
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
        raise ValueError(f"photo must be uint8 [H, W, 3], got {photo.dtype} {photo.shape}")
    if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3 or crop.shape[0] != crop.shape[1]:
        raise ValueError(f"crop must be uint8 [R, R, 3], got {crop.dtype} {crop.shape}")
    alpha, box = face_mask(
        landmarks, quad, photo.shape[:2], dilate=params.dilate, feather=params.feather, forehead=params.forehead
    )
    out = photo.copy()
    x0, y0, x1, y1 = box
    if alpha.size == 0 or not (alpha > 0).any():
        return PasteResult(out, alpha, box)
    warped, _, _ = warp_to_photo(crop, quad, photo.shape[:2], box)
    region = out[y0:y1, x0:x1]  # a view: writes land in `out`
    where = alpha > 0
    a = alpha[where][:, None]
    blended = region[where].astype(np.float32) * (1.0 - a) + warped[where] * a
    region[where] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return PasteResult(out, alpha, box)
