"""Photo intake: one loader for every command.

`load_photo(path)` returns an 8-bit RGB `PIL.Image` whatever the file holds:

- EXIF orientation is applied (phones store portraits sideways plus a rotation tag).
- Grayscale, 1-bit, palette, CMYK, YCbCr, LAB and HSV images are converted to RGB.
- Transparency (RGBA, LA, PA, palette with a transparent index) is composited on white:
  dropping alpha would reveal whatever colour happens to sit under transparent pixels
  (often black), which a face detector and a perceptual loss would both take as content.
- 16-bit images (`I;16*`, and `I` holding values above 255) are scaled to 8 bits by 255/65535.
  Floating-point (`F`) images are read as [0, 1] when their maximum is at most 1, else as [0, 255].
- Decompression bombs (more than `max_pixels`, 100 MP by default), non-images, truncated and
  missing files raise `pti.errors.ImageError` with a one-line message naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pti.errors import ImageError, first_line
from pti.fsutil import atomic_path

# 100 megapixels: a 12 000 x 8 000 camera frame fits; decoding it takes ~300 MB as RGB.
# Anything larger is almost surely a hostile or broken file, not a portrait.
DEFAULT_MAX_PIXELS = 100_000_000

# Extensions `list_photos` picks up (compared lower-case).
PHOTO_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})

# The colour a transparent pixel becomes.
BACKGROUND_RGB = (255, 255, 255)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def load_photo(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read `path` into an 8-bit RGB image (see the module docstring for every conversion).

    Raises `ImageError` (one line, names the file) when the file is missing, not an image,
    truncated or larger than `max_pixels`.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"photo not found: {path}")
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not a photo")
    try:
        with warnings.catch_warnings():
            # We enforce our own, lower cap below; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{path} is {width}x{height} = {width * height / 1e6:.0f} MP, more than the "
                    f"{max_pixels / 1e6:.0f} MP limit; downscale it first"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(
            f"{path} is too large to decode safely (decompression bomb guard); downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        # Truncated data surfaces as OSError("image file is truncated ...") or a decoder error.
        raise ImageError(f"{path} is damaged or truncated ({first_line(e, typed=False)})") from None
    return to_rgb8(img)


def to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any Pillow image mode to 8-bit RGB (alpha composited on white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES or mode == "I" or mode == "F":
        return _wide_gray_to_rgb(img)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # 1, L, P, CMYK, YCbCr, LAB, HSV: Pillow's own conversions are exact enough for photos.
    return img.convert("RGB")


def _wide_gray_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale to 8-bit RGB."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
    elif img.mode == "I" and (arr.size == 0 or arr.max() <= 255):
        scale = 1.0  # an 8-bit image that some decoder widened to 32 bits
    else:
        scale = 255.0 / 65535.0  # the full 16-bit range onto the full 8-bit range
    arr8 = np.clip(np.rint(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(arr8).convert("RGB")


def list_photos(directory: str | Path) -> list[Path]:
    """Image files directly inside `directory`, sorted by name (extensions in `PHOTO_EXTENSIONS`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ImageError(f"not a directory: {directory}")
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS)


def expand_photo_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given, directories replaced by their photos (`list_photos`); order kept.

    A path that does not exist fails here, before any long work starts.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ImageError(f"photo not found: {p}")
        if p.is_dir():
            found = list_photos(p)
            if not found:
                raise ImageError(f"no photos in directory {p} (looked for {', '.join(sorted(PHOTO_EXTENSIONS))})")
            out.extend(found)
        else:
            out.append(p)
    return out


def unique_stems(paths: list[Path]) -> list[str]:
    """Output names for photos: their stems, with -2, -3, ... for repeats (a/me.jpg, b/me.png -> me, me-2)."""
    names, seen = [], {}
    for p in paths:
        stem = p.stem or "photo"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def save_photo_atomic(img: Image.Image, path: str | Path) -> Path:
    """Write `img` to `path` via a temporary file in the same directory and `os.replace`.

    Readers never see a half-written file, and an interrupted write leaves nothing behind.
    The format follows the extension (PNG when it has none Pillow knows).
    """
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt)
    return path
