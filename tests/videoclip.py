"""Synthetic video clips with a known truth, for the video tests (no test in here).

`make_clip` moves skimage's public-domain astronaut photo by a known similarity transform per frame
(translation, a few degrees of rotation, a few percent of scale, each a smooth profile that starts and
ends at rest), adds Gaussian pixel noise and encodes the frames as H.264 MP4 at high quality (crf 12, so
dlib keeps finding the face), with a 440 Hz sine as the audio track (ffmpeg's lavfi `sine` source).
`ClipTruth` carries the transforms and the photo's dlib landmarks mapped through each one: where the
face really is in every frame.

The clip is written by ffmpeg directly (raw RGB on its stdin), not by `pti.engine.video.VideoWriter`,
so the writer's tests read back a file the code under test did not make.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage
from PIL import Image

from pti.engine.align import Face, detect_faces, face_quad

FACE_AT = (160.0, 118.0)  # where the photo's face centre lands in a 320x256 frame at rest
SCALE = 0.8  # photo -> frame scale at rest: the 90 px face box becomes ~72 px


@dataclass(frozen=True)
class ClipTruth:
    path: Path
    fps: float
    size: tuple[int, int]  # (W, H)
    transforms: np.ndarray  # [F, 2, 3] photo (x, y) -> frame (x, y): frame = A @ photo + b
    landmarks: np.ndarray  # [F, 68, 2] the photo's dlib landmarks mapped through each transform
    quads: np.ndarray  # [F, 4, 2] face_quad of each frame's true landmarks
    has_audio: bool

    @property
    def frames(self) -> int:
        return len(self.transforms)


@functools.cache
def astronaut() -> np.ndarray:
    import skimage.data  # noqa: PLC0415

    return np.ascontiguousarray(skimage.data.astronaut())


@functools.cache
def astronaut_face() -> Face:
    return detect_faces(Image.fromarray(astronaut()))[0]


def ffmpeg() -> str:
    import imageio_ffmpeg  # noqa: PLC0415

    return imageio_ffmpeg.get_ffmpeg_exe()


def motion_transforms(n: int, motion: float = 1.0) -> np.ndarray:
    """[n, 2, 3] similarity transforms photo -> frame. Each parameter follows sin(pi u)^2 or
    sin(2 pi u) sin(pi u) (u = 0..1 over the clip): smooth, at rest at both ends. `motion` scales
    the amplitudes (0: a still clip): 10 px right, 6 px up, +-4 degrees, +8% scale."""
    centre = np.array(astronaut_face().landmarks.mean(axis=0))
    out = np.zeros((n, 2, 3))
    for f in range(n):
        u = f / max(n - 1, 1)
        rise, swing = np.sin(np.pi * u) ** 2, np.sin(2 * np.pi * u) * np.sin(np.pi * u)
        shift = np.array([10.0 * rise, -6.0 * rise]) * motion
        angle = np.deg2rad(4.0 * swing * motion)
        scale = SCALE * (1.0 + 0.08 * rise * motion)
        a = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        out[f, :, :2] = a
        out[f, :, 2] = np.array(FACE_AT) + shift - a @ centre
    return out


def warp(photo: np.ndarray, transform: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`photo` [h, w, 3] uint8 seen through `transform` (photo -> frame, pixel centres at integers) as a
    float frame [H, W, 3] (cubic spline, edges repeated)."""
    a, b = transform[:, :2], transform[:, 2]
    inv = np.linalg.inv(a)
    # scipy maps output index (row, col) -> input index; in (x, y): photo = inv @ (frame - b).
    swap = np.array([[0, 1], [1, 0]])
    matrix = swap @ inv @ swap
    offset = swap @ (-inv @ b)
    w, h = size
    return np.stack(
        [
            scipy.ndimage.affine_transform(
                photo[..., c].astype(np.float64), matrix, offset, output_shape=(h, w), order=3, mode="nearest"
            )
            for c in range(3)
        ],
        axis=-1,
    )


def encode(path: Path, frames: list[np.ndarray], fps: float, audio: bool, crf: int = 12) -> None:
    """Frames [H, W, 3] uint8 -> H.264 MP4 (yuv420p) at `path`, plus a 440 Hz sine the clip's length."""
    h, w, _ = frames[0].shape
    cmd = [ffmpeg(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}"]
    cmd += ["-r", str(fps), "-i", "-"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={len(frames) / fps + 1}"]
        cmd += ["-map", "0:v", "-map", "1:a", "-c:a", "aac", "-shortest"]
    cmd += ["-c:v", "libx264", "-crf", str(crf), "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, input=b"".join(np.ascontiguousarray(f).tobytes() for f in frames), check=True)


def make_clip(
    path: str | Path,
    n: int = 24,
    size: tuple[int, int] = (320, 256),
    fps: float = 12,
    motion: float = 1.0,
    noise: float = 2.0,  # Gaussian pixel noise, in 8-bit levels
    audio: bool = True,
    seed: int = 0,
) -> ClipTruth:
    """The astronaut moving by `motion_transforms`, with noise, as an MP4 at `path`; and the truth."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    transforms = motion_transforms(n, motion)
    photo = astronaut()
    frames = []
    for t in transforms:
        frame = warp(photo, t, size) + rng.normal(0.0, noise, (size[1], size[0], 3))
        frames.append(np.clip(np.rint(frame), 0, 255).astype(np.uint8))
    encode(path, frames, fps, audio)
    base = astronaut_face().landmarks
    landmarks = np.einsum("fij,kj->fki", transforms[:, :, :2], base) + transforms[:, None, :, 2]
    quads = np.stack([face_quad(lm)[0] for lm in landmarks])
    return ClipTruth(path, float(fps), size, transforms, landmarks, quads, audio)


def two_faces(left: int, right: int, size: tuple[int, int] = (480, 240), gap: bool = False) -> np.ndarray:
    """A frame [H, W, 3] uint8 with the astronaut's face twice, side by side: a square crop around the
    face resized to `left` and `right` px, centred at a quarter and three quarters of the width
    (`gap`: the left one left out)."""
    crop = Image.fromarray(astronaut()[36:216, 130:310])  # 180 px around the 90 px face box
    w, h = size
    canvas = Image.new("RGB", size, (128, 128, 128))
    for side, px, cx in (("left", left, w // 4), ("right", right, 3 * w // 4)):
        if side == "left" and gap:
            continue
        tile = crop.resize((px, px), Image.Resampling.LANCZOS)
        canvas.paste(tile, (cx - px // 2, h // 2 - px // 2))
    return np.asarray(canvas)


def count_frames(path: str | Path) -> int:
    """Frames in a clip, counted by decoding it (independent of `pti.engine.video.probe`'s demux count)."""
    import imageio_ffmpeg  # noqa: PLC0415

    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


def audio_seconds(path: str | Path) -> float:
    """The length of a clip's audio stream, s (its packets demuxed to the null muxer: ffmpeg's out_time)."""
    cmd = [ffmpeg(), "-v", "error", "-nostdin", "-i", str(path), "-map", "0:a:0", "-c", "copy", "-f", "null", "-"]
    out = subprocess.run(cmd + ["-progress", "pipe:1", "-nostats"], capture_output=True, text=True, check=True)
    return int([s for s in out.stdout.splitlines() if s.startswith("out_time_us=")][-1].split("=")[1]) / 1e6
