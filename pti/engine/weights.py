"""Known weight files: names, sources, checksums, one cache, and clear offline errors.

Everything `pti` loads from outside the repository is listed in `DEFAULT_ENTRIES`. The rest of the
code asks `resolve(name)` for a local path; it never downloads behind the user's back (pass
`fetch=True`, or run `pti weights fetch NAME`). When a file is absent the error names the file,
its source URL and the exact `pti weights import PATH` command for machines without internet.

The cache is one flat directory: `$PTI_HOME` when set, else the user cache directory
(`$XDG_CACHE_HOME/pti`, default `~/.cache/pti`, on Linux). Downloads and imports go to a temporary
file in that directory and are renamed into place only after the checksum passes, so a file under
its final name is always complete.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pti.fsutil import atomic_path
from pti.errors import WeightsError

# progress(done_bytes, total_bytes or None); the CLI turns it into a progress bar.
ProgressFn = Callable[[int, "int | None"], None]

_CHUNK = 1 << 20  # 1 MiB reads: small enough for a smooth bar, large enough to be fast.
_PTI_COMMIT = "da94d59d15d94822e95840ab5a0aa9ba1a19c851"  # danielroich/PTI, source of the direction files
_PTI_RAW = f"https://raw.githubusercontent.com/danielroich/PTI/{_PTI_COMMIT}"
_LPIPS_RAW = "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1"


@dataclass(frozen=True)
class WeightEntry:
    """One known file."""

    name: str  # what users type: `pti weights fetch ffhq`
    filename: str  # its name inside the cache directory
    url: str  # where `fetch` downloads it from
    size: int | None  # bytes, when known; checked after download and import
    sha256: str | None  # full hex digest, when known (None: not published / not verified by us)
    license: str  # the licence under which the file is published
    used_by: str  # what in `pti` needs it
    sha256_prefix: str | None = None  # torchvision names files `<model>-<first 8 hex of sha256>.pth`

    def check_digest(self, digest: str) -> str | None:
        """None when `digest` (full sha256 hex) is acceptable for this entry, else the reason."""
        if self.sha256 is not None and digest != self.sha256:
            return f"sha256 {digest} does not match the expected {self.sha256}"
        if self.sha256_prefix is not None and not digest.startswith(self.sha256_prefix):
            return f"sha256 {digest} does not start with the expected {self.sha256_prefix}"
        return None


# Checksums: lpips heads hashed from richzhang/PerceptualSimilarity (commit 082bb24); direction files
# hashed from danielroich/PTI@da94d59 (see ../shared/fixtures/README.md); the AlexNet trunk's full
# sha256 and size as published in several independent manifests, agreeing with its filename prefix.
# NVIDIA publishes no checksum for ffhq.pkl and vgg16.pt, and we found none for torchvision's VGG16
# beyond its filename prefix: those stay None (the prefix is still checked).
DEFAULT_ENTRIES: tuple[WeightEntry, ...] = (
    WeightEntry(
        name="ffhq",
        filename="ffhq.pkl",
        url="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/ffhq.pkl",
        size=None,
        sha256=None,
        license="NVIDIA Source Code License-NC (non-commercial)",
        used_by="the base StyleGAN2-ADA FFHQ 1024 px generator (key G_ema)",
    ),
    WeightEntry(
        name="vgg16-metric",
        filename="vgg16.pt",
        url="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt",
        size=None,
        sha256=None,
        license="CC BY 4.0 (VGG16 weights, Simonyan & Zisserman), TorchScript port by NVIDIA",
        used_by="inversion loss (perceptual.VGG16Metric)",
    ),
    WeightEntry(
        name="alexnet",
        filename="alexnet-owt-7be5be79.pth",
        url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        size=244_408_911,
        sha256="7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
        sha256_prefix="7be5be79",
        license="BSD-3-Clause (torchvision)",
        used_by="LPIPS alex trunk (tuning loss)",
    ),
    WeightEntry(
        name="vgg16",
        filename="vgg16-397923af.pth",
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        size=None,
        sha256=None,
        sha256_prefix="397923af",
        license="BSD-3-Clause (torchvision)",
        used_by="LPIPS vgg trunk (evaluation)",
    ),
    WeightEntry(
        name="lpips-alex",
        filename="lpips_v0.1_alex.pth",
        url=f"{_LPIPS_RAW}/alex.pth",
        size=6_009,
        sha256="df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
        license="BSD-2-Clause (lpips)",
        used_by="LPIPS v0.1 alex linear heads (tuning loss)",
    ),
    WeightEntry(
        name="lpips-vgg",
        filename="lpips_v0.1_vgg.pth",
        url=f"{_LPIPS_RAW}/vgg.pth",
        size=7_289,
        sha256="a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
        license="BSD-2-Clause (lpips)",
        used_by="LPIPS v0.1 vgg linear heads (evaluation)",
    ),
    WeightEntry(
        name="interfacegan-age",
        filename="interfacegan_age.pt",
        url=f"{_PTI_RAW}/editings/interfacegan_directions/age.pt",
        size=2_808,
        sha256="50074516b1629707d89b5e43d6b8abd1792212fa3b961a87a11323d6a5222ae0",
        license="MIT (PTI)",
        used_by="edit direction `age`",
    ),
    WeightEntry(
        name="interfacegan-smile",
        filename="interfacegan_smile.pt",
        url=f"{_PTI_RAW}/editings/interfacegan_directions/smile.pt",
        size=2_808,
        sha256="817a7e732b59dee9eba862bec8bd7e8373568443bc9f9731a21cf9b0356f0653",
        license="MIT (PTI)",
        used_by="edit direction `smile`",
    ),
    WeightEntry(
        name="interfacegan-rotation",
        filename="interfacegan_rotation.pt",
        url=f"{_PTI_RAW}/editings/interfacegan_directions/rotation.pt",
        size=2_808,
        sha256="9ef9787ac6b7b37940e47fef22e78cbbe5aeae2e566c0b391bf279f3264b1d1c",
        license="MIT (PTI)",
        used_by="edit direction `rotation`",
    ),
    WeightEntry(
        name="ganspace-ffhq",
        filename="ganspace_ffhq_pca.pt",
        url=f"{_PTI_RAW}/editings/ganspace_pca/ffhq_pca.pt",
        size=167_562,
        sha256="4d7f9df1c96180d9026b9cb8d04753579fbf385f321a9d0e263641601c5e5d36",
        license="MIT (PTI)",
        used_by="GANSpace edits (eye_openness, smile, trimmed_beard)",
    ),
)


def default_cache_dir() -> Path:
    """`$PTI_HOME`, else the platform's user cache directory + `/pti`."""
    env = os.environ.get("PTI_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pti"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Registry:
    """A set of `WeightEntry`s and the cache directory they live in."""

    def __init__(self, entries: Iterable[WeightEntry] = DEFAULT_ENTRIES, cache_dir: str | Path | None = None):
        self.entries: dict[str, WeightEntry] = {e.name: e for e in entries}
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None

    @property
    def cache_dir(self) -> Path:
        return self._cache_dir if self._cache_dir is not None else default_cache_dir()

    def get(self, name: str) -> WeightEntry:
        """The entry called `name` (its cache filename is accepted too)."""
        if name in self.entries:
            return self.entries[name]
        for e in self.entries.values():
            if name == e.filename:
                return e
        raise WeightsError(f"unknown weights '{name}'; known: {', '.join(self.entries)}")

    def path(self, name: str) -> Path:
        """Where the file lives (or would live) in the cache."""
        return self.cache_dir / self.get(name).filename

    def status(self, name: str) -> str:
        """'cached', 'missing', or 'wrong size' (a cheap check: hashing is left to fetch/import)."""
        entry, p = self.get(name), self.path(name)
        if not p.is_file():
            return "missing"
        if entry.size is not None and p.stat().st_size != entry.size:
            return "wrong size"
        return "cached"

    def missing_message(self, name: str, reason: str | None = None) -> str:
        """The one-line, actionable message for an absent file."""
        e = self.get(name)
        why = f" ({reason})" if reason else ""
        fetch_hint = "" if reason else f"run `pti weights fetch {e.name}`, or "
        return (
            f"weights file {e.filename} ({e.used_by}) is not in the cache {self.cache_dir}{why}; "
            f"{fetch_hint}download {e.url} on a machine with internet and run "
            f"`pti weights import PATH/TO/{e.url.rsplit('/', 1)[-1]} --name {e.name}`"
        )

    def resolve(self, name: str, fetch: bool = False, progress: ProgressFn | None = None) -> Path:
        """Path of the cached file; downloads it only when `fetch` is True, else raises WeightsError."""
        status = self.status(name)
        if status == "cached":
            return self.path(name)
        if fetch:
            return self.fetch(name, progress=progress)
        raise WeightsError(self.missing_message(name, None if status == "missing" else "cached copy has the wrong size"))

    def fetch(self, name: str, progress: ProgressFn | None = None, timeout: float = 30.0, force: bool = False) -> Path:
        """Download `name` into the cache (no-op when already cached, unless `force`)."""
        entry = self.get(name)
        if not force and self.status(name) == "cached":
            return self.path(name)
        try:
            response = urllib.request.urlopen(entry.url, timeout=timeout)  # noqa: S310 (https/file URLs we list)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise WeightsError(self.missing_message(name, f"download failed: {reason}")) from None
        with response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else entry.size
            return self._install(entry, response, total, progress, source=entry.url)

    def import_file(self, src: str | Path, name: str | None = None) -> Path:
        """Copy a user's file into the cache after checking it (the entry is guessed when `name` is None)."""
        src = Path(src)
        if not src.is_file():
            raise WeightsError(f"cannot import {src}: no such file")
        entry = self.get(name) if name else self._guess_entry(src)
        with open(src, "rb") as f:
            return self._install(entry, f, src.stat().st_size, None, source=str(src))

    def _guess_entry(self, src: Path) -> WeightEntry:
        """Match a file to an entry by its name (cache filename or source basename), then by checksum."""
        for e in self.entries.values():
            if src.name in (e.filename, e.url.rsplit("/", 1)[-1]):
                return e
        digest = sha256_file(src)
        for e in self.entries.values():
            if e.sha256 == digest:
                return e
        raise WeightsError(f"cannot tell which weights {src} is; pass --name (one of: {', '.join(self.entries)})")

    def _install(self, entry: WeightEntry, stream: BinaryIO, total: int | None, progress: ProgressFn | None, source: str) -> Path:
        """Stream into a temp file in the cache dir, verify, then atomically rename into place."""
        cache = self.cache_dir
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WeightsError(f"cannot create the weights cache {cache}: {e.strerror or e}") from None
        final = cache / entry.filename
        try:
            with atomic_path(final, suffix=".part") as tmp:
                h, done = hashlib.sha256(), 0
                with open(tmp, "wb") as out:
                    while chunk := stream.read(_CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
                if total is not None and done != total:
                    problem = f"got {done} bytes of {total}: the transfer was cut short"
                elif entry.size is not None and done != entry.size:
                    problem = f"size {done} bytes differs from the expected {entry.size}"
                else:
                    problem = entry.check_digest(h.hexdigest())
                if problem:  # raising inside the block removes the temporary file
                    raise WeightsError(f"{entry.filename} from {source} is corrupt or incomplete ({problem}); nothing was saved")
            return final
        except (OSError, EOFError, http.client.HTTPException) as e:  # connection reset, IncompleteRead, disk full
            raise WeightsError(self.missing_message(entry.name, f"transfer from {source} failed: {type(e).__name__}: {e}")) from None

def default_registry() -> Registry:
    """The registry of `DEFAULT_ENTRIES` in the default cache directory (read at call time)."""
    return Registry(DEFAULT_ENTRIES)


def resolve(name: str, fetch: bool = False, progress: ProgressFn | None = None) -> Path:
    """Local path of weights `name` from the default registry; see `Registry.resolve`."""
    return default_registry().resolve(name, fetch=fetch, progress=progress)

