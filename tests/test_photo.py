"""Photo intake: every kind of file a user may hand us becomes 8-bit RGB, or a one-line ImageError."""

from __future__ import annotations

import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pti.engine.photo import expand_photo_paths, list_photos, load_photo
from pti.errors import ImageError


def _check_rgb8(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert img.mode == "RGB"
    assert img.size == size
    arr = np.asarray(img)
    assert arr.dtype == np.uint8
    return arr


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was rotated; display rotated 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    arr = _check_rgb8(load_photo(tmp_path / "rot.jpg"), (20, 40))
    # After a clockwise turn the former left (red) half is on top.
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 60
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "YCbCr"])
def test_color_modes(tmp_path: Path, mode: str) -> None:
    base = Image.new("RGB", (16, 12), (200, 200, 200))
    img = base.convert(mode)
    ext = "jpg" if mode in ("CMYK", "YCbCr") else "png"
    img.save(tmp_path / f"x.{ext}")
    arr = _check_rgb8(load_photo(tmp_path / f"x.{ext}"), (16, 12))
    assert abs(int(arr.mean()) - 200) < 60


def test_alpha_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel
    img.save(tmp_path / "a.png")
    arr = _check_rgb8(load_photo(tmp_path / "a.png"), (8, 8))
    assert tuple(arr[4, 4]) == (255, 255, 255)
    assert tuple(arr[0, 0]) == (255, 0, 0)
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    assert tuple(np.asarray(load_photo(tmp_path / "la.png"))[1, 1]) == (255, 255, 255)


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.save(tmp_path / "p.png", transparency=0)
    arr = _check_rgb8(load_photo(tmp_path / "p.png"), (4, 4))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[1, 1]) == (10, 20, 30)


def test_sixteen_bit(tmp_path: Path) -> None:
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    arr = _check_rgb8(load_photo(tmp_path / "g16.png"), (8, 8))
    assert arr[7, 7, 0] == round(63000 * 255 / 65535)
    assert arr[0, 0, 1] == 0
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "g32.tif")
    arr32 = _check_rgb8(load_photo(tmp_path / "g32.tif"), (8, 8))
    assert arr32[7, 7, 2] == round(63000 * 255 / 65535)


def test_float_image(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(load_photo(tmp_path / "f.tif"))[0, 0, 0] == 128


def test_unicode_path(tmp_path: Path) -> None:
    p = tmp_path / "фото_写真_é.png"
    Image.new("RGB", (5, 7), (1, 2, 3)).save(p)
    assert tuple(np.asarray(load_photo(p))[0, 0]) == (1, 2, 3)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims a huge size: the cheapest decompression-bomb stand-in."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [12_000, 40_000])  # above our cap; above PIL's own bomb error
def test_decompression_bomb_refused(tmp_path: Path, side: int) -> None:
    p = tmp_path / "bomb.png"
    _png_header_only(p, side, side)
    with pytest.raises(ImageError, match="bomb.png"):
        load_photo(p)


def test_pixel_cap_parameter(tmp_path: Path) -> None:
    Image.new("RGB", (50, 50)).save(tmp_path / "x.png")
    with pytest.raises(ImageError, match="limit"):
        load_photo(tmp_path / "x.png", max_pixels=1000)


def test_not_an_image(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("hello")
    with pytest.raises(ImageError, match="notes.jpg.*not an image"):
        load_photo(p)


def test_truncated(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg.*truncated") as info:
        load_photo(tmp_path / "cut.jpg")
    assert "\n" not in str(info.value)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        load_photo(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="directory"):
        load_photo(tmp_path)


def test_list_and_expand(tmp_path: Path) -> None:
    for name in ["b.PNG", "a.jpg", "c.txt", "d.webp"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_photos(tmp_path)] == ["a.jpg", "b.PNG", "d.webp"]
    assert [p.name for p in expand_photo_paths([tmp_path / "c.txt", tmp_path])] == ["c.txt", "a.jpg", "b.PNG", "d.webp"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match="no photos"):
        expand_photo_paths([empty])


@pytest.fixture()
def umask():
    """Set the process umask for one test (`umask(value)`), restoring the caller's afterwards."""
    before = os.umask(0o022)
    os.umask(before)
    yield os.umask
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_saved_photos_get_the_mode_open_would_give(tmp_path: Path, umask, mask: int) -> None:
    """0o666 less the umask, as open() creates files; not the 0o600 of the temp file it was written to."""
    from pti.engine.photo import save_photo_atomic

    umask(mask)
    target = save_photo_atomic(Image.new("RGB", (4, 4)), tmp_path / f"x{mask:o}.png")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_save_photo_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pti.engine.photo import save_photo_atomic

    target = save_photo_atomic(Image.new("RGB", (4, 4), (9, 8, 7)), tmp_path / "out" / "x.png")
    assert tuple(np.asarray(Image.open(target))[0, 0]) == (9, 8, 7)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    img = Image.new("RGB", (4, 4))
    monkeypatch.setattr(img, "save", broken_save)
    with pytest.raises(OSError):
        save_photo_atomic(img, tmp_path / "out" / "y.png")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.png"]
