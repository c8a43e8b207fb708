"""Face identity: dlib's 128-d face embedding, and how alike two faces are by it.

Reports score a reconstruction by the cosine similarity of its embedding to the aligned photo's
(`identity_similarity`). The embedding needs a face's box and its 68 landmarks, which
`pti.engine.align.detect_faces` has already found: `face_embedding(img, face)` takes them as they are,
and without `face` it detects the faces once and uses the largest; the landmark predictor runs once.

dlib's recognition model comes from the `face-recognition-models` package and is loaded once per process;
dlib itself is imported on first use (`pti.engine.align.dlib_module`), not with this module.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pti.engine.align import Face, detect_faces, dlib_model_path, dlib_module
from pti.engine.images import to_uint8

DLIB_SAME_PERSON = 0.6  # dlib's published threshold on the euclidean distance of its 128-d embeddings


@dataclass(frozen=True)
class IdentityScore:
    cosine: float  # cosine similarity of the two embeddings (1 = same direction)
    euclidean: float  # euclidean distance; dlib calls < 0.6 the same person
    same_person: bool  # euclidean < DLIB_SAME_PERSON


@functools.cache
def _face_encoder():
    return dlib_module().face_recognition_model_v1(str(dlib_model_path("dlib_face_recognition_resnet_model_v1.dat")))


def _rgb_array(img) -> np.ndarray:
    """PIL image, HxWx3 uint8 array, or [3,H,W] / [1,3,H,W] tensor in [-1, 1] -> HxWx3 uint8."""
    if isinstance(img, np.ndarray):
        return np.ascontiguousarray(img.astype(np.uint8))
    if isinstance(img, Image.Image):
        return np.ascontiguousarray(np.asarray(img.convert("RGB")))
    # a tensor: the one [-1, 1] -> uint8 mapping
    return np.ascontiguousarray(to_uint8(img[0] if img.ndim == 4 else img))


def _shape(face: Face):
    """The face's box and 68 landmarks as dlib's `full_object_detection`, what the recognition model reads.
    The landmarks are whole pixels (dlib's own points), so the round trip through float64 is exact."""
    dlib = dlib_module()
    points = dlib.points([dlib.point(int(x), int(y)) for x, y in face.landmarks])
    return dlib.full_object_detection(dlib.rectangle(*face.box), points)


def face_embedding(img, face: Face | None = None) -> np.ndarray | None:
    """dlib's 128-d embedding of `face` (found in `img` by `detect_faces`), by default the largest face;
    None when no face is found."""
    arr = _rgb_array(img)
    if face is None:
        faces = detect_faces(Image.fromarray(arr))
        if not faces:
            return None
        face = faces[0]
    return np.array(_face_encoder().compute_face_descriptor(arr, _shape(face)), dtype=np.float64)


def compare_identity(img_a, img_b) -> IdentityScore | None:
    """Cosine similarity and euclidean distance of the two faces' embeddings; None if either has no face."""
    ea, eb = face_embedding(img_a), face_embedding(img_b)
    if ea is None or eb is None:
        return None
    cos = float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb) + 1e-12))
    dist = float(np.linalg.norm(ea - eb))
    return IdentityScore(cosine=cos, euclidean=dist, same_person=dist < DLIB_SAME_PERSON)


def identity_similarity(img_a, img_b) -> float | None:
    """Cosine similarity of dlib face embeddings (see `compare_identity`); None when a face is missing."""
    score = compare_identity(img_a, img_b)
    return None if score is None else score.cosine
