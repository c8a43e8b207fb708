"""Video clips in and out: probe, choose frames, stream them, follow one face, steady its crop, write MP4.

`pti tune clip.mp4` and `pti render clip.pti --paste` are built on these pieces:

- `probe(path) -> VideoInfo`: one ffmpeg call reads the container's header (size, fps, codec, audio)
  and demuxes the video stream without decoding it (`-c copy -f null`), so `frames` is the number of
  video packets, counted, not ffmpeg's duration x fps estimate (one packet is one frame for every codec
  a camera writes; counting costs milliseconds, decoding would cost seconds).
- `parse_frames("0-120")`, `select(total, frames, every)`: which frames to use.
- `iter_frames(path, indices)`: decoded RGB frames, one at a time, through `imageio_ffmpeg.read_frames`;
  ffmpeg is told to stop after the last wanted frame (`-frames:v`) and passes frames through as decoded
  (`-fps_mode passthrough`: no frames duplicated or dropped to fit a constant rate, so index n is the
  n-th packet `probe` counted).
- `Tracker` / `track`: the same person from frame to frame (the largest face first, then the nearest).
- `smooth_landmarks` / `smoothed_quads`: a Gaussian over time so the FFHQ crop does not jitter. STIT
  smooths the quad's parameters; we smooth the 68 landmarks and derive each frame's quad from them with
  `face_quad`, so the crop stays exactly the one `align_face` would take from those landmarks.
- `VideoWriter`: H.264 MP4 (libx264, yuv420p), atomic, with the source clip's audio muxed in.

ffmpeg comes from the `imageio-ffmpeg` wheel (the `pti[video]` extra); it is imported inside the
functions that need it, so `import pti` works without it.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import scipy.ndimage

from pti.engine.align import Face, face_quad
from pti.errors import ImageError, OutputError, PTIError, first_line
from pti.fsutil import atomic_path

_NEEDS_VIDEO = "reading video needs imageio-ffmpeg: pip install 'pti[video]'"
# Demuxers that open a single picture as a one-frame "video": a photo is not a clip.
_IMAGE_DEMUXERS = re.compile(r"^(image2|.*_pipe)$")
# Rates cameras and editors write as 24000/1001 etc.; the header rounds them to 2 decimals ("29.97 fps").
_NTSC_RATES = tuple(Fraction(n * 1000, 1001) for n in (24, 30, 48, 60, 120))


def _ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg  # noqa: PLC0415  optional: the pti[video] extra
    except ImportError:
        raise PTIError(_NEEDS_VIDEO) from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def _imageio_ffmpeg():
    _ffmpeg_exe()
    import imageio_ffmpeg  # noqa: PLC0415  optional: the pti[video] extra

    return imageio_ffmpeg


# ---------------------------------------------------------------------------- probe


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    fps: float  # frames per second of the video stream (NTSC rates exact: 30000/1001, not 29.97)
    frames: int  # video packets counted by demuxing the whole stream (exact; no decoding)
    width: int  # as decoded frames come out (after a rotation tag of 90/270 degrees is applied)
    height: int
    duration_s: float  # the container's duration (the longer of video and audio)
    has_audio: bool
    codec: str  # the video codec, e.g. "h264"
    audio_codec: str | None = None  # e.g. "aac"; None without audio

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def probe(path: str | os.PathLike) -> VideoInfo:
    """What the clip at `path` holds. One-line ImageError for a missing file, a folder, a photo, a file
    that is not a video, or one without a video stream."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not a video clip")
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    cmd = [_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)]
    cmd += ["-map", "0:v:0?", "-c", "copy", "-f", "null", "-", "-progress", "pipe:1", "-nostats"]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    return _parse_probe(path, proc.stderr, proc.stdout, proc.returncode)


def _parse_probe(path: Path, header: str, progress: str, returncode: int) -> VideoInfo:
    fmt = re.search(r"^Input #0, (.+?), from ", header, re.M)
    if fmt is None or returncode != 0 and "Stream #0" not in header:
        reason = _ffmpeg_reason(header)
        raise ImageError(f"{path} is not a video ffmpeg can read" + (f" ({reason})" if reason else ""))
    if any(_IMAGE_DEMUXERS.match(name) for name in fmt.group(1).split(",")):
        raise ImageError(f"{path} is a still image, not a video clip (pass a photo to pti tune as a photo)")
    inputs = header.split("Output #0", 1)[0]
    video = re.search(r"Stream #0:\d+.*?: Video: (\w+).*", inputs)
    if video is None:
        raise ImageError(f"{path} has no video stream")
    line = video.group(0)
    size = re.search(r", (\d+)x(\d+)[, \[]", line)
    if size is None:
        raise ImageError(f"{path}: ffmpeg reports no frame size for its video stream")
    width, height = int(size.group(1)), int(size.group(2))
    rotation = re.search(r"rotation of (-?[\d.]+) degrees", inputs) or re.search(r"rotate\s*:\s*(-?\d+)", inputs)
    if rotation is not None and round(float(rotation.group(1))) % 180 == 90:
        width, height = height, width  # ffmpeg auto-rotates decoded frames
    rate = re.search(r", ([\d.]+)(k?) fps", line) or re.search(r", ([\d.]+)(k?) tbr", line)
    fps = _exact_rate(float(rate.group(1)) * (1000 if rate.group(2) else 1)) if rate else 0.0
    frames = re.findall(r"^frame=(\d+)", progress, re.M)
    duration = re.search(r"Duration: (\d+):(\d+):([\d.]+)", inputs)
    duration_s = (
        int(duration.group(1)) * 3600 + int(duration.group(2)) * 60 + float(duration.group(3)) if duration else 0
    )
    count = int(frames[-1]) if frames else 0
    if count == 0:
        raise ImageError(f"{path} has a video stream without frames")
    if fps <= 0:
        fps = count / duration_s if duration_s > 0 else 25.0  # ffmpeg's own default rate
    audio = re.search(r"Stream #0:\d+.*?: Audio: (\w+)", inputs)
    return VideoInfo(
        path=path,
        fps=fps,
        frames=count,
        width=width,
        height=height,
        duration_s=float(duration_s),
        has_audio=audio is not None,
        codec=video.group(1),
        audio_codec=audio.group(1) if audio else None,
    )


def _exact_rate(shown: float) -> float:
    """The header's rate, with 29.97 read back as 30000/1001 (the header keeps two decimals)."""
    for rate in _NTSC_RATES:
        if abs(float(rate) - shown) < 0.006:
            return float(rate)
    return shown


def _ffmpeg_reason(stderr: str) -> str:
    """ffmpeg's last error line, without its `[tag @ 0x...]` prefix."""
    lines = [re.sub(r"^\[[^\]]*\]\s*", "", s).strip() for s in stderr.splitlines() if s.strip()]
    lines = [s for s in lines if not s.startswith(("Error opening input file", "Error opening input files"))]
    return lines[-1][:200] if lines else ""


# ---------------------------------------------------------------------------- choosing frames


def parse_frames(text: str | None) -> tuple[int, int | None]:
    """`--frames` as (start, stop): "0-120" -> (0, 121) (both ends included), "30-" -> (30, None) (to the
    end), "7" -> (7, 8), None or "" -> (0, None). ValueError naming the problem otherwise."""
    if text is None or not text.strip():
        return 0, None
    text = text.strip()
    m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d*))?", text)
    if m is None:
        raise ValueError(f"--frames {text!r}: expected FIRST-LAST (0-120), FIRST- (30-) or one frame (7)")
    start = int(m.group(1))
    if "-" not in text:
        return start, start + 1
    if not m.group(2):
        return start, None
    last = int(m.group(2))
    if last < start:
        raise ValueError(f"--frames {text!r}: the last frame {last} comes before the first {start}")
    return start, last + 1


@dataclass(frozen=True)
class Selection:
    indices: list[int]  # the frames to use, ascending
    note: str | None  # set when the range was cut to the clip's end


def select(total: int, frames: tuple[int, int | None] = (0, None), every: int = 1, name: str = "the clip") -> Selection:
    """The indices of `frames` (start, stop) = `parse_frames(...)`, every `every`-th from start.

    A start at or past the end is an ImageError naming the clip's length; a stop past the end is cut to
    the end, with a `note` saying so (a range like 0-1000 on a shorter clip means "all of it")."""
    if every < 1:
        raise ValueError(f"--every {every}: must be 1 or more")
    start, stop = frames
    if start >= total:
        raise ImageError(f"{name} has {total} frames (0-{total - 1}); --frames starts at {start}, past its end")
    note = None
    if stop is not None and stop > total:
        note = f"{name} has {total} frames: --frames {start}-{stop - 1} cut to {start}-{total - 1}"
    stop = total if stop is None else min(stop, total)
    return Selection(list(range(start, stop, every)), note)


def iter_frames(path: str | os.PathLike, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(index, frame [H, W, 3] uint8 RGB) for each of `indices` (ascending), decoded one at a time; ffmpeg
    stops after the last one. An ImageError when the clip cannot be decoded or ends early."""
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        return
    if wanted[0] < 0:
        raise ValueError(f"frame index {wanted[0]} is negative")
    iio = _imageio_ffmpeg()
    path = Path(path)
    out = ["-frames:v", str(wanted[-1] + 1), "-fps_mode", "passthrough"]
    reader = iio.read_frames(str(path), output_params=out)
    try:
        try:
            meta = next(reader)
        except (OSError, RuntimeError, StopIteration) as e:
            raise ImageError(f"cannot decode {path}: {first_line(e, typed=False)}") from None
        width, height = meta["size"]
        todo = iter(wanted)
        target = next(todo)
        index = -1
        while True:
            try:
                raw = next(reader)
            except StopIteration:
                raise ImageError(f"{path} ended after {index + 1} frames; frame {target} was asked for") from None
            except RuntimeError as e:
                raise ImageError(f"cannot decode frame {index + 1} of {path}: {first_line(e, typed=False)}") from None
            index += 1
            if index != target:
                continue
            yield index, np.frombuffer(raw, np.uint8).reshape(height, width, 3)
            target = next(todo, None)
            if target is None:
                return
    finally:
        reader.close()  # stops ffmpeg


# ---------------------------------------------------------------------------- tracking one person


def _centre(face: Face) -> np.ndarray:
    left, top, right, bottom = face.box
    return np.array([(left + right) / 2, (top + bottom) / 2], dtype=np.float64)


def _width(face: Face) -> float:
    return float(max(1, face.box[2] - face.box[0]))


class Tracker:
    """Follow one person through a clip, a frame at a time (`step(faces)` as each frame is detected).

    The first frame with faces picks `faces[face]` (detect_faces lists the largest first, so the default
    0 is the largest). Each later frame takes the face whose box centre is nearest the last chosen one,
    unless it is implausible: its centre more than `max_jump` face widths (of the last chosen face) away,
    or its width more than `max_scale` times larger or smaller. Then the person is lost for that frame
    (None), and the search goes on from where it was last seen, so it is found again when it comes back.
    A fixed radius, not one that grows while the person is lost: pasting one person's edit onto another
    is worse than leaving a few frames unedited.
    """

    def __init__(self, face: int = 0, max_jump: float = 1.0, max_scale: float = 2.0):
        self.face = face  # which face of the first frame with faces (0 = the largest)
        self.max_jump = max_jump  # in widths of the last chosen face
        self.max_scale = max_scale  # frame-to-frame width ratio still taken for the same person
        self.last: Face | None = None  # the last face chosen
        self.lost = 0  # frames since it was last seen

    def step(self, faces: Sequence[Face]) -> Face | None:
        if self.last is None:
            if not faces:
                return None
            if not 0 <= self.face < len(faces):
                raise IndexError(f"the first frame with faces has {len(faces)}; face {self.face} is out of range")
            self.last = faces[self.face]
            return self.last
        if faces:
            here, width = _centre(self.last), _width(self.last)
            best = min(faces, key=lambda f: float(np.hypot(*(_centre(f) - here))))
            distance = float(np.hypot(*(_centre(best) - here)))
            ratio = _width(best) / width
            if distance <= self.max_jump * width and 1 / self.max_scale <= ratio <= self.max_scale:
                self.last, self.lost = best, 0
                return best
        self.lost += 1
        return None


def track(frames_faces: Sequence[Sequence[Face]], face: int = 0, max_jump: float = 1.0) -> list[Face | None]:
    """`Tracker.step` over every frame's faces: the tracked person's face per frame, None where lost."""
    tracker = Tracker(face=face, max_jump=max_jump)
    return [tracker.step(faces) for faces in frames_faces]


# ---------------------------------------------------------------------------- steadying the crop


def smooth_landmarks(
    landmarks: np.ndarray, sigma: float, present: np.ndarray | None = None, max_gap: int = 0
) -> np.ndarray:
    """A Gaussian over time (`sigma` in frames of the sequence given) of each landmark coordinate.

    landmarks: [F, 68, 2]; rows of frames where `present` [F] is False are ignored (they may hold anything,
    NaN included). A normalized convolution: each frame's value is the Gaussian-weighted mean over the
    present frames only (weights renormalized), so missing frames and the clip's ends pull nothing
    towards zero. At the ends the window is one-sided, so a face moving steadily is pulled back by up to
    ~0.8 sigma frames of its motion there.

    Absent frames come back as NaN rows, except those in a gap of at most `max_gap` frames with present
    frames on both sides: they are filled by linear interpolation between the smoothed frames around the
    gap (a face a detector missed for a frame or two is still there). sigma=0 returns the present frames
    unchanged, bit for bit.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must be [F, 68, 2], got {list(lm.shape)}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    count = lm.shape[0]
    mask = np.ones(count, bool) if present is None else np.asarray(present, bool)
    if mask.shape != (count,):
        raise ValueError(f"present must be [{count}], got {list(mask.shape)}")
    out = np.full_like(lm, np.nan)
    if not mask.any():
        return out
    if sigma == 0:
        out[mask] = lm[mask]
    else:
        weights = mask.astype(np.float64)
        values = np.where(mask[:, None, None], lm, 0.0)
        # mode="constant": frames beyond the ends count as absent, like missing ones.
        num = scipy.ndimage.gaussian_filter1d(values, sigma, axis=0, mode="constant", cval=0.0)
        den = scipy.ndimage.gaussian_filter1d(weights, sigma, axis=0, mode="constant", cval=0.0)
        out[mask] = num[mask] / den[mask, None, None]
    if max_gap > 0:
        _fill_gaps(out, mask, max_gap)
    return out


def _fill_gaps(out: np.ndarray, mask: np.ndarray, max_gap: int) -> None:
    """Linear interpolation across runs of absent frames no longer than `max_gap`, in place."""
    present = np.flatnonzero(mask)
    for before, after in zip(present[:-1], present[1:]):
        gap = after - before - 1
        if 0 < gap <= max_gap:
            t = (np.arange(1, gap + 1) / (gap + 1))[:, None, None]
            out[before + 1 : after] = out[before] * (1 - t) + out[after] * t


def smoothed_quads(landmarks: np.ndarray) -> np.ndarray:
    """The FFHQ crop quad [F, 4, 2] of each frame's landmarks [F, 68, 2] (from `smooth_landmarks`);
    NaN quads for NaN rows."""
    lm = np.asarray(landmarks, dtype=np.float64)
    quads = np.full((lm.shape[0], 4, 2), np.nan)
    for i, row in enumerate(lm):
        if np.isfinite(row).all():
            quads[i] = face_quad(row)[0]
    return quads


# ---------------------------------------------------------------------------- writing


def audio_span(indices: Sequence[int], fps: float) -> tuple[float, float]:
    """(start_s, duration_s) of the source's time that frames `indices` (evenly spaced) cover: frame i
    shows from i/fps for step/fps seconds, so the span runs from first/fps to (last + step)/fps."""
    if not indices:
        return 0.0, 0.0
    step = indices[1] - indices[0] if len(indices) > 1 else 1
    return indices[0] / fps, (indices[-1] - indices[0] + step) / fps


class VideoWriter:
    """Stream RGB uint8 frames [H, W, 3] of `size` (W, H) into an H.264 MP4 at `path`, atomically.

        with VideoWriter("out.mp4", fps, (w, h), audio_from="clip.mp4", audio_start_s=s, audio_duration_s=d) as out:
            for frame in frames:
                out.write(frame)
        out.audio  # "copied", "re-encoded (aac)", "none: <why>" or None (no audio asked for)

    yuv420p halves the chroma resolution, so libx264 needs even sizes: an odd width or height is padded
    by one column or row repeating the last one (the output is then `out_size`; nothing is scaled).
    Frames go to a temporary file beside `path` that is renamed onto it only when the block ends without
    an error; an error or Ctrl-C leaves `path` as it was and no temporary file.

    Audio: after the video is written, the audio stream of `audio_from` is muxed in by stream copy
    (`-map 0:v -map 1:a? -c:v copy -c:a copy`), re-encoded to AAC when the codec cannot go into MP4.
    Only the span `audio_start_s` .. + `audio_duration_s` of the source is taken (`-ss`/`-t` on the audio
    input; see `audio_span`), never longer than the video (frames / fps), so a sub-range or `--every`
    render keeps its sound in step when written at fps / every. Stream copy cuts at audio packet
    boundaries (about 21 ms for AAC at 48 kHz). Not `-shortest`: with stream copy it drops the last video
    frame when the audio ends a packet early (measured: 17 of 18 frames).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float,
        size: tuple[int, int],
        audio_from: str | os.PathLike | None = None,
        audio_start_s: float = 0.0,
        audio_duration_s: float | None = None,
        crf: int = 18,  # libx264 quality: 0 lossless, 18 visually lossless, 23 its default
    ):
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        self.fps = fps
        self.size = (int(size[0]), int(size[1]))
        self.out_size = (self.size[0] + self.size[0] % 2, self.size[1] + self.size[1] % 2)
        self.audio_from = None if audio_from is None else Path(audio_from)
        self.audio_start_s = audio_start_s
        self.audio_duration_s = audio_duration_s
        self.crf = crf
        self.frames = 0  # frames written so far
        self.audio: str | None = None  # what happened to the audio (set on a successful close)
        self._stack: contextlib.ExitStack | None = None
        self._encoder = None
        self._video_path: Path | None = None

    def __enter__(self) -> VideoWriter:
        iio = _imageio_ffmpeg()
        stack = contextlib.ExitStack()
        try:
            final = stack.enter_context(atomic_path(self.path, suffix=".mp4"))
            self._final = final
            if self.audio_from is None:
                self._video_path = final
            else:  # the video alone first, the mux into `final` after
                fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{self.path.name}.", suffix=".video.mp4")
                os.close(fd)
                self._video_path = Path(name)
                stack.callback(self._video_path.unlink, missing_ok=True)
            self._encoder = iio.write_frames(
                str(self._video_path),
                self.out_size,
                fps=Fraction(self.fps).limit_denominator(100000),
                codec="libx264",
                pix_fmt_out="yuv420p",
                quality=None,
                macro_block_size=1,  # no rescaling to multiples of 16: even sizes are all libx264 needs
                ffmpeg_log_level="error",
                output_params=["-crf", str(self.crf), "-f", "mp4", "-movflags", "+faststart"],
            )
            self._encoder.send(None)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def write(self, frame: np.ndarray) -> None:
        arr = np.asarray(frame)
        w, h = self.size
        if arr.shape != (h, w, 3) or arr.dtype != np.uint8:
            raise ValueError(f"frame must be [{h}, {w}, 3] uint8, got {list(arr.shape)} {arr.dtype}")
        if self.out_size != self.size:
            arr = np.pad(arr, ((0, self.out_size[1] - h), (0, self.out_size[0] - w), (0, 0)), mode="edge")
        self._encoder.send(np.ascontiguousarray(arr))
        self.frames += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        try:
            self._encoder.close()  # ffmpeg finishes the file (on an error too: it is removed below)
            if exc_type is None:
                if self.frames == 0:
                    raise OutputError(f"no frames were written to {self.path}")
                if self.audio_from is not None:
                    self.audio = self._mux()
        except BaseException as e:
            if not stack.__exit__(type(e), e, e.__traceback__):
                raise
            return True
        # atomic_path renames the file onto `path` only when exc_type is None; else it removes it
        return bool(stack.__exit__(exc_type, exc, tb))

    def _mux(self) -> str:
        """Mux the source's audio into the final file; returns what happened to it."""
        source = self.audio_from
        try:
            info = probe(source)
        except ImageError as e:
            raise ImageError(f"cannot take the audio from {source}: {e}") from None
        if not info.has_audio:
            os.replace(self._video_path, self._final)
            return "none: the source has no audio"
        length = self.frames / self.fps  # the audio never outlasts the video
        if self.audio_duration_s is not None:
            length = min(length, self.audio_duration_s)
        span = ["-ss", f"{self.audio_start_s:.6f}", "-t", f"{length:.6f}"]
        base = [_ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-i", str(self._video_path)]
        base += span + ["-i", str(source), "-map", "0:v", "-map", "1:a?", "-c:v", "copy"]
        tail = ["-movflags", "+faststart", "-f", "mp4", str(self._final)]
        for codec, what in (["copy"], "copied"), (["aac", "-b:a", "192k"], "re-encoded (aac)"):
            proc = subprocess.run(base + ["-c:a", *codec] + tail, capture_output=True, text=True, errors="replace")
            if proc.returncode == 0:
                return what
        raise ImageError(f"cannot mux the audio of {source} into {self.path}: {_ffmpeg_reason(proc.stderr)}")
