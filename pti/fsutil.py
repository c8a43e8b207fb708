"""Atomic file writes: the one way `pti` puts a file on disk.

`atomic_path(path)` yields a temporary path in the same directory; the caller writes it, and only
when the block finishes without error is it fsynced, given normal permissions and renamed onto
`path`. An error, Ctrl-C or SIGTERM (which the CLI turns into the same exception) removes the
temporary file and leaves `path` as it was, so readers never see a half-written file.

Every completed write is recorded in a per-process ledger (`written_since`), which is how an
interrupted command can say exactly which complete files it kept.

File-system failures (the output is a folder or sits under a file, the folder is read-only, the
disk is full) become one-line `OutputError`s naming the path.

Beside them: `plain` (data as plain JSON), `sha256_file` (how every file is identified: weights,
photos, identities, exports) and `default_cache_dir` (the user cache that weights and exports share).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pti.errors import OutputError
from pti.signals import deferred

_WRITTEN: list[Path] = []  # every file atomic_path completed in this process, in order
# Temporary files and staging folders this process has reserved and not yet renamed or removed. A name
# goes in *before* the file exists, so an interrupt at any bytecode (even inside the creating call, or
# between it and the `try` that would clean up) leaves it findable: `discard_pending` removes what is
# left, and the CLI calls it before it reports an interrupt (atexit covers worker processes). The short
# steps that must not be cut in half run under `pti.signals.deferred`.
_PENDING: set[Path] = set()

# errnos that mean "this storage cannot take the file", as opposed to errors of whatever the caller
# reads while writing (a dropped connection, say), which pass through unchanged.
_STORAGE_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
}


def mark() -> int:
    """A position in the ledger; `written_since(mark)` lists the files completed after it."""
    return len(_WRITTEN)


def written_since(position: int = 0) -> list[Path]:
    """Files completely written (and still present) since `position`, oldest first, no repeats."""
    seen: dict[Path, None] = {}
    for p in _WRITTEN[position:]:
        if p.exists():
            seen[p] = None
    return list(seen)


def note_written(path: str | os.PathLike) -> None:
    """Record a file completed by other means than `atomic_path` (an appended line) in the ledger."""
    _WRITTEN.append(Path(path))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    ensure_dir(path.parent)
    tmp = _reserve(path, suffix, folder=False)
    try:
        try:
            yield tmp
            with deferred():  # renamed and recorded, or neither
                _commit(tmp, path)
        except OSError as e:
            if e.errno not in _STORAGE_ERRNOS:
                raise
            raise output_error(path, e) from None
    finally:
        with deferred():
            tmp.unlink(missing_ok=True)
            _PENDING.discard(tmp)


@contextlib.contextmanager
def staged_folder(dest: str | os.PathLike, last: Iterable[str] = ()) -> Iterator[Path]:
    """Write several files that belong together: yield a private staging folder inside `dest`; when the
    block finishes, move each file (top level only) into `dest` by an atomic rename, the names in `last`
    after the others (a manifest written last means "the rest is complete"), and record them in the
    ledger. An error, Ctrl-C or SIGTERM removes the staging folder and leaves `dest` as it was."""
    dest = ensure_writable_dir(dest)
    stage = _reserve(dest, "", folder=True)
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir() if p.is_file())
        late = [n for n in last if n in names]
        for name in [n for n in names if n not in late] + late:
            target = dest / name
            if target.is_dir():
                raise OutputError(f"cannot write {target}: it is a folder")
            try:
                with deferred():
                    _commit(stage / name, target)
            except OSError as e:
                raise output_error(target, e) from None
    finally:
        with deferred():  # an interrupt inside rmtree's own cleanup would turn into an EBADF OSError
            shutil.rmtree(stage, ignore_errors=True)
            _PENDING.discard(stage)


def _commit(tmp: Path, path: Path) -> None:
    """Make a finished temporary file durable, give it normal permissions, rename it onto `path` and
    record it in the ledger."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    _chmod_like_open(tmp)
    os.replace(tmp, path)
    _WRITTEN.append(path)


def _reserve(path: Path, suffix: str, folder: bool) -> Path:
    """Create a private temporary file beside `path` (or, with `folder`, a staging folder inside it),
    0600 / 0700 like mkstemp / mkdtemp, registered in `_PENDING` before it is created."""
    where, prefix = (path, ".staging-") if folder else (path.parent, f".{path.name}.")
    for _ in range(100):
        tmp = where / f"{prefix}{secrets.token_hex(4)}{suffix}"
        with deferred():
            _PENDING.add(tmp)
            try:
                if folder:
                    os.mkdir(tmp, 0o700)
                else:
                    os.close(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600))
                return tmp
            except FileExistsError:
                _PENDING.discard(tmp)
            except OSError as e:
                _PENDING.discard(tmp)
                raise output_error(path, e, folder=folder) from None
    raise output_error(path, FileExistsError(errno.EEXIST, "no free temporary name"), folder=folder)


def discard_pending() -> None:
    """Remove the temporary files and staging folders an interrupted write left (see `_PENDING`).
    Only for the end of a command, when no write of this process is still in progress."""
    for tmp in list(_PENDING):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        _PENDING.discard(tmp)


atexit.register(discard_pending)


def plain(obj: Any, other: Callable[[Any], Any] = str) -> Any:
    """`obj` as plain JSON data: dicts (keys as str) and tuples as dicts and lists, numpy and 0-d torch
    scalars as Python numbers, None, bools, numbers and strings as they are, anything else through
    `other` (str by default, as `write_json` writes it; a caller may raise instead)."""
    if isinstance(obj, dict):
        return {str(k): plain(v, other) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, other) for v in obj]
    if type(obj).__module__ in ("numpy", "torch") and getattr(obj, "ndim", None) == 0:  # a scalar, not an array
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return other(obj)


def write_json(obj, path: str | os.PathLike) -> Path:
    """`obj` as indented JSON (Paths and other objects as their str), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str))
    return path


_CREATED: list[Path] = []  # folders this process created, outermost first (see `remove_empty_created`)


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create the folder `path` (and its parents) if needed; OutputError when that is impossible.
    Folders it creates are recorded, so a failed command can remove the ones it left empty."""
    path = Path(path)
    missing = [p for p in [path, *path.parents] if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(path, e, folder=True) from None
    _CREATED.extend(p.absolute() for p in missing if p.is_dir())
    return path


def created_mark() -> int:
    """A position in the record of created folders, for `remove_empty_created(mark)`."""
    return len(_CREATED)


def remove_empty_created(position: int = 0) -> None:
    """Remove the folders created since `position` that are empty now, innermost first: a failed or
    interrupted command leaves no empty output folders behind (folders that hold anything stay)."""
    for folder in sorted(set(_CREATED[position:]), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when empty
    del _CREATED[position:]


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """`ensure_dir`, then prove a file can be created there, so long work does not fail at its end."""
    path = ensure_dir(path)
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise output_error(path, e, folder=True) from None
    return path


def output_error(path: Path, e: OSError, folder: bool = False) -> OutputError:
    """One line saying why `path` cannot be written."""
    what = "folder" if folder else "file"
    code = e.errno
    if code in (errno.EEXIST, errno.ENOTDIR):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return OutputError(f"cannot write the {what} {path}: {blocker} is a file, not a folder")
    if code == errno.EISDIR:
        return OutputError(f"cannot write {path}: it is a folder")
    if code in (errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write the {what} {path}: permission denied (is the folder read-only?)")
    if code == errno.EROFS:
        return OutputError(f"cannot write the {what} {path}: the file system is read-only")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"cannot write {path}: no space left on the device (free some space and run again)")
    if code == errno.EFBIG:
        return OutputError(f"cannot write {path}: the file is larger than this system allows")
    return OutputError(f"cannot write the {what} {path}: {e.strerror or e}")


def _chmod_like_open(path: Path) -> None:
    """Temporary files are created 0600; give the final file the permissions open() would (0666 minus umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


# ---------------------------------------------------------------------------- hashing and the user cache

_CHUNK = 1 << 20  # 1 MiB reads


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir(platform: str | None = None) -> Path:
    """`$PTI_HOME`, else the platform's user cache directory + `/pti` (`platform`: a `sys.platform` value):
    the weights registry's downloads, cached exports and TensorRT's timing cache live there."""
    env = os.environ.get("PTI_HOME")
    if env:
        return Path(env).expanduser()
    platform = sys.platform if platform is None else platform
    if platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pti"
