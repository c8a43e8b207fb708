"""Known weight files: names, sources, checksums, one cache, and clear offline errors.

Everything `pti` loads from outside the repository is listed in `DEFAULT_ENTRIES`. The rest of the
code asks `resolve(name)` for a local path; it never downloads behind the user's back (pass
`fetch=True`, or run `pti weights fetch NAME`). When a file is absent the error names the file,
its source URL and the exact `pti weights import PATH` command for machines without internet.

The cache is one flat directory (`pti.fsutil.default_cache_dir`): `$PTI_HOME` when set, else the user
cache directory (`$XDG_CACHE_HOME/pti`, default `~/.cache/pti`, on Linux). Downloads and imports go to a
temporary file in that directory and are renamed into place only after the checksum passes, so a file
under its final name is always complete.

Files with no published sha256 (`ffhq.pkl`, `vgg16.pt`, torchvision's VGG16) are trusted on first
use: the first fetch, import or load writes `<filename>.first-use.json` beside the file (its
sha256, size and mtime_ns), and from then on a file with another sha256 is refused until the user
accepts it with `pti weights import FILE --name NAME --force`. Loading re-hashes only when the
file's size or mtime_ns differ from the record, so an unchanged 360 MB file costs one `stat`. The
record guards against a changed or swapped file (a new upstream release, a wrong copy, a partial
overwrite), not against someone who can write the cache: they can rewrite the record too.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import BinaryIO

from pti.errors import OutputError, WeightsError
from pti.fsutil import atomic_path, default_cache_dir, sha256_file

# progress(done_bytes, total_bytes or None); the CLI turns it into a progress bar.
ProgressFn = Callable[[int, "int | None"], None]

_CHUNK = 1 << 20  # 1 MiB reads: small enough for a smooth bar, large enough to be fast.
_PTI_COMMIT = "da94d59d15d94822e95840ab5a0aa9ba1a19c851"  # danielroich/PTI, source of the direction files
_PTI_RAW = f"https://raw.githubusercontent.com/danielroich/PTI/{_PTI_COMMIT}"
_LPIPS_RAW = "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1"
_RECORD_SUFFIX = ".first-use.json"  # `ffhq.pkl` -> `ffhq.pkl.first-use.json`, beside it in the cache

# How `pti` loads each kind of file, and whether loading runs code that the file carries.
KINDS: dict[str, bool] = {
    "tensors": False,  # torch.load(weights_only=True): tensors and plain containers only
    "network pickle": False,  # pti.engine.safe_pickle's allow-list unpickler: no code from the file runs
    "TorchScript": True,  # torch.jit.load: the file is a program, and loading it runs that program
}


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
    kind: str = "tensors"  # how pti loads it, one of KINDS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"WeightEntry {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")

    @property
    def executes_code(self) -> bool:
        """True when loading the file runs code it carries (TorchScript): trust its source as you would a program's."""
        return KINDS[self.kind]

    @property
    def trust_on_first_use(self) -> bool:
        """True when no full sha256 is published: the cache records the first copy's and holds later ones to it."""
        return self.sha256 is None

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
# beyond its filename prefix: those stay None (the prefix is still checked), and the cache trusts the
# first copy it sees (see `FirstUse`). The encoders (the URLs their authors' READMEs give, Google Drive
# pages) publish none either: trusted on first use too; a browser downloads them (`fetch` gets the page).
DEFAULT_ENTRIES: tuple[WeightEntry, ...] = (
    WeightEntry(
        name="ffhq",
        filename="ffhq.pkl",
        url="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/ffhq.pkl",
        size=None,
        sha256=None,
        license="NVIDIA Source Code License-NC (non-commercial)",
        used_by="the base StyleGAN2-ADA FFHQ 1024 px generator (key G_ema)",
        kind="network pickle",
    ),
    WeightEntry(
        name="vgg16-metric",
        filename="vgg16.pt",
        url="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt",
        size=None,
        sha256=None,
        license="CC BY 4.0 (VGG16 weights, Simonyan & Zisserman), TorchScript port by NVIDIA",
        used_by="inversion loss (perceptual.VGG16Metric)",
        kind="TorchScript",
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
        name="e4e-ffhq",
        filename="e4e_ffhq_encode.pt",
        url="https://drive.google.com/file/d/1cUv_reLE6k3604or78EranS7XzuVMWeO/view?usp=sharing",
        size=None,
        sha256=None,
        license="MIT (encoder4editing); trained on FFHQ (CC BY-NC-SA 4.0 images)",
        used_by="the e4e encoder that starts the pivot (pti tune --init e4e)",
    ),
    WeightEntry(
        name="restyle-e4e-ffhq",
        filename="restyle_e4e_ffhq_encode.pt",
        url="https://drive.google.com/file/d/1e2oXVeBPXMQoUoC_4TNwAWpOPpSEhE_e/view?usp=sharing",
        size=None,
        sha256=None,
        license="MIT (restyle-encoder); trained on FFHQ (CC BY-NC-SA 4.0 images)",
        used_by="the ReStyle-e4e encoder that starts the pivot (pti tune --init restyle)",
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


@dataclass(frozen=True)
class FirstUse:
    """What the cache remembers of a file with no published sha256: the copy it saw first.

    Stored as JSON in `<filename>.first-use.json` beside the file, with a "file" key naming it.
    """

    sha256: str  # hex digest of the first copy fetched, imported or loaded
    size: int  # bytes, when last hashed
    mtime_ns: int  # the file's st_mtime_ns when last hashed: size and mtime_ns unchanged -> no re-hash
    recorded: str  # when that copy was first seen, UTC, ISO 8601
    source: str  # where it came from: a URL, an imported path, or "found in the cache"

    def same_stat(self, st: os.stat_result) -> bool:
        """Size and mtime_ns as recorded: the file is taken as unchanged without reading it. (Blind spot:
        a same-size rewrite within one tick of the file system's clock, ms to 2 s, right after the record.)"""
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns

    def valid(self) -> bool:
        return (
            isinstance(self.sha256, str)
            and re.fullmatch(r"[0-9a-f]{64}", self.sha256) is not None
            and type(self.size) is int
            and self.size >= 0
            and type(self.mtime_ns) is int
            and isinstance(self.recorded, str)
            and isinstance(self.source, str)
        )

    def describe(self) -> str:
        return f"sha256 {self.sha256}, {self.size} bytes, first recorded {self.recorded} from {self.source}"


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _restamp(prior: FirstUse | None, digest: str, st: os.stat_result, source: str) -> FirstUse:
    """The record after a copy with `digest` was accepted; the first-use date survives while the content is the same."""
    if prior is not None and prior.sha256 == digest:
        return replace(prior, size=st.st_size, mtime_ns=st.st_mtime_ns)
    return FirstUse(digest, st.st_size, st.st_mtime_ns, _utc_now(), source)


NEEDS_DOWNLOAD = ("missing", "wrong size")  # statuses under which resolve/fetch download rather than check


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

    def record_path(self, name: str) -> Path:
        """Where the first-use record of `name` lives: beside the file."""
        return self.cache_dir / (self.get(name).filename + _RECORD_SUFFIX)

    def record(self, name: str) -> FirstUse | None:
        """The first-use record of `name`, None when there is none; WeightsError when it is unreadable."""
        entry, rp = self.get(name), self.record_path(name)
        try:
            raw = rp.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise WeightsError(self._unreadable_record(entry, getattr(e, "strerror", None) or str(e))) from None
        try:
            data = json.loads(raw)
            rec = FirstUse(**{f.name: data[f.name] for f in fields(FirstUse)})
        except ValueError:
            raise WeightsError(self._unreadable_record(entry, "not valid JSON")) from None
        except (KeyError, TypeError):
            raise WeightsError(self._unreadable_record(entry, "fields missing")) from None
        if data.get("file") != entry.filename or not rec.valid():
            raise WeightsError(self._unreadable_record(entry, f"not a valid record of {entry.filename}"))
        return rec

    def status(self, name: str) -> str:
        """A cheap check: one stat and the small first-use record (hashing is left to resolve, fetch, import).

        'missing'; 'wrong size' (differs from the published size); 'changed since first use' (size
        differs from the record); 'first-use record unreadable'; else 'cached', with a note when the
        next load will hash the file ('not yet recorded', or 'touched' when only mtime_ns moved).
        """
        entry, p = self.get(name), self.path(name)
        if not p.is_file():
            return "missing"
        st = p.stat()
        if entry.size is not None and st.st_size != entry.size:
            return "wrong size"
        if not entry.trust_on_first_use:
            return "cached"
        try:
            rec = self.record(name)
        except WeightsError:
            return "first-use record unreadable"
        if rec is None:
            return "cached, not yet recorded"
        if st.st_size != rec.size:
            return "changed since first use"
        return "cached" if rec.same_stat(st) else "cached, touched (re-hashed on next use)"

    def missing_message(self, name: str, reason: str | None = None) -> str:
        """The one-line, actionable message for an absent file."""
        e = self.get(name)
        why = f" ({reason})" if reason else ""
        fetch_hint = "" if reason else f"run `pti weights fetch {e.name}`, or "
        return (
            f"weights file {e.filename} ({e.used_by}) is not in the cache {self.cache_dir}{why}; "
            f"{fetch_hint}download {e.url} on a machine with internet and run "
            f"`pti weights import PATH/TO/{_source_name(e)} --name {e.name}`"
        )

    def resolve(self, name: str, fetch: bool = False, progress: ProgressFn | None = None) -> Path:
        """Path of the cached file, held to its first-use record.

        Downloads only when `fetch` is True; otherwise an absent file raises WeightsError.
        """
        status = self.status(name)
        if status not in NEEDS_DOWNLOAD:
            return self._checked(self.get(name))
        if fetch:
            return self.fetch(name, progress=progress)
        raise WeightsError(
            self.missing_message(name, None if status == "missing" else "cached copy has the wrong size")
        )

    def fetch(self, name: str, progress: ProgressFn | None = None, timeout: float = 30.0, force: bool = False) -> Path:
        """Download `name` into the cache (no-op when already cached, unless `force`).

        With `force` the download replaces the cached copy, but for a file with a first-use record
        only when it has the recorded sha256: `force` restores the original, never accepts a new one.
        """
        entry = self.get(name)
        if not force and self.status(name) not in NEEDS_DOWNLOAD:
            return self._checked(entry)
        prior = self._prior(entry, accept_new=False)  # an unreadable record stops us before the download
        try:
            response = urllib.request.urlopen(entry.url, timeout=timeout)  # noqa: S310 (https/file URLs we list)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise WeightsError(self.missing_message(name, f"download failed: {reason}")) from None
        with response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else entry.size
            return self._install(
                entry, response, total, progress, source=entry.url, prior=prior, accept_new=False, via="fetch"
            )

    def import_file(self, src: str | Path, name: str | None = None, force: bool = False) -> Path:
        """Copy a user's file into the cache after checking it (the entry is guessed when `name` is None).

        A file whose sha256 differs from the entry's first-use record is refused unless `force`,
        which replaces the cached copy and its record. Importing the cached file itself only
        (re)records it.
        """
        src = Path(src)
        if not src.is_file():
            raise WeightsError(f"cannot import {src}: no such file")
        entry = self.get(name) if name else self._guess_entry(src)
        final = self.cache_dir / entry.filename
        if final.is_file() and os.path.samefile(src, final):
            return self._accept_in_place(entry, final, force)
        prior = self._prior(entry, accept_new=force)
        with open(src, "rb") as f:
            return self._install(
                entry,
                f,
                src.stat().st_size,
                None,
                source=str(src.absolute()),
                prior=prior,
                accept_new=force,
                via="import",
            )

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

    def _prior(self, entry: WeightEntry, accept_new: bool) -> FirstUse | None:
        """The record a new copy is held to: None without one, or when `accept_new` and it is unreadable."""
        if not entry.trust_on_first_use:
            return None
        try:
            return self.record(entry.name)
        except WeightsError:
            if accept_new:
                return None
            raise

    def _checked(self, entry: WeightEntry) -> Path:
        """The cached file, held to its first-use record (written now when there is none).

        One stat when size and mtime_ns match the record. Otherwise the file is hashed once: a new
        sha256 is refused; the same one re-stamps the record, so the next load is one stat again.
        """
        path = self.cache_dir / entry.filename
        if not entry.trust_on_first_use:
            return path  # the published sha256 was checked when the file was fetched or imported
        rec = self.record(entry.name)
        try:
            st = path.stat()  # before hashing: a change made while we hash shows up as a new stat next time
            if rec is not None and rec.same_stat(st):
                return path
            digest = sha256_file(path)
        except OSError as e:
            raise WeightsError(f"cannot read the weights file {path}: {e.strerror or e}") from None
        if rec is None:
            problem = entry.check_digest(digest)
            if problem:
                raise WeightsError(
                    f"{path} is not the expected {entry.name} file ({problem}); "
                    f"replace it with `pti weights fetch {entry.name} --force`"
                )
        elif digest != rec.sha256:
            raise WeightsError(
                f"{entry.filename} in {self.cache_dir} changed since its first use (now sha256 {digest}, "
                f"{st.st_size} bytes; was {rec.describe()}); restore it with `pti weights fetch {entry.name} --force`, "
                f"or accept the new file with `pti weights import {path} --name {entry.name} --force`"
            )
        try:
            self._write_record(entry, _restamp(rec, digest, st, "found in the cache"))
        except OutputError:
            pass  # a read-only cache: the file passed; it is hashed again on the next load
        return path

    def _accept_in_place(self, entry: WeightEntry, path: Path, force: bool) -> Path:
        """`import` of the cached file itself: check it and (re)record it, copying nothing."""
        prior = self._prior(entry, accept_new=force)
        st = path.stat()
        digest = sha256_file(path)
        problem = (
            f"size {st.st_size} bytes differs from the expected {entry.size}"
            if entry.size is not None and st.st_size != entry.size
            else entry.check_digest(digest)
        )
        if problem:
            raise WeightsError(
                f"{path} is corrupt ({problem}); replace it with `pti weights fetch {entry.name} --force`"
            )
        if prior is not None and digest != prior.sha256 and not force:
            raise WeightsError(self._refusal(entry, str(path), digest, st.st_size, prior, "import"))
        if entry.trust_on_first_use:
            self._write_record(entry, _restamp(prior, digest, st, str(path)))
        return path

    def _install(
        self,
        entry: WeightEntry,
        stream: BinaryIO,
        total: int | None,
        progress: ProgressFn | None,
        source: str,
        prior: FirstUse | None,
        accept_new: bool,
        via: str,
    ) -> Path:
        """Stream into a temp file in the cache dir, verify, then atomically rename into place and record it."""
        cache = self.cache_dir
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WeightsError(f"cannot create the weights cache {cache}: {e.strerror or e}") from None
        final = cache / entry.filename
        try:
            with atomic_path(final, suffix=".part") as tmp:
                h, done, head = hashlib.sha256(), 0, b""
                with open(tmp, "wb") as out:
                    while chunk := stream.read(_CHUNK):
                        head = head or chunk[:64]
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
                digest = h.hexdigest()
                if total is not None and done != total:
                    problem = f"got {done} bytes of {total}: the transfer was cut short"
                elif entry.size is not None and done != entry.size:
                    problem = f"size {done} bytes differs from the expected {entry.size}"
                elif head.lstrip()[:5].lower() in (b"<!doc", b"<html"):  # a web page, not weights
                    problem = (
                        "the server sent a web page, not the file (Google Drive asks a browser to confirm large "
                        "downloads); download it in a browser and run "
                        f"`pti weights import PATH/TO/{_source_name(entry)} --name {entry.name}`"
                    )
                else:
                    problem = entry.check_digest(digest)
                # raising inside the block removes the temporary file
                if problem:
                    raise WeightsError(
                        f"{entry.filename} from {source} is corrupt or incomplete ({problem}); nothing was saved"
                    )
                if prior is not None and digest != prior.sha256 and not accept_new:
                    raise WeightsError(self._refusal(entry, source, digest, done, prior, via))
        except (OSError, EOFError, http.client.HTTPException) as e:  # connection reset, IncompleteRead, disk full
            raise WeightsError(
                self.missing_message(entry.name, f"transfer from {source} failed: {type(e).__name__}: {e}")
            ) from None
        if entry.trust_on_first_use:
            self._write_record(entry, _restamp(prior, digest, final.stat(), source))
        return final

    def _write_record(self, entry: WeightEntry, rec: FirstUse) -> None:
        data = {"file": entry.filename, **{f.name: getattr(rec, f.name) for f in fields(FirstUse)}}
        with atomic_path(self.cache_dir / (entry.filename + _RECORD_SUFFIX)) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    def _refusal(self, entry: WeightEntry, source: str, digest: str, size: int, prior: FirstUse, via: str) -> str:
        """One line: a copy differs from the recorded first one, and how to take it on purpose."""
        head = (
            f"{source} is not the {entry.filename} this cache recorded on first use (it has sha256 {digest}, "
            f"{size} bytes; the record has {prior.describe()}); nothing was saved"
        )
        if via == "fetch":
            return (
                f"{head}; if the file changed upstream on purpose, download {entry.url} yourself and run "
                f"`pti weights import PATH/TO/{_source_name(entry)} --name {entry.name} --force`"
            )
        return f"{head}; to replace it on purpose run `pti weights import {source} --name {entry.name} --force`"

    def _unreadable_record(self, entry: WeightEntry, why: str) -> str:
        path, rp = self.cache_dir / entry.filename, self.cache_dir / (entry.filename + _RECORD_SUFFIX)
        return (
            f"cannot read the first-use record {rp} ({why}); to trust the cached file again run "
            f"`pti weights import {path} --name {entry.name} --force`, or delete {rp}"
        )


def _source_name(e: WeightEntry) -> str:
    """The downloaded file's name: the URL's last part, or the cache filename where that is a web page
    (a Google Drive `view?usp=sharing` link)."""
    last = e.url.rsplit("/", 1)[-1]
    return e.filename if "?" in last or last in ("view", "") else last


def default_registry() -> Registry:
    """The registry of `DEFAULT_ENTRIES` in the default cache directory (read at call time)."""
    return Registry(DEFAULT_ENTRIES)


def resolve(name: str, fetch: bool = False, progress: ProgressFn | None = None) -> Path:
    """Local path of weights `name` from the default registry; see `Registry.resolve`."""
    return default_registry().resolve(name, fetch=fetch, progress=progress)
