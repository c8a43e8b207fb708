"""Pasting an aligned crop back into its photo (`pti.engine.paste`), on skimage's public-domain astronaut.

The geometry is checked three ways: the maps against the alignment recipe's own (`helpers.map_to_output`), the
warp against the maps (a crop that holds its own coordinates), and end to end: a face aligned by `align_photo`
and pasted into a grey canvas is found by dlib where it was in the photo (upright, rolled 20 degrees, and cut by
the photo's border). The blend keeps the photo's bytes wherever alpha is 0 and moves the others by no more than
alpha times the warped difference; the mask is exactly 0 beyond its grown hull and outside the crop.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import scipy.spatial
from PIL import Image

from helpers import assert_refused, map_to_output
from pti.engine import align as A
from pti.engine import paste as P

skimage_data = pytest.importorskip("skimage.data")
skimage_draw = pytest.importorskip("skimage.draw")
SIZE = 256  # the aligned crop's side
BORDER_CUT = 185  # columns cut off the astronaut's left: the jaw's left end leaves the photo
GREY = 128


def _photos() -> dict[str, Image.Image]:
    ast = Image.fromarray(skimage_data.astronaut())
    rotated = ast.rotate(20, expand=True, fillcolor=(90, 120, 150), resample=Image.Resampling.BICUBIC)
    return {"upright": ast, "rotated20": rotated, "border": ast.crop((BORDER_CUT, 0, ast.width, ast.height))}


@pytest.fixture(scope="module")
def aligned() -> dict[str, tuple[np.ndarray, A.AlignResult]]:
    """Each photo (uint8) and its 256 px alignment (dlib runs once per photo for the whole module)."""
    return {name: (np.asarray(img), A.align_photo(img, SIZE)) for name, img in _photos().items()}


def _face(res: A.AlignResult) -> np.ndarray:
    return res.faces[res.chosen_index].landmarks


# ---------------------------------------------------------------------------- the maps


def test_maps_invert_each_other_and_match_the_recipe(aligned) -> None:
    rng = np.random.default_rng(0)
    _, res = aligned["rotated20"]
    for quad in [res.quad, aligned["upright"][1].quad, np.array([[10.0, 20], [14, 80], [74, 76], [70, 16]])]:
        p = rng.uniform(-100, 700, size=(50, 2))
        k = P.photo_to_crop_coords(p, quad, SIZE)
        # float64 on coordinates of about 1e3: the two computations agree to ~1e-12; 1e-9 leaves room
        assert np.abs(k - map_to_output(p, quad, SIZE)).max() < 1e-9
        assert np.abs(P.crop_to_photo_coords(k, quad, SIZE) - p).max() < 1e-9
    # The crop's outer corners (-0.5, -0.5) and (R - 0.5, R - 0.5) are the quad's TL and BR.
    corners = P.crop_to_photo_coords(np.array([[-0.5, -0.5], [SIZE - 0.5, SIZE - 0.5]]), res.quad, SIZE)
    assert np.allclose(corners, res.quad[[0, 2]], atol=1e-9)


@pytest.mark.parametrize("R", [64, 512])  # the quad side is ~172 px: 64 is warped as is, 512 is downsampled first
def test_warp_of_a_coordinate_crop_gives_the_map(aligned, R: int) -> None:
    """A crop holding its own coordinates (k_x, k_y) warps to photo_to_crop_coords: the lookup indexes the
    crop in the right order and, after downsampling, at the right scale and offset."""
    photo, res = aligned["rotated20"]
    ky, kx = np.mgrid[:R, :R].astype(np.float32)
    crop = np.stack([kx, ky, np.zeros_like(kx)], axis=-1)
    warped, valid, (x0, y0, x1, y1) = P.warp_to_photo(crop, res.quad, photo.shape[:2])
    xs, ys = np.meshgrid(np.arange(x0, x1), np.arange(y0, y1))
    k = P.photo_to_crop_coords(np.stack([xs.ravel(), ys.ravel()], 1), res.quad, R).reshape(*xs.shape, 2)
    assert np.array_equal(valid, ((k >= -0.5) & (k <= R - 0.5)).all(-1))
    # Lanczos-3 and bilinear reproduce a linear ramp exactly away from the edges (3 lobes of the downsampled
    # pixel, R / side crop pixels each); float32 on values up to 512 is good to ~1e-4 there, so 1e-2.
    margin = 4 * max(1.0, R / P.quad_side(res.quad))
    inner = ((k > margin) & (k < R - 1 - margin)).all(-1)
    assert inner.sum() > 0.5 * valid.sum()
    assert np.abs(warped[..., :2][inner] - k[inner]).max() < 1e-2


# ---------------------------------------------------------------------------- end to end through dlib


@pytest.mark.parametrize("name", ["upright", "rotated20", "border"])
def test_pasted_face_lands_where_it_was(aligned, name: str) -> None:
    """Paste the aligned crop into a flat grey canvas of the photo's size: dlib finds its landmarks where it
    found them in the photo.

    The tolerance: the pasted face is the photo seen through the crop, whose pixel is side / 256 (~0.68) photo
    pixels; dlib's landmarks are whole pixels (rounding moves a point by up to 0.71 px in each of the two
    detections) and its regression follows image detail to about a crop pixel. So the mean distance over the
    landmarks may be 2 crop pixels + 1 px; a mis-placed paste (half the crop's pixel scale, a wrong turn) moves
    every landmark together, which the mean offset bounds tighter: 1 crop pixel.
    """
    photo, res = aligned[name]
    lm = _face(res)
    if name == "border":  # align_face had to pad: the quad leaves the photo
        assert res.quad[:, 0].min() < 0
    canvas = np.full_like(photo, GREY)
    # A taller, wider mask than the default, so dlib sees the face's whole outline against the grey.
    out = P.paste(canvas, np.asarray(res.image), res.quad, lm, params=P.PasteParams(dilate=0.05, forehead=1.0))
    found = A.detect_faces(Image.fromarray(out.image))
    assert len(found) == 1
    h, w = photo.shape[:2]
    inside = (lm[:, 0] >= 0) & (lm[:, 0] < w) & (lm[:, 1] >= 0) & (lm[:, 1] < h)
    assert inside.sum() >= (60 if name == "border" else 68)
    diff = (found[0].landmarks - lm)[inside]
    pixel = P.quad_side(res.quad) / SIZE
    mean_dist = np.hypot(*diff.T).mean()
    assert mean_dist < 2 * pixel + 1.0, (mean_dist, pixel)
    assert np.hypot(*diff.mean(0)) < pixel, (diff.mean(0), pixel)


# ---------------------------------------------------------------------------- the blend


def test_pixels_outside_the_mask_keep_their_bytes(aligned) -> None:
    photo, res = aligned["upright"]
    photo = photo.copy()  # writable, so that a paste writing into its input is caught below, not refused by numpy
    before = photo.copy()
    crop = np.random.default_rng(1).integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    out = P.paste(photo, crop, res.quad, _face(res))
    assert np.array_equal(photo, before)  # the input is not written to
    alpha = out.full_alpha()
    untouched = alpha == 0
    assert untouched.mean() > 0.8  # the face is a small part of the photo
    assert np.array_equal(out.image[untouched], photo[untouched])
    assert out.image.dtype == np.uint8 and out.image.shape == photo.shape
    # and the pasted part did change: a random crop is nothing like the face
    assert np.abs(out.image[alpha > 0.5].astype(int) - photo[alpha > 0.5]).mean() > 30


@pytest.mark.parametrize("R", [64, SIZE])
def test_blend_moves_pixels_by_at_most_alpha_times_the_warped_difference(aligned, R: int) -> None:
    """Bilinear lookup is a convex combination, so |warp(r) - warp(t)| <= warp(|r - t|) pointwise, and the blend
    scales that by alpha; the two roundings to uint8 add at most 1. R = 64 is warped as is; R = 256 is first
    Lanczos-downsampled (negative lobes: not convex), so there the difference is taken of the downsampled crops."""
    photo, res = aligned["upright"]
    rng = np.random.default_rng(2)
    r = rng.integers(0, 256, size=(R, R, 3), dtype=np.uint8)
    t = np.clip(r.astype(int) + rng.integers(-40, 41, size=r.shape), 0, 255).astype(np.uint8)
    lm = _face(res)
    pr, pt = (P.paste(photo, c, res.quad, lm) for c in (r, t))
    assert pr.box == pt.box and np.array_equal(pr.alpha, pt.alpha)
    side = round(P.quad_side(res.quad))
    if side < R:
        r, t = (np.asarray(Image.fromarray(c).resize((side, side), Image.Resampling.LANCZOS)) for c in (r, t))
    diff = np.abs(r.astype(np.float32) - t.astype(np.float32))
    bound, _, _ = P.warp_to_photo(diff, res.quad, photo.shape[:2], pr.box)
    x0, y0, x1, y1 = pr.box
    got = np.abs(pr.image[y0:y1, x0:x1].astype(np.float32) - pt.image[y0:y1, x0:x1])
    # float32 on values <= 255 through a few products: ~1e-4; 1e-3 on top of the roundings' 1.
    excess = got - (pr.alpha[..., None] * bound + 1.0)
    assert excess.max() < 1e-3, excess.max()
    assert got.max() > 10  # the crops differ, and so do the pastes


# ---------------------------------------------------------------------------- the mask


def _full(alpha: np.ndarray, box: P.Box, shape) -> np.ndarray:
    out = np.zeros(shape[:2], np.float32)
    x0, y0, x1, y1 = box
    out[y0:y1, x0:x1] = alpha
    return out


def _outside_distance(poly: np.ndarray, shape) -> np.ndarray:
    """Each pixel's distance to the nearest pixel centre inside the polygon (rasterised by skimage, measured by
    scipy's exact EDT): at least the true distance to the polygon, and at most ~0.71 px more."""
    rr, cc = skimage_draw.polygon(poly[:, 1], poly[:, 0], shape[:2])
    inside = np.zeros(shape[:2], bool)
    inside[rr, cc] = True
    return scipy.ndimage.distance_transform_edt(~inside)


@pytest.mark.parametrize("name", ["upright", "rotated20"])
def test_mask_polygon_holds_the_face_and_rises_over_the_forehead(aligned, name: str) -> None:
    """The hull holds every jaw and brow landmark and reaches `forehead` x eye-to-mouth above the highest brow
    point, "above" being the face's up: the quad's BL -> TL, which the photo's roll turns with the face."""
    _, res = aligned[name]
    lm = _face(res)
    forehead = 0.8
    poly = P.mask_polygon(lm, res.quad, forehead)
    edges = np.roll(poly, -1, axis=0) - poly
    for p in lm[:27]:  # inside or on the hull: on the same side of every edge (float64 cross products ~1e-10)
        rel = p - poly
        assert (edges[:, 0] * rel[:, 1] - edges[:, 1] * rel[:, 0] >= -1e-6).all()
    up = (res.quad[0] - res.quad[1]) / np.hypot(*(res.quad[0] - res.quad[1]))
    eye_mouth = np.hypot(*((lm[48] + lm[54]) / 2 - (lm[36:42].mean(0) + lm[42:48].mean(0)) / 2))
    rise = (poly @ up).max() - (lm[17:27] @ up).max()
    assert abs(rise - forehead * eye_mouth) < 1e-9
    assert ((poly @ up).min() - (lm[:17] @ up).min()) == pytest.approx(0, abs=1e-9)  # the chin is not moved


@pytest.mark.parametrize("name", ["upright", "rotated20"])
def test_mask_has_compact_support_and_covers_the_face(aligned, name: str) -> None:
    photo, res = aligned[name]
    lm = _face(res)
    params = P.PasteParams()
    alpha, box = P.face_mask(lm, res.quad, photo.shape[:2])
    full = _full(alpha, box, photo.shape)
    assert alpha.dtype == np.float32 and alpha.min() >= 0 and alpha.max() <= 1
    # 1 at the inner face: nose, eyes and mouth (landmarks rounded to their pixel)
    inner = np.rint(lm[27:68]).astype(int)
    assert (full[inner[:, 1], inner[:, 0]] == 1).all()
    # exactly 0 beyond the grown hull (the raster distance overstates the true one by < 1 px)
    grow = params.dilate * P.quad_side(res.quad)
    far = _outside_distance(P.mask_polygon(lm, res.quad), photo.shape) > grow + 1
    assert far.mean() > 0.5
    assert (full[far] == 0).all(), full[far].max()
    # and the box is snug: alpha > 0 reaches within 2 px of each of its sides
    ys, xs = np.nonzero(alpha)
    assert xs.min() <= 2 and ys.min() <= 2 and xs.max() >= alpha.shape[1] - 3 and ys.max() >= alpha.shape[0] - 3
    # monotone: along the 8 pixel rays from the nose tip (deep inside the convex hull) alpha never rises
    cx, cy = np.rint(lm[30]).astype(int)
    for dx, dy in [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]:
        n = min(
            n for n in range(1, 2000) if not (0 <= cx + n * dx < full.shape[1] and 0 <= cy + n * dy < full.shape[0])
        )
        ray = full[cy + np.arange(n) * dy, cx + np.arange(n) * dx]
        assert ray[0] == 1 and ray[-1] == 0 and (np.diff(ray) <= 0).all(), (dx, dy)
        assert ((ray > 0) & (ray < 1)).any()  # a ramp, not a cut


def test_mask_is_the_smoothstep_of_the_exact_distance(aligned) -> None:
    """Near the hull, alpha is smoothstep((dilate - d) / feather) of the exact Euclidean distance d to the hull
    (negative inside), d measured here independently: to the hull's outline sampled every 0.01 px (so d is good
    to 0.005 px; smoothstep's slope is at most 1.5 / feather px, ~0.15 per px at the default, so alpha to 1e-3)."""
    photo, res = aligned["upright"]
    lm, quad = _face(res), res.quad
    alpha, (x0, y0, x1, y1) = P.face_mask(lm, quad, photo.shape[:2])
    poly = P.mask_polygon(lm, quad)
    ends = np.roll(poly, -1, axis=0)
    outline = np.concatenate(
        [a + np.linspace(0, 1, int(np.hypot(*(b - a)) / 0.01) + 2)[:, None] * (b - a) for a, b in zip(poly, ends)]
    )
    xs, ys = np.meshgrid(np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64))
    pts = np.stack([xs.ravel(), ys.ravel()], 1)
    d, _ = scipy.spatial.cKDTree(outline).query(pts)
    e = ends - poly
    side = e[None, :, 0] * (pts[:, None, 1] - poly[None, :, 1]) - e[None, :, 1] * (pts[:, None, 0] - poly[None, :, 0])
    inside = (side >= 0).all(1) | (side <= 0).all(1)
    d = np.where(inside, -d, d).reshape(xs.shape)
    params, side_px = P.PasteParams(), P.quad_side(quad)
    t = np.clip((params.dilate * side_px - d) / (params.feather * side_px), 0, 1)
    expected = t * t * (3 - 2 * t)
    # the crop-edge ramp is 1 everywhere here (the hull sits well inside the quad at the defaults)
    near = np.abs(d) < 20
    assert near.sum() > 1000
    assert np.abs(alpha[near] - expected[near]).max() < 1e-3


def test_mask_is_zero_outside_the_crop(aligned) -> None:
    """A mask grown far past the quad is cut by the crop-edge ramp: nothing outside the crop is ever pasted."""
    photo, res = aligned["upright"]
    alpha, box = P.face_mask(_face(res), res.quad, photo.shape[:2], dilate=0.3, forehead=2.0)
    full = _full(alpha, box, photo.shape)
    ys, xs = np.mgrid[: photo.shape[0], : photo.shape[1]]
    k = map_to_output(np.stack([xs.ravel(), ys.ravel()], 1), res.quad, SIZE).reshape(*xs.shape, 2)
    outside = ~((k >= -0.5) & (k <= SIZE - 0.5)).all(-1)
    grown = _outside_distance(P.mask_polygon(_face(res), res.quad, 2.0), photo.shape) < 0.3 * P.quad_side(res.quad) - 2
    assert (outside & grown).sum() > 1000  # the grown hull does leave the crop
    assert (full[outside] == 0).all(), full[outside].max()
    assert (full[~outside] > 0).sum() > 1000


def test_float_landmarks_and_quads_are_taken_as_they_are(aligned) -> None:
    """Smoothed (sub-pixel) landmarks move the mask sub-pixel: a quarter-pixel shift of landmarks and quad
    shifts the mask by a quarter pixel, not zero and not a whole one."""
    photo, res = aligned["upright"]
    lm, quad = _face(res), res.quad
    shift = np.array([0.25, 0.0])
    a0, b0 = P.face_mask(lm, quad, photo.shape[:2])
    a1, b1 = P.face_mask(lm + shift, quad + shift, photo.shape[:2])
    f0, f1 = _full(a0, b0, photo.shape), _full(a1, b1, photo.shape)
    assert not np.array_equal(f0, f1)
    # the mask's centre of mass moves by the shift; its ramp spans ~10 px, so float32 sums are good to ~1e-3 px
    ys, xs = np.mgrid[: photo.shape[0], : photo.shape[1]]
    com = [np.array([(f * xs).sum(), (f * ys).sum()]) / f.sum() for f in (f0, f1)]
    assert np.abs(com[1] - com[0] - shift).max() < 0.02


@pytest.mark.parametrize(
    "name,value",
    [
        ("dilate", -0.1),
        ("dilate", float("nan")),
        ("feather", 0.0),
        ("feather", -1.0),
        ("forehead", -0.5),
        ("dilate", 2.0),
    ],
)
def test_paste_params_refuse_nonsense(name: str, value) -> None:
    assert_refused(P.PasteParams, name, value)
