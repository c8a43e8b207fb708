"""Atomic file writes: the one way `pti` puts a file on disk.

`atomic_path(path)` yields a temporary path in the same directory; the caller writes it, and only
when the block finishes without error is it fsynced, given normal permissions and renamed onto
`path`. An error or Ctrl-C removes the temporary file and leaves `path` as it was, so readers
never see a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _chmod_like_open(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _chmod_like_open(path: Path) -> None:
    """mkstemp creates files 0600; give the final file the permissions open() would (0666 minus umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
