"""Errors a person can act on. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def first_line(e: BaseException, limit: int = 300, typed: bool = True) -> str:
    """`Type: first line of the message`, for one-line errors from tools whose messages run for pages
    (`typed=False`: the line alone). The type name alone when the message is empty."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0][:limit]
    return f"{type(e).__name__}: {line}" if typed else line


def describe_files(paths: Iterable[str | os.PathLike], per_folder: int = 3) -> str:
    """The files as one short line: 'nothing', 'a.png, b.png' or '30 files in out/ (seed0000.png ... seed0029.png)'."""
    groups: dict[Path, list[str]] = {}
    for p in map(Path, paths):
        groups.setdefault(p.parent, []).append(p.name)
    if not groups:
        return "nothing"
    parts = []
    for folder, names in groups.items():
        if len(names) <= per_folder:
            parts.append(", ".join(str(folder / n) for n in names))
        else:
            parts.append(f"{len(names)} files in {folder}/ ({names[0]} ... {names[-1]})")
    return "; ".join(parts)


class PTIError(Exception):
    """Base class for every error `pti` reports to the user (no traceback unless --debug)."""

    exit_code = 1


class CheckpointError(PTIError):
    """A generator checkpoint is missing, unreadable, hostile or unsupported."""


class ImageError(PTIError):
    """A photo is missing, not an image, truncated or too large."""


class FaceNotFoundError(PTIError):
    """No face was detected where one was needed."""


class WeightsError(PTIError):
    """A file from the weights registry is missing, corrupt or cannot be fetched."""


class IdentityError(PTIError):
    """A .pti identity file is unreadable or belongs to another base generator."""


class OutputError(PTIError):
    """An output cannot be written: the path is a file or a folder, read-only, or the disk is full."""


class Interrupted(PTIError):
    """Ctrl-C or SIGTERM stopped the work. Nothing partial was left; `kept` lists the complete files.

    Exit code 130, the shell's code for a process stopped by SIGINT, for both signals: the CLI
    treats them alike.
    """

    exit_code = 130

    def __init__(self, kept: list[Path] | tuple[Path, ...] = (), how: str = "Ctrl-C"):
        self.kept = list(kept)
        self.how = how
        super().__init__(f"interrupted ({how}); no partial files were left. Kept: {describe_files(self.kept)}")


class ExportError(PTIError):
    """An export cannot be made, loaded or used: missing runtime, wrong base, version or device, batch out of range."""
