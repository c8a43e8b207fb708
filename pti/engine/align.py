"""FFHQ face alignment from dlib's 68 landmarks.

The recipe of the FFHQ dataset (Karras et al. 2019), written for Pillow >= 10:

1. An oriented square `quad` from the eyes and mouth (see `face_quad`): its centre sits a tenth of
   the way from the eye midpoint to the mouth midpoint, its x axis follows the eye line (averaged
   with the perpendicular of the eye-mouth line), and its half-size is the larger of 2x the eye
   distance and 1.8x the eye-mouth distance.
2. Shrink the photo when the quad is over twice the output size (fast, and the later steps still
   see at least 2 source pixels per output pixel).
3. Crop to the quad plus a border of 10% of its size (at least 3 px).
4. When the quad pokes out of the photo, reflect-pad by at least 30% of the quad size, blur the
   padding (sigma 2% of the quad size) and fade it towards the median colour, so the generator is
   not asked to reproduce mirrored content sharply.
5. Map the quad onto a 4096 px square (bilinear), then Lanczos-downsample to the output size.

dlib's models come from the `face-recognition-models` package and are loaded once per process; dlib itself
is imported on first use (`dlib_module`), so that `import pti.cli`, `pti bench` and everything else that does
not look for faces run where dlib is not installed (the GPU check's machine).
dlib's other face model, the identity embedding that reports score reconstructions with, is
`pti.engine.faceid`; it reads the faces `detect_faces` finds here.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.ndimage
from PIL import Image

from pti.errors import FaceNotFoundError, ImageError, PTIError

TRANSFORM_SIZE = 4096  # FFHQ renders the quad at 4096 px before the final Lanczos downsample.
UPSAMPLE = 1  # dlib detector upsampling: finds faces down to ~40 px (FFHQ used 1 as well).


@dataclass(frozen=True)
class Face:
    """One detected face: `box` = (left, top, right, bottom) in pixels, `landmarks` = [68, 2] (x, y)."""

    box: tuple[int, int, int, int]
    landmarks: np.ndarray = field(repr=False)

    @property
    def area(self) -> int:
        return max(0, self.box[2] - self.box[0]) * max(0, self.box[3] - self.box[1])


@dataclass
class AlignResult:
    image: Image.Image  # the aligned output_size x output_size RGB crop
    faces: list[Face]  # every face found, largest first
    chosen_index: int  # which of `faces` was aligned
    quad: np.ndarray  # [4, 2] the source quad (top-left, bottom-left, bottom-right, top-right)


def dlib_model_path(filename: str) -> Path:
    """Path of a model file shipped by `face-recognition-models` (without importing it: it needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise PTIError(
            "the face-recognition-models package is not installed; run `pip install face-recognition-models`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / filename
    if not path.is_file():
        raise PTIError(f"{path} is missing; reinstall face-recognition-models")
    return path


@functools.cache
def dlib_module():
    """dlib, imported here on first use rather than with this module (see the module's docstring)."""
    try:
        import dlib  # noqa: PLC0415  only finding faces needs it, and some machines running pti lack it
    except ImportError as e:
        raise PTIError(f"dlib is not installed ({e}); run `pip install dlib-bin` to find and align faces") from None
    return dlib


@functools.cache
def _detector():
    return dlib_module().get_frontal_face_detector()


@functools.cache
def _predictor():
    return dlib_module().shape_predictor(str(dlib_model_path("shape_predictor_68_face_landmarks.dat")))


def detect_faces(img: Image.Image, upsample: int = UPSAMPLE) -> list[Face]:
    """Faces in an RGB image, each with its 68 landmarks, largest box first."""
    arr = np.ascontiguousarray(np.asarray(img.convert("RGB")))
    faces = []
    for rect in _detector()(arr, upsample):
        shape = _predictor()(arr, rect)
        lm = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        faces.append(Face((rect.left(), rect.top(), rect.right(), rect.bottom()), lm))
    return sorted(faces, key=lambda f: -f.area)


def face_quad(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """The FFHQ crop quad [4, 2] (TL, BL, BR, TR in output terms) and its side length `qsize`."""
    lm = np.asarray(landmarks, dtype=np.float64)
    eye_left, eye_right = lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5  # outer mouth corners
    eye_to_mouth = mouth_avg - eye_avg
    # x: the eye line averaged with the eye-mouth line turned to point along it ((a, b) -> (b, -a)),
    # so both a tilted eye line and a tilted nose line contribute to the rotation.
    x = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.array([-x[1], x[0]])  # x turned by +90 degrees (image y points down)
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    return quad, float(np.hypot(*x) * 2)


def align_face(
    img: Image.Image, landmarks: np.ndarray, output_size: int = 1024, transform_size: int = TRANSFORM_SIZE
) -> Image.Image:
    """Crop, rotate and scale `img` so the face with `landmarks` sits where FFHQ faces sit."""
    img = img.convert("RGB")
    quad, qsize = face_quad(landmarks)
    transform_size = max(transform_size, output_size)

    # Shrink: keep ~2 source pixels per output pixel, no more.
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(img.size[0] / shrink)), int(np.rint(img.size[1] / shrink)))
        img = img.resize(rsize, Image.Resampling.LANCZOS)
        quad, qsize = quad / shrink, qsize / shrink

    # Crop to the quad's bounding box plus a border.
    border = max(int(np.rint(qsize * 0.1)), 3)
    lo, hi = np.floor(quad.min(axis=0)).astype(int), np.ceil(quad.max(axis=0)).astype(int)
    crop = (
        max(lo[0] - border, 0),
        max(lo[1] - border, 0),
        min(hi[0] + border, img.size[0]),
        min(hi[1] + border, img.size[1]),
    )
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad = quad - np.array(crop[:2])

    # Pad (left, top, right, bottom) where the quad leaves the photo.
    lo, hi = np.floor(quad.min(axis=0)).astype(int), np.ceil(quad.max(axis=0)).astype(int)
    pad = np.array([-lo[0] + border, -lo[1] + border, hi[0] - img.size[0] + border, hi[1] - img.size[1] + border]).clip(
        min=0
    )
    if pad.max() > border - 4:
        pad = np.maximum(pad, max(int(np.rint(qsize * 0.3)), 1))
        img, quad = _pad_reflect_faded(img, pad, qsize), quad + pad[:2]

    img = img.transform(
        (transform_size, transform_size), Image.Transform.QUAD, (quad + 0.5).flatten(), Image.Resampling.BILINEAR
    )
    if output_size < transform_size:
        img = img.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return img


def _pad_reflect_faded(img: Image.Image, pad: np.ndarray, qsize: float) -> Image.Image:
    """Reflect-pad by `pad` = (left, top, right, bottom); blur and fade the padding to the median colour."""
    left, top, right, bottom = (int(p) for p in pad)
    arr = np.pad(np.asarray(img, dtype=np.float32), ((top, bottom), (left, right), (0, 0)), mode="reflect")
    h, w, _ = arr.shape
    yy, xx = np.ogrid[:h, :w]
    xx, yy = xx.astype(np.float32)[..., None], yy.astype(np.float32)[..., None]
    # 0 inside the photo, rising to 1 at the outer edge of the padding (the larger of the x and y ramps).
    mask = np.maximum(
        1.0 - np.minimum(xx / left, (w - 1 - xx) / right), 1.0 - np.minimum(yy / top, (h - 1 - yy) / bottom)
    )
    sigma = qsize * 0.02
    blurred = scipy.ndimage.gaussian_filter(arr, [sigma, sigma, 0])
    arr += (blurred - arr) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)  # blur reaches fully a third into the pad
    arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(mask, 0.0, 1.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def align_photo(img: Image.Image, output_size: int = 1024, face: int | None = None, name: str = "photo") -> AlignResult:
    """Detect faces, align the chosen one (`face` index, default the largest) to `output_size`.

    Raises FaceNotFoundError when there is no face or `face` is out of range; `name` appears in the message.
    """
    faces = detect_faces(img)
    if not faces:
        raise FaceNotFoundError(
            f"no face found in {name}; if it is already an aligned square face crop, pass --no-align"
        )
    index = 0 if face is None else face
    if not 0 <= index < len(faces):
        raise FaceNotFoundError(
            f"{name} has {len(faces)} face(s) (0..{len(faces) - 1}); --face {index} is out of range"
        )
    chosen = faces[index]
    quad, _ = face_quad(chosen.landmarks)
    return AlignResult(align_face(img, chosen.landmarks, output_size), faces, index, quad)


def resize_prealigned(img: Image.Image, output_size: int = 1024) -> tuple[Image.Image, str | None]:
    """Resize an already aligned crop; a non-square one is centre-cropped to square, with a warning."""
    img = img.convert("RGB")
    w, h = img.size
    if min(w, h) < output_size:
        raise ImageError(
            f"image is {w}x{h}, smaller than the generator's {output_size}x{output_size} input: "
            "an aligned crop must be at least that large (without --no-align, pti aligns and resizes the photo)"
        )
    warning = None
    if w != h:
        side = min(w, h)
        warning = f"image is {w}x{h}, not square: centre-cropped to {side}x{side} (aligned crops are square)"
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (output_size, output_size):
        img = img.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return img, warning
