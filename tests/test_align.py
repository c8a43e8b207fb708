"""FFHQ alignment on skimage's public-domain astronaut photo, checked against the recipe's own geometry;
and dlib's face-identity embedding beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from helpers import canonical_positions, command_app
from pti.engine import align as A
from pti.engine import faceid as F
from pti.engine.images import from_uint8
from pti.errors import FaceNotFoundError

skimage_data = pytest.importorskip("skimage.data")
SIZE = 256


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage_data.astronaut())


@pytest.fixture(scope="module")
def astro_face(astronaut: Image.Image) -> A.Face:
    return A.detect_faces(astronaut)[0]


@pytest.fixture(scope="module")
def aligned(astronaut: Image.Image) -> A.AlignResult:
    return A.align_photo(astronaut, SIZE)


def _key_points(lm: np.ndarray) -> dict[str, np.ndarray]:
    return {"eye_left": lm[36:42].mean(0), "eye_right": lm[42:48].mean(0), "mouth_left": lm[48], "mouth_right": lm[54]}


def test_astronaut_lands_on_canonical_positions(aligned: A.AlignResult, astro_face: A.Face) -> None:
    assert aligned.image.size == (SIZE, SIZE) and aligned.image.mode == "RGB"
    expected = canonical_positions(astro_face.landmarks, SIZE)  # from the quad geometry
    redetected = A.detect_faces(aligned.image)
    assert len(redetected) == 1
    got = _key_points(redetected[0].landmarks)
    for name, pos in expected.items():
        assert np.abs(got[name] - pos).max() < 3.0, (name, got[name], pos)
    # The recipe's invariants: eye midpoint on the vertical centre line, eyes level, mouth below.
    eye_mid = (got["eye_left"] + got["eye_right"]) / 2
    mouth_mid = (got["mouth_left"] + got["mouth_right"]) / 2
    assert abs(eye_mid[0] - (SIZE / 2 - 0.5)) < 3.0
    assert abs(got["eye_left"][1] - got["eye_right"][1]) < 3.0
    assert abs(mouth_mid[0] - eye_mid[0]) < 3.0 and mouth_mid[1] > eye_mid[1] + SIZE * 0.15


def test_canonical_positions_follow_the_recipe() -> None:
    """An upright symmetric face: eye midpoint at x = S/2, 0.1 of eye-mouth above the quad centre."""
    lm = np.zeros((68, 2))
    lm[36:42], lm[42:48] = (40.0, 50.0), (60.0, 50.0)  # eye distance e = 20
    lm[48], lm[54] = (45.0, 80.0), (55.0, 80.0)  # eye-mouth m = 30
    pos = canonical_positions(lm, 100)
    half = max(2 * 20, 1.8 * 30)  # |x| = 54: the quad spans 108 source px
    centre = 100 / 2 - 0.5
    assert np.allclose(pos["eye_left"], [centre - 10 / half * 50, centre - 0.1 * 30 / half * 50])
    assert np.allclose(pos["mouth_right"], [centre + 5 / half * 50, centre + 0.9 * 30 / half * 50])


def test_quad_is_square_and_rotates_with_the_face(astro_face: A.Face) -> None:
    quad, qsize = A.face_quad(astro_face.landmarks)
    sides = np.linalg.norm(np.roll(quad, -1, axis=0) - quad, axis=1)
    assert np.allclose(sides, qsize)
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    quad_r, qsize_r = A.face_quad(astro_face.landmarks @ rot.T)
    assert np.isclose(qsize_r, qsize) and np.allclose(quad_r, quad @ rot.T)


def test_shrink_path_matches(astronaut: Image.Image, astro_face: A.Face) -> None:
    """A 2x larger photo goes through the shrink step and gives (nearly) the same crop."""
    small = A.align_face(astronaut, astro_face.landmarks, 64)
    big = A.align_face(astronaut.resize((1024, 1024), Image.Resampling.LANCZOS), astro_face.landmarks * 2 + 0.5, 64)
    diff = np.abs(np.asarray(small, np.float32) - np.asarray(big, np.float32)).mean()
    assert diff < 8.0


def test_padding_path(astronaut: Image.Image, astro_face: A.Face, monkeypatch: pytest.MonkeyPatch) -> None:
    """A face near the corner forces the reflect-pad; the padding must be filled, not black."""
    calls = []
    real = A._pad_reflect_faded
    monkeypatch.setattr(A, "_pad_reflect_faded", lambda *a: calls.append(a[1]) or real(*a))
    corner = astronaut.crop((150, 40, 400, 290))
    lm = astro_face.landmarks - np.array([150, 40])
    out = np.asarray(A.align_face(corner, lm, 128), np.float32)
    assert out.shape == (128, 128, 3)
    assert len(calls) == 1 and calls[0].min() > 0
    assert out[:8].mean() > 20  # top rows come from padding: blurred reflection faded to the median


def test_no_face(tmp_path: Path) -> None:
    with pytest.raises(FaceNotFoundError, match="--no-align"):
        A.align_photo(Image.new("RGB", (200, 200), (128, 128, 128)), 64, name="gray.png")


@pytest.fixture(scope="module")
def two_faces(astronaut: Image.Image) -> Image.Image:
    face = astronaut.crop((110, 20, 330, 240))  # the head only (the suit patch can read as a face)
    canvas = Image.new("RGB", (420, 240), (90, 90, 90))
    canvas.paste(face.resize((132, 132), Image.Resampling.LANCZOS), (10, 50))
    canvas.paste(face, (190, 10))
    return canvas


def test_multiple_faces_largest_first(two_faces: Image.Image) -> None:
    res = A.align_photo(two_faces, 64)
    assert len(res.faces) == 2 and res.chosen_index == 0
    assert res.faces[0].area > res.faces[1].area and res.faces[0].box[0] > 150
    second = A.align_photo(two_faces, 64, face=1)
    assert second.chosen_index == 1 and not np.allclose(second.quad, res.quad)
    with pytest.raises(FaceNotFoundError, match="out of range"):
        A.align_photo(two_faces, 64, face=2)


def test_resize_prealigned() -> None:
    img, warning = A.resize_prealigned(Image.new("RGB", (300, 200)), 64)
    assert img.size == (64, 64) and warning and "not square" in warning
    img, warning = A.resize_prealigned(Image.new("RGB", (100, 100)), 64)
    assert img.size == (64, 64) and warning is None


def test_models_loaded_once() -> None:
    assert A._detector() is A._detector() and A._predictor() is A._predictor()
    assert F._face_encoder() is F._face_encoder()


# --- face identity ---------------------------------------------------------------------------------


def test_identity_similarity(astronaut: Image.Image) -> None:
    face = astronaut.crop((110, 20, 330, 240))
    shifted = face.resize((200, 200)).rotate(5, fillcolor=(128, 128, 128))
    score = F.compare_identity(face, shifted)
    assert score is not None and score.same_person and score.cosine > 0.95 and score.euclidean < F.DLIB_SAME_PERSON
    # A [-1, 1] tensor (the generator's range) is read through images.to_uint8: the same pixels, the same embedding.
    tensor = from_uint8(np.asarray(face))
    assert np.array_equal(F.face_embedding(tensor), F.face_embedding(face))
    assert np.array_equal(F.face_embedding(tensor[0]), F.face_embedding(np.asarray(face)))
    assert F.identity_similarity(face, tensor) == pytest.approx(1.0, abs=1e-12)
    assert F.identity_similarity(face, Image.new("RGB", (100, 100), (128, 128, 128))) is None


def test_embedding_reads_the_face_already_located(astronaut: Image.Image, astro_face: A.Face) -> None:
    """The face `detect_faces` located (box and 68 landmarks) is embedded as given: the same 128 numbers as
    detecting again, and other landmarks give another embedding (they are read, not predicted anew)."""
    assert np.array_equal(F.face_embedding(astronaut, astro_face), F.face_embedding(astronaut))
    moved = A.Face(astro_face.box, astro_face.landmarks + 4.0)
    assert not np.array_equal(F.face_embedding(astronaut, moved), F.face_embedding(astronaut))


# --- CLI -----------------------------------------------------------------------------------------


@pytest.fixture()
def cli() -> typer.Typer:
    from pti.commands import align as cmd

    return command_app(cmd)


def test_cli_align(cli: typer.Typer, tmp_path: Path, astronaut: Image.Image, two_faces: Image.Image) -> None:
    runner = CliRunner()
    astronaut.save(tmp_path / "astro.jpg", quality=95)
    Image.new("RGB", (120, 120), (128, 128, 128)).save(tmp_path / "gray.png")
    two_faces.save(tmp_path / "two.png")
    out = tmp_path / "out"

    r = runner.invoke(cli, ["align", str(tmp_path / "astro.jpg"), "-o", str(out), "--size", "64"])
    assert r.exit_code == 0, r.output
    assert Image.open(out / "astro.png").size == (64, 64)

    r = runner.invoke(cli, ["align", str(tmp_path / "gray.png"), "-o", str(out), "--size", "64"])
    assert r.exit_code != 0 and isinstance(r.exception, FaceNotFoundError)
    assert not (out / "gray.png").exists()

    r = runner.invoke(cli, ["align", str(tmp_path / "two.png"), "-o", str(out), "--size", "64", "--face", "1"])
    assert r.exit_code == 0, r.output
    assert "2 faces" in r.output and "* 1:" in r.output

    Image.new("RGB", (90, 60), (10, 20, 30)).save(tmp_path / "crop.png")
    r = runner.invoke(cli, ["align", str(tmp_path / "crop.png"), "-o", str(out), "--size", "32", "--no-align"])
    assert r.exit_code == 0 and "not square" in r.output
    assert Image.open(out / "crop.png").size == (32, 32)

    batch = tmp_path / "batch"
    batch.mkdir()
    (tmp_path / "astro.jpg").rename(batch / "a.jpg")
    (tmp_path / "gray.png").rename(batch / "b.png")
    r = runner.invoke(cli, ["align", str(batch), "-o", str(out / "batch"), "--size", "32"])
    assert r.exit_code != 0 and "1 of 2" in str(r.exception)
    assert sorted(p.name for p in (out / "batch").iterdir()) == ["a.png"]  # no temp files left
